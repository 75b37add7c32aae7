"""How a multi-process run splits its tables: the ``--sharding`` flags, checked on their own."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dlrm.common import FlagError, check_number

SHARDINGS = ("table", "row", "column", "auto")
A2A_PRECISION_NAMES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ShardingConfig:
    """The tables' layout over the ranks and the all-to-all's precision.

    Attributes:
        sharding: "table" (whole tables, the reference's layout), "row", "column" or "auto"
            (the planner balances bytes and lookups per step).
        rank_memory_gib: the tables' budget per rank (weights and optimizer state), GiB; None:
            the memory available on each host divided by its processes (the smallest over ranks).
        print_sharding_plan: print the plan before training.
        a2a_precision: the type the all-to-all sends: "fp32" (exact), "bf16" or "fp16".
    """

    sharding: str = "table"
    rank_memory_gib: Optional[float] = None
    print_sharding_plan: bool = False
    a2a_precision: str = "fp32"

    def __post_init__(self):
        if self.sharding not in SHARDINGS:
            raise FlagError(f"{{sharding}} must be one of {', '.join(SHARDINGS)}, got {self.sharding!r}")
        if self.a2a_precision not in A2A_PRECISION_NAMES:
            raise FlagError(f"{{a2a_precision}} must be one of {', '.join(A2A_PRECISION_NAMES)}, "
                            f"got {self.a2a_precision!r}")
        if self.rank_memory_gib is not None:
            check_number("rank_memory_gib", self.rank_memory_gib)
            if self.rank_memory_gib <= 0:
                raise FlagError(f"{{rank_memory_gib}} must be positive, got {self.rank_memory_gib:g}")
