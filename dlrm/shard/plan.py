"""Where each embedding table lives across W ranks: whole, cut into row blocks, or cut into column blocks.

A plan is arithmetic on the tables' shapes and expected lookups; nothing is allocated, so every rank
computes the same plan from the same flags before any table is built, and a plan that would not fit
a per-rank memory budget is refused first.

Modes (``plan_sharding``):
    table   the reference's layout: rank r holds the contiguous tables ``shard(T, W, r)``.
    row     every table cut into contiguous row blocks over min(rows, W) ranks.
    column  every table cut into contiguous column blocks over min(dim, W) ranks.
    auto    the costliest tables cut over all W ranks and the rest placed whole, so that both the
            bytes and the expected lookups per step come out nearly even across ranks.
Tables marked ``whole_only`` (quotient-remainder and mixed-dimension tables) are always whole: under
row and column on the rank the table-wise layout gives them, under auto wherever they balance best.

Cost of a piece holding r rows and c columns of a table, in float32 values (4 bytes each):
    weights          r * c
    optimizer state  sgd none; adagrad r * c; rwsadagrad r (one accumulator per row: a column
                     piece keeps one for every row of the table)
    learned pooling  one weight per row held, plus its state under adagrad or rwsadagrad (the
                     pooling weights take dense Adagrad under both)
Expected lookups per step of a piece, in row-equivalents (lookups spread evenly over the rows): whole
L; row block L * r / rows; column block L * c / dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from dlrm.common import ConfigError
from dlrm.distributed import shard

FLOAT_BYTES = 4
MODES = ("table", "row", "column", "auto")
KINDS = ("table", "row", "column")
OPTIMIZERS = ("sgd", "adagrad", "rwsadagrad")
# auto keeps the first plan (fewest tables cut) whose largest rank is within 5% of the mean in both
# bytes and lookups; cutting more tables costs more all-to-all messages and more, smaller lookups.
BALANCED = 1.05


@dataclass(frozen=True)
class TableSpec:
    """What the planner knows of one table.

    Attributes:
        rows: rows of the table (>= 1).
        dim: columns (the embedding dimension, >= 1).
        lookups_per_step: expected indices of this table per global batch (bag size x batch size).
        whole_only: quotient-remainder and mixed-dimension tables, which can only be placed whole.
    """

    rows: int
    dim: int
    lookups_per_step: float
    whole_only: bool = False

    def __post_init__(self):
        if self.rows < 1 or self.dim < 1:
            raise ConfigError(f"a table needs at least one row and one column, got {self.rows} x {self.dim}")
        if not math.isfinite(self.lookups_per_step) or self.lookups_per_step < 0:
            raise ConfigError(f"expected lookups per step must be a finite number >= 0, got {self.lookups_per_step}")


@dataclass(frozen=True)
class Placement:
    """Where one table lives.

    Attributes:
        table: global table number.
        kind: "table" (whole), "row" (row blocks) or "column" (column blocks).
        ranks: the owners, one per block, in block order.
        blocks: per owner, [start, stop): rows for "row", columns for "column", (0, rows) for
            "table"; ascending and contiguous, together covering all rows (columns).
    """

    table: int
    kind: str
    ranks: Tuple[int, ...]
    blocks: Tuple[Tuple[int, int], ...]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"placement kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.ranks or len(self.ranks) != len(self.blocks) or len(set(self.ranks)) != len(self.ranks):
            raise ConfigError(f"table {self.table}: need one block per distinct owner, got ranks "
                              f"{self.ranks} and blocks {self.blocks}")

    def block_on(self, rank: int) -> Optional[Tuple[int, int]]:
        """This rank's block [start, stop), or None where the rank holds none of the table."""
        for owner, block in zip(self.ranks, self.blocks):
            if owner == rank:
                return block
        return None


@dataclass(frozen=True)
class ShardingPlan:
    """Every table's placement over ``world_size`` ranks.

    Attributes:
        world_size: W, the ranks.
        placements: one per table, in table order.
        mode: the mode that made the plan ("table", "row", "column" or "auto").
    """

    world_size: int
    placements: Tuple[Placement, ...]
    mode: str = "table"

    def pieces_on(self, rank: int) -> List[Placement]:
        """The placements this rank holds a block of, in table order."""
        return [p for p in self.placements if p.block_on(rank) is not None]


