"""Benchmark: sharded runs through torchrun, as a user starts them: memory, traffic and speed.

Each run is ``dlrm_s_pytorch.py`` under ``torchrun`` (gloo, 127.0.0.1, one thread per rank). Every
rank runs the script's ``main`` in-process behind a thin wrapper (this file, ``rank`` mode) that
times each ``all_to_all_single`` and ``all_reduce`` call and counts the bytes it sends to other
ranks, and writes them with its peak RSS to a JSON file per rank.

    python -m bench.sharding_runs memory  [--ranks 4] [--budget-gib 0.5] [--factor 3]
    python -m bench.sharding_runs traffic [--ranks 2,4] [--rounds 3] [--batches 40]
    python -m bench.sharding_runs speed   [--ranks 2,4] [--rounds 3] [--batches 40]

memory: one table ``--factor`` times the per-rank budget (plus three small ones) trains row-wise on
``--ranks`` ranks under ``--rank-memory-gib``; the table-wise run of the same flags is refused.
Prints each rank's peak RSS against the plan's bytes for it, and the peak RSS of the same run with
a 1,000-row table (what a rank holds besides its tables).

traffic: the Kaggle-shaped model (tables capped at ``--cap`` rows) under ``--sharding=auto``, fp32
against bf16 all-to-all, interleaved per round; per step: all-to-all bytes sent by all ranks, and
the share of rank 0's step spent in the all-to-all and in the gradients' all-reduce.

speed: the same model, ``--sharding=table`` against ``auto``, interleaved; samples/s from the
printed ms/it (median over the steps after the first 5 of every run) and end to end.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file by torchrun (rank mode)
    sys.path.insert(0, ROOT)

from bench.harness import KAGGLE_TABLE_SIZES  # noqa: E402

WARMUP = 5
TRAIN_LINE = re.compile(r"Finished training it \d+/\d+ of epoch \d+, ([\d.]+) ms/it")
GIB = 1 << 30


# --- the rank side -------------------------------------------------------------------------------


def rank_main(out_dir: str, flags: Sequence[str]) -> int:
    """Run ``dlrm_s_pytorch.main(flags)`` with the collectives timed; write this rank's JSON."""
    import torch.distributed as dist

    calls: Dict[str, List[List[float]]] = {"all_to_all_single": [], "all_reduce": []}

    def timed(name, original):
        def call(*args, **kwargs):
            start = time.perf_counter()
            result = original(*args, **kwargs)
            seconds = time.perf_counter() - start
            calls[name].append([seconds, _bytes_to_others(name, args, kwargs, dist)])
            return result
        return call

    for name in calls:
        setattr(dist, name, timed(name, getattr(dist, name)))
    import dlrm_s_pytorch

    code = dlrm_s_pytorch.main(list(flags))
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "code": code, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "calls": calls}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    return code


def _bytes_to_others(name, args, kwargs, dist) -> int:
    """Bytes this rank sends to the other ranks in one collective call."""
    if name == "all_reduce":
        tensor = args[0]
        return tensor.numel() * tensor.element_size()
    send = args[1] if len(args) > 1 else kwargs["input"]
    in_splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
    world, rank = dist.get_world_size(), dist.get_rank()
    own = in_splits[rank] if in_splits else send.numel() // world
    return (send.numel() - own) * send.element_size()


# --- the launcher side -----------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(ranks: int, flags: Sequence[str], timeout_s: int = 3600) -> Dict[str, object]:
    """One torchrun of ``ranks`` ranks; its stdout, exit code, wall time and every rank's record."""
    with tempfile.TemporaryDirectory(prefix="dlrm-shard-bench-") as out_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", os.path.abspath(__file__), "rank", out_dir, "--", *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        wall = time.perf_counter() - start
        records = []
        for path in sorted(glob.glob(os.path.join(out_dir, "rank*.json"))):
            with open(path) as f:
                records.append(json.load(f))
    records.sort(key=lambda r: r["rank"])
    return {"code": proc.returncode, "out": proc.stdout, "err": proc.stderr, "wall_s": wall, "ranks": records,
            "cmd": cmd}


def _check(result, what: str) -> None:
    if result["code"] != 0:
        tail = "\n".join(result["err"].splitlines()[-15:])
        raise SystemExit(f"error: {what} failed (exit {result['code']}):\n{tail}")


