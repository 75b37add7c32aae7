"""torch.distributed set-up and the all-to-all, without module-level state.

``init_distributed`` returns a frozen :class:`DistInfo`; a single process is simply
``DistInfo(rank=0, world_size=1, local_rank=0, backend=None)``, so single-process code runs the same
path. Nothing here patches ``print``: callers print through a rank-aware logger.

Multi-process runs follow the reference's hybrid layout: the embedding tables are split into
contiguous shards, one per rank (model parallel); every rank reads the whole global batch and looks
up its own tables for all of it; an all-to-all ("butterfly shuffle") then gives each rank every
table's output for its contiguous slice of the batch, on which it runs the MLPs (data parallel).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as torch_dist

from dlrm_common import ConfigError, DLRMError, first_line

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


def init_distributed(local_rank: int = -1, use_gpu: bool = False, backend: str = "", timeout_s: float = 300.0,
                     log: Optional[Callable[[str], None]] = None) -> DistInfo:
    """Set up this process's place in the run.

    A launch with a world size of 1 (or none) needs no process group. Otherwise the process group
    is created with ``backend`` (default: nccl for GPUs, else gloo), ``MASTER_ADDR`` defaulting to
    127.0.0.1 and ``MASTER_PORT`` to 29500. Started by hand (not by torchrun), a process says at
    once where it waits for the others; it gives up after ``timeout_s`` seconds, which also bounds
    every collective.

    Raises:
        ConfigError: malformed launcher variables, or an unusable backend.
        DistributedError: the other processes did not join in time.
    """
    size = world_size_from_env()
    rank = _env_int(_RANK_VARS, 0)
    if local_rank < 0:
        local_rank = _env_int(_LOCAL_RANK_VARS, 0)
    if size <= 1:
        return DistInfo(rank=rank, world_size=1, local_rank=max(local_rank, 0), backend=None)
    backend = backend or ("nccl" if use_gpu and torch.cuda.is_available() else "gloo")
    address = f"{os.environ.setdefault('MASTER_ADDR', '127.0.0.1')}:{os.environ.setdefault('MASTER_PORT', '29500')}"
    if use_gpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if log is not None and "TORCHELASTIC_RUN_ID" not in os.environ:
        log(f"rank {rank}: waiting for all {size} processes at {address} (backend {backend}; giving up after "
            f"{timeout_s:g} s, --dist-init-timeout)")
    _import_group_capturing_modules()
    try:
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=size,
                                      timeout=datetime.timedelta(seconds=timeout_s))
    except (torch_dist.DistStoreError, TimeoutError) as exc:
        raise DistributedError(f"rank {rank}: the other processes of the {size} did not join at {address} "
                               f"within {timeout_s:g} s ({first_line(exc)}); start every rank with the same "
                               "MASTER_ADDR, MASTER_PORT and WORLD_SIZE, or use torchrun") from None
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"--dist-backend={backend}: cannot start the process group ({first_line(exc)})") from None
    return DistInfo(rank=rank, world_size=size, local_rank=local_rank, backend=backend)


class DistributedError(DLRMError):
    """A multi-process run cannot go on: a peer never joined, failed or vanished."""


_FAILED_KEY = "dlrm_failed_rank"


def announce_failure(info: DistInfo) -> None:
    """Tell the other ranks, through the rendezvous store, that this rank is failing (best effort)."""
    try:
        torch_dist.distributed_c10d._get_default_store().set(_FAILED_KEY, str(info.rank))
    except Exception:  # the store may already be gone; the others then report a lost connection
        pass


def current_info() -> DistInfo:
    """This process's place, read back from torch.distributed (a single process when none)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return DistInfo()
    return DistInfo(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(),
                    local_rank=_env_int(_LOCAL_RANK_VARS, 0), backend=torch_dist.get_backend())


def is_collective_failure(exc: BaseException) -> bool:
    """True for the errors a collective raises when a peer has gone (torch's DistError, or gloo's and
    nccl's RuntimeErrors, which name the backend or the lost connection)."""
    if isinstance(exc, torch_dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(mark in text for mark in ("gloo", "NCCL", "nccl", "Connection"))


def peer_failure(info: DistInfo, exc: BaseException) -> DistributedError:
    """The one-line error of a rank whose collective failed because another rank stopped."""
    try:
        store = torch_dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=2))
        failed = store.get(_FAILED_KEY).decode()
        return DistributedError(f"rank {info.rank}: stopping because rank {failed} failed")
    except Exception:
        return DistributedError(f"rank {info.rank}: stopping because another rank stopped ({first_line(exc)})")