# ---- the plan -------------------------------------------------------------------------------------

def plan_sharding(specs: Sequence[TableSpec], world_size: int, mode: str, budget_bytes: Optional[int],
                  optimizer: str = "sgd", learned_pooling: bool = False) -> ShardingPlan:
    """The placement of every table over ``world_size`` ranks under ``mode`` (see the module docs).

    Raises ConfigError for a bad mode, optimizer or world size, for table mode with fewer tables
    than ranks, and when some rank's bytes (weights and optimizer state) exceed ``budget_bytes``
    (None: no limit), naming the table and the budget.
    """
    _check_arguments(specs, world_size, mode, budget_bytes, optimizer)
    if mode == "table":
        plan = _plan_table_wise(specs, world_size)
    elif mode == "auto":
        plan = _plan_auto(specs, world_size, optimizer, learned_pooling, budget_bytes)
    else:
        plan = _plan_cut(specs, world_size, mode)
    check_budget(plan, specs, optimizer, learned_pooling, budget_bytes)
    return plan


def _check_arguments(specs: Sequence[TableSpec], world_size: int, mode: str, budget_bytes: Optional[int],
                     optimizer: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"--sharding must be one of {', '.join(MODES)}, got {mode!r}")
    _check_optimizer(optimizer)
    if world_size < 1:
        raise ConfigError(f"sharding needs at least one rank, got {world_size}")
    if not specs:
        raise ConfigError("sharding needs at least one table")
    if budget_bytes is not None and budget_bytes <= 0:
        raise ConfigError(f"--rank-memory-gib must be positive, got {budget_bytes} bytes")


def _check_optimizer(optimizer: str) -> None:
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"the sharding planner knows the optimizers {', '.join(OPTIMIZERS)}, got {optimizer!r}")


def table_rank(table: int, num_tables: int, world_size: int) -> int:
    """The rank whose contiguous range ``shard(num_tables, world_size, rank)`` holds ``table``."""
    each, extra = divmod(num_tables, world_size)
    if table < extra * (each + 1):
        return table // (each + 1)
    return extra + (table - extra * (each + 1)) // each


def whole(table: int, rank: int, spec: TableSpec) -> Placement:
    """Table ``table`` whole on ``rank``."""
    return Placement(table, "table", (rank,), ((0, spec.rows),))


def cut(table: int, kind: str, extent: int, world_size: int) -> Placement:
    """Table ``table`` cut into ``k = min(extent, W)`` contiguous blocks of its ``extent`` rows (kind
    "row") or columns ("column"), block i of ``shard(extent, k, i)``'s size.

    With every rank taking part, block i goes to rank i; with fewer (k < W), to rank (table + i) % W,
    so that the blocks of small tables spread over the ranks."""
    k = min(extent, world_size)
    first = 0 if k == world_size else table % world_size
    ranks = tuple((first + i) % world_size for i in range(k))
    return Placement(table, kind, ranks, tuple(shard(extent, k, i) for i in range(k)))


def _extent(spec: TableSpec, kind: str) -> int:
    return spec.rows if kind == "row" else spec.dim


def _plan_table_wise(specs: Sequence[TableSpec], world_size: int) -> ShardingPlan:
    if len(specs) < world_size:
        raise ConfigError(f"{len(specs)} tables cannot be placed table-wise over {world_size} ranks (each rank "
                          "needs at least one table); use --sharding=row, column or auto, or fewer ranks")
    return ShardingPlan(world_size, tuple(whole(t, table_rank(t, len(specs), world_size), spec)
                                          for t, spec in enumerate(specs)), "table")


def _plan_cut(specs: Sequence[TableSpec], world_size: int, kind: str) -> ShardingPlan:
    placements = tuple(whole(t, table_rank(t, len(specs), world_size), spec) if spec.whole_only
                       else cut(t, kind, _extent(spec, kind), world_size)
                       for t, spec in enumerate(specs))
    return ShardingPlan(world_size, placements, kind)


# ---- auto -----------------------------------------------------------------------------------------