def step_ms(result) -> List[float]:
    """Rank 0's printed ms/it of every step after the first WARMUP."""
    return [float(x) for x in TRAIN_LINE.findall(result["out"])][WARMUP:]


def per_step(record, name: str, steps: int, total_steps: int) -> List[List[float]]:
    """(seconds, bytes) of collective ``name`` per training step of one rank, for the last ``steps``
    of the run's ``total_steps`` steps (every step makes the same calls: the all-to-all forward and
    backward, the gradients' all-reduce and the loss's)."""
    calls = record["calls"][name]
    calls_per_step = len(calls) // total_steps
    calls = calls[len(calls) - steps * calls_per_step:] if steps else []
    return [[sum(c[0] for c in calls[i:i + calls_per_step]), sum(c[1] for c in calls[i:i + calls_per_step])]
            for i in range(0, len(calls), calls_per_step)]


def kaggle_flags(cap: int, batch: int, batches: int) -> List[str]:
    sizes = "-".join(str(min(rows, cap)) for rows in KAGGLE_TABLE_SIZES)
    return [f"--arch-embedding-size={sizes}", "--arch-sparse-feature-size=16", "--arch-mlp-bot=13-512-256-64-16",
            "--arch-mlp-top=512-256-1", f"--mini-batch-size={batch}", f"--num-batches={batches}",
            "--num-indices-per-lookup=1", "--num-indices-per-lookup-fixed=True", "--print-time", "--print-freq=1",
            "--loss-function=bce", "--round-targets=True", f"--tensor-board-filename={tempfile.gettempdir()}/dlrm-tb"]