def _import_group_capturing_modules() -> None:
    """Import, before the process group exists, the torch modules that capture ``group.WORLD`` as
    a default argument when they are imported.

    ``torch.distributed.nn.functional`` declares ``def all_reduce(..., group=group.WORLD)``; imported
    after ``init_process_group`` (creating the first optimizer imports it, through torch._dynamo
    and FSDP), that default holds the default group for good, so ``destroy_process_group`` cannot
    free it. It is then freed during interpreter shutdown, while gloo's worker threads still run,
    and now and then a rank aborts at exit ("terminate called without an active exception").
    Imported first, the default is the empty placeholder and nothing outlives the shutdown.
    """
    import torch.distributed.nn  # noqa: F401


def shutdown_distributed(wait: bool = True) -> None:
    """Destroy the process group, after waiting for every rank when ``wait`` (leaving it to
    interpreter exit can abort the process while the backend's threads still run). After an error
    on this rank, pass ``wait=False``: the other ranks may never arrive."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        try:
            if wait:
                torch_dist.barrier()
        finally:
            torch_dist.destroy_process_group()


def shard(n: int, world_size: int, rank: int) -> Tuple[int, int]:
    """[start, stop) of ``rank``'s contiguous part of n items: k = n // W each, the first n % W
    ranks one more, as the reference partitions. Used for tables (model parallel) and batch rows (data parallel)."""
    k, m = divmod(n, world_size)
    return rank * k + min(rank, m), (rank + 1) * k + min(rank + 1, m)


class ButterflyShuffle(torch.autograd.Function):
    """All-to-all of pooled embeddings: local tables x whole batch -> all tables x local batch rows.

    Forward input: this rank's n_local tables' outputs, each (B, D) for the whole global batch.
    Forward output: all T tables' outputs (global table order), each (B_local, D), for this rank's
    batch slice. Backward sends the gradients the other way and divides them by W: each rank's loss
    is a mean over its B/W rows, so the sum that arrives at a table is W times the gradient of the
    global mean (the reference did not divide, so its tables learned W times too fast).
    """

    @staticmethod
    def forward(ctx, info: DistInfo, table_counts: Sequence[int], *local: torch.Tensor):
        batch, dim = local[0].shape
        rows = [shard(batch, info.world_size, r) for r in range(info.world_size)]
        mine = rows[info.rank][1] - rows[info.rank][0]
        send = torch.cat(local, dim=1).contiguous()  # (B, n_local*D): row blocks already in rank order
        in_splits = [(stop - start) * len(local) * dim for start, stop in rows]
        out_splits = [mine * count * dim for count in table_counts]
        received = send.new_empty(sum(out_splits))
        torch_dist.all_to_all_single(received, send.view(-1), out_splits, in_splits)
        ctx.info, ctx.table_counts, ctx.rows, ctx.dim, ctx.n_local = info, list(table_counts), rows, dim, len(local)
        outputs = []
        for chunk, count in zip(received.split(out_splits), table_counts):
            outputs.extend(chunk.view(mine, count * dim).split(dim, dim=1))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        info, dim, rows = ctx.info, ctx.dim, ctx.rows
        mine = rows[info.rank][1] - rows[info.rank][0]
        # Owner o must receive (B_local, n_o * D) row-major for its n_o tables, so the send buffer is
        # one such block per owner, in rank order (not the (B_local, T * D) rows of all tables).
        blocks, first = [], 0
        for count in ctx.table_counts:
            blocks.append(torch.cat(grads[first:first + count], dim=1).reshape(-1))  # (B_local * n_o * D,)
            first += count
        send = torch.cat(blocks)
        in_splits = [mine * count * dim for count in ctx.table_counts]
        out_splits = [(stop - start) * ctx.n_local * dim for start, stop in rows]
        received = send.new_empty(sum(out_splits))
        torch_dist.all_to_all_single(received, send.view(-1), out_splits, in_splits)
        batch = rows[-1][1]
        full = received.view(batch, ctx.n_local * dim) / info.world_size  # row blocks arrive in rank order
        return (None, None) + tuple(g.contiguous() for g in full.split(dim, dim=1))


def average_gradients(params: Sequence[torch.nn.Parameter], info: DistInfo) -> None:
    """All-reduce the dense gradients and divide by W (what DistributedDataParallel does)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or info.world_size == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_sum(values: Sequence[float], info: DistInfo) -> List[float]:
    """Sum a few numbers over all ranks (float64)."""
    if info.world_size == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else None
    t = torch.tensor(list(values), dtype=torch.float64, device=device)  # nccl reduces CUDA tensors only
    torch_dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj, info: DistInfo, main_only: bool = False) -> list:
    """Every rank's ``obj``, in rank order, on every rank; with ``main_only``, on rank 0 only (the
    others get an empty list), which spares sending whole tables to ranks that do not need them."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    if not main_only:
        torch_dist.all_gather_object(out, obj)
        return out
    torch_dist.gather_object(obj, out if info.is_main else None, dst=0)
    return out if info.is_main else []