def _plan_auto(specs: Sequence[TableSpec], world_size: int, optimizer: str, learned_pooling: bool,
               budget_bytes: Optional[int]) -> ShardingPlan:
    """Cut the k costliest tables over all ranks for k = 0, 1, ...; keep the first plan within the
    budget and BALANCED in both measures, else the best found (the most even within the budget, or
    the one needing the least memory where none fits)."""
    order = _by_cost(specs, world_size, optimizer, learned_pooling)
    cuttable = [t for t in order if not specs[t].whole_only]
    best, best_key = None, None
    for k in range(len(cuttable) + 1):
        plan = _auto_candidate(specs, world_size, cuttable[:k], order, optimizer, learned_pooling, budget_bytes)
        totals = rank_totals(plan, specs, optimizer, learned_pooling)
        most = max(b for b, _ in totals)
        fits = budget_bytes is None or most <= budget_bytes
        worst = max(balance(totals))
        if fits and worst <= BALANCED:
            return plan
        key = (0, worst, k) if fits else (1, most, k)
        if best_key is None or key < best_key:
            best, best_key = plan, key
    return best


def _whole_costs(specs: Sequence[TableSpec], optimizer: str, learned_pooling: bool) -> List[Tuple[int, float]]:
    """(bytes, expected lookups) of each table placed whole."""
    return [(piece_bytes(s, whole(t, 0, s), 0, s.rows, optimizer, learned_pooling), s.lookups_per_step)
            for t, s in enumerate(specs)]


def _by_cost(specs: Sequence[TableSpec], world_size: int, optimizer: str, learned_pooling: bool) -> List[int]:
    """Table numbers, costliest first: cost max(bytes / mean bytes, lookups / mean lookups), the means
    per rank; ties (such as Criteo's small tables, whose lookups outweigh their bytes) by the sum of
    the two shares, then in table order."""
    costs = _whole_costs(specs, optimizer, learned_pooling)
    mean_bytes, mean_lookups = (_mean([c[i] for c in costs], world_size) for i in (0, 1))
    shares = [(b / mean_bytes, lookups / mean_lookups) for b, lookups in costs]
    return sorted(range(len(specs)), key=lambda t: (-max(shares[t]), -sum(shares[t]), t))


def _mean(values: Sequence[float], world_size: int) -> float:
    """Sum over W, or 1 where the sum is 0 (so that ratios stay defined)."""
    total = sum(values)
    return total / world_size if total > 0 else 1.0


def auto_cut_kind(spec: TableSpec, world_size: int, optimizer: str) -> str:
    """How auto cuts a table: by columns where every rank gets one (dim >= W) and the optimizer keeps
    no per-row state (which each column piece would repeat), else by rows."""
    return "column" if spec.dim >= world_size and optimizer != "rwsadagrad" else "row"


def _auto_candidate(specs: Sequence[TableSpec], world_size: int, to_cut: Sequence[int], order: Sequence[int],
                    optimizer: str, learned_pooling: bool, budget_bytes: Optional[int]) -> ShardingPlan:
    """The tables in ``to_cut`` cut over all ranks; the others whole, in ``order``, each on the rank
    where it leaves the smallest normalised load among those it fits in."""
    placements: Dict[int, Placement] = {}
    loads = [[0, 0.0] for _ in range(world_size)]  # per rank: bytes, expected lookups
    for t in to_cut:
        kind = auto_cut_kind(specs[t], world_size, optimizer)
        placements[t] = cut(t, kind, _extent(specs[t], kind), world_size)
        _add_loads(loads, placements[t], specs[t], optimizer, learned_pooling)
    costs = _whole_costs(specs, optimizer, learned_pooling)
    rest = [t for t in order if t not in placements]
    mean_bytes = _mean([b for b, _ in loads] + [costs[t][0] for t in rest], world_size)
    mean_lookups = _mean([lk for _, lk in loads] + [costs[t][1] for t in rest], world_size)
    for t in rest:
        rank = _emptiest_rank(loads, costs[t], (mean_bytes, mean_lookups), budget_bytes)
        placements[t] = whole(t, rank, specs[t])
        _add_loads(loads, placements[t], specs[t], optimizer, learned_pooling)
    return ShardingPlan(world_size, tuple(placements[t] for t in range(len(specs))), "auto")


def _emptiest_rank(loads: Sequence[Sequence[float]], cost: Tuple[int, float], means: Tuple[float, float],
                   budget_bytes: Optional[int]) -> int:
    """The rank whose load, with ``cost`` (bytes, lookups) added, is smallest in max(bytes / mean,
    lookups / mean), then in their sum, then in rank number; among the ranks within the budget
    (all ranks where none is)."""
    fitting = [r for r, (b, _) in enumerate(loads) if budget_bytes is None or b + cost[0] <= budget_bytes]

    def load_after(r: int) -> Tuple[float, float, int]:
        shares = ((loads[r][0] + cost[0]) / means[0], (loads[r][1] + cost[1]) / means[1])
        return max(shares), sum(shares), r

    return min(fitting or range(len(loads)), key=load_after)


