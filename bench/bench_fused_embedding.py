"""Benchmark: plain per-table EmbeddingBag(sparse=True) + torch.optim.SGD against FusedTables, interleaved.

Both run in one process on the same batches, alternating every iteration (and alternating which of
the two goes first), so the VM's slow and fast moments hit both alike. A timed step is
forward + loss + backward + update: for the plain path ``zero_grad``, forward, backward and
``optimizer.step()``; for the fused path forward and backward (the update happens inside backward).
Because both train on the same batches at the same learning rate, the tables must stay
bit-identical; the script checks that at the end and fails otherwise.

Cases:
    a: 8 tables x 1,000,000 rows, D=64, batch 2048, 100 indices per bag (204,800 lookups per table)
    b: the 26 Kaggle-shaped tables (33.8M rows), D=16, batch 128, one index per bag

Usage:
    python -m bench.bench_fused_embedding [--case a|b|both] [--iters 20] [--warmup 3]
        [--threads 2] [--backend auto|cpp|torch]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from dlrm.model import fused_embedding as fe

KAGGLE_TABLE_SIZES = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                      14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)
CASES = {
    "a": dict(sizes=(1_000_000,) * 8, dim=64, batch=2048, per_bag=100, iters=20, warmup=3),
    "b": dict(sizes=KAGGLE_TABLE_SIZES, dim=16, batch=128, per_bag=1, iters=400, warmup=40),
}


def build(sizes: Sequence[int], dim: int, backend: str, lr: float):
    """The plain tables (with their SGD) and a FusedTables holding copies of the same weights."""
    gen = torch.Generator().manual_seed(0)
    weights = []
    for rows in sizes:
        bound = (1.0 / rows) ** 0.5
        weights.append(torch.empty(rows, dim).uniform_(-bound, bound, generator=gen))
    plain = nn.ModuleList(nn.EmbeddingBag(r, dim, mode="sum", sparse=True, _weight=w) for r, w in zip(sizes, weights))
    optimizer = torch.optim.SGD(plain.parameters(), lr=lr)
    fused = fe.FusedTables.from_weights(weights, lr=lr, backend=backend, log=print)
    return plain, optimizer, fused


def make_batch(gen: torch.Generator, sizes: Sequence[int], batch: int, per_bag: int):
    """Draw a batch's offsets (T, B) and indices (T, B * per_bag), uniform over each table."""
    offsets = (torch.arange(batch) * per_bag).repeat(len(sizes), 1)
    indices = torch.stack([torch.randint(0, r, (batch * per_bag,), generator=gen) for r in sizes])
    return offsets, indices


def plain_step(plain, optimizer, offsets, indices, grads) -> Tuple[float, float]:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    out = [table(indices[t], offsets[t]) for t, table in enumerate(plain)]
    middle = time.perf_counter()
    sum((o * g).sum() for o, g in zip(out, grads)).backward()
    optimizer.step()
    return middle - start, time.perf_counter() - middle


def fused_step(fused, offsets, indices, grads) -> Tuple[float, float]:
    start = time.perf_counter()
    out = fused(offsets, indices)
    middle = time.perf_counter()
    sum((o * g).sum() for o, g in zip(out, grads)).backward()
    return middle - start, time.perf_counter() - middle


def summary(values_s: List[float]) -> Dict[str, float]:
    ms = sorted(v * 1e3 for v in values_s)
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return dict(median=statistics.median(ms), q1=q[0], q3=q[2], min=ms[0], n=len(ms))


def run_case(name: str, iters: int, warmup: int, backend: str) -> None:
    case = CASES[name]
    sizes, dim, batch, per_bag = case["sizes"], case["dim"], case["batch"], case["per_bag"]
    lr = 0.01
    t0 = time.perf_counter()
    plain, optimizer, fused = build(sizes, dim, backend, lr)
    print(f"case {name}: {len(sizes)} tables, {sum(sizes):,} rows, D={dim}, batch {batch}, {per_bag} per bag; "
          f"built in {time.perf_counter() - t0:.1f} s; fused backends {sorted(set(fused.backends))}")
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(batch, dim, generator=gen) for _ in sizes]
    with torch.no_grad():  # the lookups, bit for bit, before any timing
        offsets, indices = make_batch(gen, sizes, batch, per_bag)
        same = all(torch.equal(table(indices[t], offsets[t]), y)
                   for t, (table, y) in enumerate(zip(plain, fused(offsets, indices))))
    print(f"  outputs bit-identical: {same}")
    times = {"plain": ([], []), "fused": ([], [])}
    for it in range(warmup + iters):
        offsets, indices = make_batch(gen, sizes, batch, per_bag)
        order = ("plain", "fused") if it % 2 == 0 else ("fused", "plain")
        for which in order:
            if which == "plain":
                fwd, bwd = plain_step(plain, optimizer, offsets, indices, grads)
            else:
                fwd, bwd = fused_step(fused, offsets, indices, grads)
            if it >= warmup:
                times[which][0].append(fwd)
                times[which][1].append(bwd)
    exact = all(torch.equal(p.weight, fused.table_weight(t)) for t, p in enumerate(plain))
    print(f"  tables bit-identical after {warmup + iters} steps: {exact}")
    rows = {}
    for which, (fwd, bwd) in times.items():
        total = [f + b for f, b in zip(fwd, bwd)]
        rows[which] = (summary(total), summary(fwd), summary(bwd))
    print(f"  {'path':6} {'step median':>12} {'IQR':>17} {'min':>8} | {'fwd med':>8} {'bwd+upd med':>11}"
          f"  (ms, n={iters})")
    for which, (tot, fwd, bwd) in rows.items():
        print(f"  {which:6} {tot['median']:12.3f} {tot['q1']:8.3f}-{tot['q3']:<8.3f} {tot['min']:8.3f} | "
              f"{fwd['median']:8.3f} {bwd['median']:11.3f}")
    ratio = rows["plain"][0]["median"] / rows["fused"][0]["median"]
    print(f"  plain / fused (step medians): {ratio:.1f}x")
    if not (exact and same):
        raise SystemExit("the fused tables differ from the plain ones")
    del plain, optimizer, fused


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["a", "b", "both"], default="both")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default: 20 for a, 400 for b)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: 3 / 40)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--backend", choices=["auto", "cpp", "torch"], default="auto")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    available, reason, seconds = fe.extension_status()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, load average {load:.1f}; extension "
          f"{'loaded' if available else 'unavailable: ' + reason} in {seconds:.1f} s")
    for name in ("a", "b") if args.case == "both" else (args.case,):
        case = CASES[name]
        run_case(name, args.iters or case["iters"], case["warmup"] if args.warmup is None else args.warmup,
                 args.backend)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
