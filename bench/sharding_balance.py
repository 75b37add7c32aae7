"""Benchmark: how even the sharding planner's layouts are on the MLPerf DLRM tables.

The 26 tables of Criteo Terabyte hashed below 40M categories (``harness.MLPERF_TABLE_SIZES``), dim
128, each table's rows capped (``--cap``, 4,000,000 by default; 0: no cap). Criteo has one lookup
per table per sample, so every table expects ``--batch`` lookups per step. For table-wise and auto at
each world size, it prints the largest rank's bytes (weights + optimizer state) and expected lookups
over the mean, the tables auto cuts, and the time to plan (pure arithmetic, median of 5).

    python -m bench.sharding_balance [--ranks 2,4,8] [--cap 4000000] [--optimizers sgd,adagrad,rwsadagrad]
    python -m bench.sharding_balance --show 4     # also print auto's plan at 4 ranks
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import List, Sequence

from bench.harness import MLPERF_TABLE_SIZES
from dlrm.shard.plan import TableSpec, balance, format_plan, plan_sharding, rank_totals


def mlperf_specs(cap: int, batch: int) -> List[TableSpec]:
    """The MLPerf tables, rows capped at ``cap`` (0: none), dim 128, ``batch`` lookups per step each."""
    return [TableSpec(min(rows, cap) if cap else rows, 128, float(batch)) for rows in MLPERF_TABLE_SIZES]


def plan_ms(specs: Sequence[TableSpec], world_size: int, mode: str, optimizer: str) -> float:
    """Median of 5 wall times of planning, in ms."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        plan_sharding(specs, world_size, mode, None, optimizer)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def row(specs: Sequence[TableSpec], world_size: int, mode: str, optimizer: str) -> str:
    """One line: ranks, optimizer, mode, bytes/mean, lookups/mean, tables cut, largest rank, plan time."""
    plan = plan_sharding(specs, world_size, mode, None, optimizer)
    totals = rank_totals(plan, specs, optimizer, False)
    bytes_ratio, lookups_ratio = balance(totals)
    cut = sum(p.kind != "table" for p in plan.placements)
    largest = max(b for b, _ in totals) / 2 ** 30
    return (f"| {world_size} | {optimizer} | {mode} | {bytes_ratio:.3f} | {lookups_ratio:.3f} | {cut} | "
            f"{largest:.2f} | {plan_ms(specs, world_size, mode, optimizer):.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="2,4,8", help="world sizes, comma-separated")
    ap.add_argument("--cap", type=int, default=4_000_000, help="rows per table at most (0: no cap)")
    ap.add_argument("--batch", type=int, default=2048, help="global batch: lookups per table per step")
    ap.add_argument("--optimizers", default="sgd,rwsadagrad", help="comma-separated: sgd, adagrad, rwsadagrad")
    ap.add_argument("--show", type=int, default=0, help="also print auto's plan at this many ranks")
    args = ap.parse_args(argv)
    specs = mlperf_specs(args.cap, args.batch)
    total_rows = sum(s.rows for s in specs)
    print(f"MLPerf tables, rows capped at {args.cap or 'none'}: {total_rows} rows x 128, batch {args.batch}")
    print("| ranks | optimizer | mode | largest rank bytes / mean | lookups / mean | tables cut | "
          "largest rank GiB | plan ms |")
    print("|---|---|---|---|---|---|---|---|")
    for world_size in (int(w) for w in args.ranks.split(",")):
        for optimizer in args.optimizers.split(","):
            for mode in ("table", "auto"):
                print(row(specs, world_size, mode, optimizer))
    if args.show:
        plan = plan_sharding(specs, args.show, "auto", None, "sgd")
        print("\n".join(format_plan(plan, specs, "sgd", False, None)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