def _add_loads(loads: List[List[float]], placement: Placement, spec: TableSpec, optimizer: str,
               learned_pooling: bool) -> None:
    for rank, (start, stop) in zip(placement.ranks, placement.blocks):
        loads[rank][0] += piece_bytes(spec, placement, start, stop, optimizer, learned_pooling)
        loads[rank][1] += piece_lookups(spec, placement, start, stop)


# ---- costs ----------------------------------------------------------------------------------------

def piece_shape(spec: TableSpec, placement: Placement, start: int, stop: int) -> Tuple[int, int]:
    """(rows, columns) held by the block [start, stop) of ``placement``."""
    if placement.kind == "row":
        return stop - start, spec.dim
    if placement.kind == "column":
        return spec.rows, stop - start
    return spec.rows, spec.dim


def piece_bytes(spec: TableSpec, placement: Placement, start: int, stop: int, optimizer: str,
                learned_pooling: bool) -> int:
    """Bytes of the block [start, stop) of ``placement``: its weights, their optimizer state and,
    with ``learned_pooling``, the pooling weights of the rows it holds and their state."""
    _check_optimizer(optimizer)
    rows, cols = piece_shape(spec, placement, start, stop)
    weights = rows * cols
    state = {"sgd": 0, "adagrad": weights, "rwsadagrad": rows}[optimizer]
    pooling = rows * (1 if optimizer == "sgd" else 2) if learned_pooling else 0
    return (weights + state + pooling) * FLOAT_BYTES


def piece_lookups(spec: TableSpec, placement: Placement, start: int, stop: int) -> float:
    """Expected lookups per step that reach the block [start, stop) of ``placement``, in
    row-equivalents (a column block of c columns does c / dim of a row's work)."""
    if placement.kind == "row":
        return spec.lookups_per_step * (stop - start) / spec.rows
    if placement.kind == "column":
        return spec.lookups_per_step * (stop - start) / spec.dim
    return spec.lookups_per_step


def rank_totals(plan: ShardingPlan, specs: Sequence[TableSpec], optimizer: str,
                learned_pooling: bool) -> List[Tuple[int, float]]:
    """Per rank (W entries): (bytes, expected lookups per step) of the pieces it holds."""
    loads = [[0, 0.0] for _ in range(plan.world_size)]
    for placement in plan.placements:
        _add_loads(loads, placement, specs[placement.table], optimizer, learned_pooling)
    return [(int(b), float(lookups)) for b, lookups in loads]


def balance(totals: Sequence[Tuple[int, float]]) -> Tuple[float, float]:
    """(largest rank / mean) for bytes and for lookups; 1.0 for a measure that is zero everywhere."""
    ratios = []
    for i in (0, 1):
        values = [t[i] for t in totals]
        ratios.append(max(values) / _mean(values, len(values)) if sum(values) > 0 else 1.0)
    return ratios[0], ratios[1]


# ---- the budget -----------------------------------------------------------------------------------

def check_budget(plan: ShardingPlan, specs: Sequence[TableSpec], optimizer: str, learned_pooling: bool,
                 budget_bytes: Optional[int]) -> None:
    """Raise ConfigError (one line) when a rank of ``plan`` needs more than ``budget_bytes``, naming
    the largest table on the rank most over it, the rank's total and the budget."""
    if budget_bytes is None:
        return
    totals = rank_totals(plan, specs, optimizer, learned_pooling)
    rank = max(range(plan.world_size), key=lambda r: (totals[r][0], -r))
    if totals[rank][0] <= budget_bytes:
        return
    sizes = {p.table: piece_bytes(specs[p.table], p, *p.block_on(rank), optimizer, learned_pooling)
             for p in plan.pieces_on(rank)}
    table = max(sizes, key=lambda t: (sizes[t], -t))
    spec, placement = specs[table], plan.placements[table]
    what = (f"table {table} ({spec.rows} rows x {spec.dim}, {gib(sizes[table])} GiB"
            f"{_with_state(optimizer, learned_pooling)}")
    limit = f"--rank-memory-gib={gib(budget_bytes)}"
    if placement.kind == "table" and sizes[table] > budget_bytes:
        raise ConfigError(f"{what}) does not fit {limit}; {_advice(plan.mode, spec.whole_only)}")
    raise ConfigError(f"rank {rank} would hold {gib(totals[rank][0])} GiB, over {limit}; its largest table "
                      f"is {what} on this rank); {_advice(plan.mode, spec.whole_only)}")