def _median_iqr(values: Sequence[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return f"{q[1]:.3g} (IQR {q[0]:.3g}-{q[2]:.3g})"


# --- memory ----------------------------------------------------------------------------------------


def bench_memory(args) -> None:
    from dlrm.shard.plan import TableSpec, human_bytes, plan_sharding, rank_totals

    dim = 64
    big_rows = int(args.factor * args.budget_gib * GIB / (dim * 4))
    small = [1000, 20000, 300]
    common = ["--arch-sparse-feature-size=64", "--arch-mlp-bot=13-64", "--arch-mlp-top=64-1", "--mini-batch-size=512",
              "--num-batches=20", "--num-indices-per-lookup=10", "--print-freq=10", f"--rank-memory-gib={args.budget_gib}",
              f"--tensor-board-filename={tempfile.gettempdir()}/dlrm-tb"]
    sizes = "-".join(str(r) for r in [big_rows] + small)
    print(f"table 0: {big_rows} rows x {dim} = {human_bytes(big_rows * dim * 4)}, "
          f"{big_rows * dim * 4 / (args.budget_gib * GIB):.2f}x the budget of {args.budget_gib} GiB per rank")
    refused = run(args.ranks, common + [f"--arch-embedding-size={sizes}"])
    print("table-wise:", next((line for line in refused["err"].splitlines() if line.startswith("error:")), "(ran)"))
    result = run(args.ranks, common + [f"--arch-embedding-size={sizes}", "--sharding=row", "--print-sharding-plan"])
    _check(result, "the row-wise run")
    print("\n".join(line for line in result["out"].splitlines() if not line.startswith("Finished")))
    base = run(args.ranks, common + [f"--arch-embedding-size={'-'.join(str(r) for r in [1000] + small)}",
                                     "--sharding=row"])
    _check(base, "the baseline run")
    bag = 10 / 2 + 1 / 20
    specs = [TableSpec(rows, dim, 512 * bag) for rows in [big_rows] + small]
    plan = plan_sharding(specs, args.ranks, "row", None, "sgd")
    totals = rank_totals(plan, specs, "sgd", False)
    print("| rank | plan bytes | peak RSS | peak RSS, 1,000-row table | difference |")
    print("|---|---|---|---|---|")
    for r, (rec, b) in enumerate(zip(result["ranks"], base["ranks"])):
        print(f"| {r} | {human_bytes(totals[r][0])} | {human_bytes(rec['peak_rss_bytes'])} | "
              f"{human_bytes(b['peak_rss_bytes'])} | {human_bytes(rec['peak_rss_bytes'] - b['peak_rss_bytes'])} |")
    print(f"wall: {result['wall_s']:.1f} s row-wise, {base['wall_s']:.1f} s baseline")


# --- traffic and speed -------------------------------------------------------------------------------


def interleaved(ranks: int, variants: Dict[str, List[str]], rounds: int) -> Dict[str, List[Dict[str, object]]]:
    """Every variant once per round, the order reversed in odd rounds."""
    names = list(variants)
    results: Dict[str, List[Dict[str, object]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            result = run(ranks, variants[name])
            _check(result, f"{name} at {ranks} ranks")
            results[name].append(result)
            print(f"  round {r}: {name}: median {statistics.median(step_ms(result)):.2f} ms/it", flush=True)
    return results


def bench_traffic(args) -> None:
    base = kaggle_flags(args.cap, args.batch, args.batches) + ["--sharding=auto"]
    for ranks in args.ranks:
        print(f"## {ranks} ranks: {shlex.join(base)}")
        results = interleaved(ranks, {p: base + [f"--a2a-precision={p}"] for p in ("fp32", "bf16")}, args.rounds)
        print("| a2a | ms/it | a2a bytes/step (all ranks) | a2a share of rank 0's step | all-reduce share |")
        print("|---|---|---|---|---|")
        for name, runs in results.items():
            ms, a2a_share, reduce_share, a2a_bytes = [], [], [], []
            for result in runs:
                steps = step_ms(result)
                ms += steps
                a2a0 = per_step(result["ranks"][0], "all_to_all_single", len(steps), args.batches)
                red0 = per_step(result["ranks"][0], "all_reduce", len(steps), args.batches)
                a2a_share += [a[0] * 1000 / s for a, s in zip(a2a0, steps)]
                reduce_share += [a[0] * 1000 / s for a, s in zip(red0, steps)]
                a2a_bytes.append(sum(per_step(rec, "all_to_all_single", len(steps), args.batches)[-1][1]
                                     for rec in result["ranks"]))
            print(f"| {name} | {_median_iqr(ms)} | {statistics.median(a2a_bytes) / 2**20:.3f} MiB | "
                  f"{statistics.median(a2a_share):.1%} | {statistics.median(reduce_share):.1%} |")


def bench_speed(args) -> None:
    base = kaggle_flags(args.cap, args.batch, args.batches)
    for ranks in args.ranks:
        print(f"## {ranks} ranks: {shlex.join(base)}")
        results = interleaved(ranks, {s: base + [f"--sharding={s}"] for s in ("table", "auto")}, args.rounds)
        medians = {}
        print("| sharding | ms/it | samples/s (printed) | samples/s end to end | wall s per run |")
        print("|---|---|---|---|---|")
        for name, runs in results.items():
            ms = [x for result in runs for x in step_ms(result)]
            medians[name] = statistics.median(ms)
            walls = [result["wall_s"] for result in runs]
            end_to_end = _end_to_end(runs, args.batch)
            print(f"| {name} | {_median_iqr(ms)} | {args.batch * 1000 / medians[name]:.0f} | {end_to_end:.0f} | "
                  f"{statistics.median(walls):.1f} |")
        ratios = [statistics.median(step_ms(a)) / statistics.median(step_ms(b))
                  for a, b in zip(results["table"], results["auto"])]
        print(f"table / auto ms/it: {medians['table'] / medians['auto']:.2f}x (per round {', '.join(f'{r:.2f}' for r in ratios)})")


def _end_to_end(runs, batch: int) -> float:
    """Samples/s from the summary line's training rate (training time, data included), median over runs."""
    rates = [float(m) for result in runs
             for m in re.findall(r"training ([\d.]+) samples/s", result["out"] + result["err"])]
    return statistics.median(rates) if rates else float("nan")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "rank":
        out_dir, flags = argv[1], argv[3:] if len(argv) > 2 and argv[2] == "--" else argv[2:]
        return rank_main(out_dir, flags)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["memory", "traffic", "speed"])
    parser.add_argument("--ranks", default=None, help="comma-separated rank counts (memory: one)")
    parser.add_argument("--budget-gib", type=float, default=0.5, help="memory: --rank-memory-gib")
    parser.add_argument("--factor", type=float, default=3.0, help="memory: the big table over the budget")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--cap", type=int, default=1_000_000, help="traffic, speed: rows per table at most")
    args = parser.parse_args(argv)
    default = "4" if args.what == "memory" else "2,4"
    args.ranks = [int(r) for r in (args.ranks or default).split(",")]
    if args.what == "memory":
        args.ranks = args.ranks[0]
        bench_memory(args)
    elif args.what == "traffic":
        bench_traffic(args)
    else:
        bench_speed(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
