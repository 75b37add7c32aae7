"""STUB (replaced by the planner branch): the plan types and the table/row/column modes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from dlrm.distributed import shard


@dataclass(frozen=True)
class TableSpec:
    rows: int
    dim: int
    lookups_per_step: float
    whole_only: bool = False


@dataclass(frozen=True)
class Placement:
    table: int
    kind: str
    ranks: Tuple[int, ...]
    blocks: Tuple[Tuple[int, int], ...]

    def block_on(self, rank: int) -> Optional[Tuple[int, int]]:
        return self.blocks[self.ranks.index(rank)] if rank in self.ranks else None


@dataclass(frozen=True)
class ShardingPlan:
    world_size: int
    placements: Tuple[Placement, ...]

    def pieces_on(self, rank: int) -> List[Placement]:
        return [p for p in self.placements if rank in p.ranks]


def plan_sharding(specs: Sequence[TableSpec], world_size: int, mode: str, budget_bytes: Optional[int],
                  optimizer: str = "sgd", learned_pooling: bool = False) -> ShardingPlan:
    owners = {}
    for r in range(world_size):
        a, b = shard(len(specs), world_size, r)
        owners.update({t: r for t in range(a, b)})
    out = []
    for t, s in enumerate(specs):
        if mode == "table" or s.whole_only:
            out.append(Placement(t, "table", (owners[t],), ((0, s.rows),)))
            continue
        n = s.rows if mode == "row" else s.dim
        k = min(n, world_size)
        ranks = sorted((t + i) % world_size for i in range(k))
        out.append(Placement(t, mode, tuple(ranks), tuple(shard(n, k, i) for i in range(k))))
    return ShardingPlan(world_size, tuple(out))


def format_plan(plan, specs, optimizer, learned_pooling, budget_bytes):
    return [f"sharding plan: {len(specs)} tables"] + [f"{p.table} {p.kind} {p.ranks}" for p in plan.placements]