def _with_state(optimizer: str, learned_pooling: bool) -> str:
    extras = ([f"its {optimizer} state"] if optimizer != "sgd" else []) + (
        ["its pooling weights"] if learned_pooling else [])
    return " with " + " and ".join(extras) if extras else ""


def _advice(mode: str, whole_only: bool) -> str:
    if whole_only:
        return ("it can only be placed whole (a quotient-remainder or mixed-dimension table): "
                "use a larger --rank-memory-gib")
    if mode == "table":
        return "use --sharding=row, column or auto"
    if mode == "auto":
        return "use more ranks or a larger --rank-memory-gib"
    return "use --sharding=auto, more ranks or a larger --rank-memory-gib"


# ---- printing -------------------------------------------------------------------------------------

def format_plan(plan: ShardingPlan, specs: Sequence[TableSpec], optimizer: str, learned_pooling: bool,
                budget_bytes: Optional[int]) -> List[str]:
    """The plan as printed lines: a heading, one row per table (table, rows, dim, bytes, type, ranks,
    lookups/step), one row per rank (rank, bytes, lookups/step) and the balance line."""
    budget = "none" if budget_bytes is None else f"{gib(budget_bytes)} GiB per rank"
    lines = [f"sharding plan: {plan.mode}, {plan.world_size} ranks, budget {budget}"]
    table_rows = [("table", "rows", "dim", "bytes", "type", "ranks", "lookups/step")]
    for p in plan.placements:
        spec = specs[p.table]
        size = sum(piece_bytes(spec, p, start, stop, optimizer, learned_pooling) for start, stop in p.blocks)
        table_rows.append((str(p.table), str(spec.rows), str(spec.dim), human_bytes(size), p.kind,
                           rank_list(p.ranks), _count(spec.lookups_per_step)))
    totals = rank_totals(plan, specs, optimizer, learned_pooling)
    rank_rows = [("rank", "bytes", "lookups/step")]
    rank_rows += [(str(r), human_bytes(b), _count(lookups)) for r, (b, lookups) in enumerate(totals)]
    bytes_ratio, lookups_ratio = balance(totals)
    return (lines + _aligned(table_rows) + _aligned(rank_rows)
            + [f"balance: bytes {bytes_ratio:.2f}x, lookups {lookups_ratio:.2f}x the mean"])


def _aligned(rows: Sequence[Sequence[str]]) -> List[str]:
    """Rows of cells as fixed-width lines, every column right-aligned to its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]


def rank_list(ranks: Sequence[int]) -> str:
    """(0, 1, 2, 3) -> "0-3"; (3, 0, 1) -> "3,0,1"; (2,) -> "2"."""
    if len(ranks) > 2 and list(ranks) == list(range(ranks[0], ranks[0] + len(ranks))):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(str(r) for r in ranks)


def _count(value: float) -> str:
    return f"{value:.0f}" if abs(value - round(value)) < 0.05 else f"{value:.1f}"


def _sig3(value: float) -> str:
    """A non-negative number to 3 significant figures: 38.1, 5.00, 0.977, 1234."""
    if value >= 99.95:
        return f"{value:.0f}"
    if value >= 9.995:
        return f"{value:.1f}"
    if value >= 0.9995:
        return f"{value:.2f}"
    return f"{value:#.3g}"


def gib(n_bytes: float) -> str:
    """Bytes in GiB to 3 significant figures: 40 * 2**30 -> "40.0"."""
    return _sig3(n_bytes / 2 ** 30)


def human_bytes(n_bytes: float) -> str:
    """Bytes in the largest binary unit that keeps the figure below 1000, 3 significant figures:
    1.49 GiB, 12.0 MiB, 512 B."""
    value, unit = float(n_bytes), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1000:
            break
        value, unit = value / 1024, bigger
    return f"{value:.0f} B" if unit == "B" else f"{_sig3(value)} {unit}"
