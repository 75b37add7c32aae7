"""torch.distributed set-up (spec §4), without module-level state.

``init_distributed`` returns a frozen :class:`DistInfo`; a single process is simply
``DistInfo(rank=0, world_size=1, local_rank=0, backend=None)``, so single-process code runs the same
path. Nothing here patches ``print``: callers print through a rank-aware logger.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from dlrm_common import ConfigError

_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "RANK")
_LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a run.

    Attributes:
        rank: global rank, 0-based.
        world_size: number of processes.
        local_rank: rank on this node.
        backend: the torch.distributed backend, or None for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        """True on the process that prints (rank 0)."""
        return self.rank == 0


def _env_int(names, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None
    return default


def world_size_from_env() -> int:
    """The world size that the launcher (torchrun, mpirun, ...) announces, 1 if none."""
    return _env_int(_SIZE_VARS, 1)


def init_distributed(local_rank: int = -1, use_gpu: bool = False, backend: str = "") -> DistInfo:
    """Set up this process's place in the run (spec §4).

    A launch with a world size of 1 (or none) needs no process group. Multi-process training is
    not supported by this version yet: such a launch is refused with a clear error rather than
    silently training something different from a single process.

    Raises:
        ConfigError: a multi-process launch, or malformed launcher variables.
    """
    size = world_size_from_env()
    if size > 1:
        raise ConfigError(
            f"a launch with world size {size} was requested, but multi-process training is not "
            "supported by this version yet; run a single process"
        )
    rank = _env_int(_RANK_VARS, 0)
    if local_rank < 0:
        local_rank = _env_int(_LOCAL_RANK_VARS, 0)
    return DistInfo(rank=rank, world_size=1, local_rank=max(local_rank, 0), backend=None)
