"""Benchmark: random-batch generation, ours against the reference's per-sample algorithm.

Both draw exactly the same numbers (tests/test_random.py checks that); this times one batch of the
reference's CPU benchmark configuration (batch 2048, dense 512, 8 tables of 1M rows, up to 100
indices per bag) with each.

    python -m bench.bench_datagen [--batches 10]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from dlrm.data.random import RandomDataConfig, generate_random_batch


def per_sample_batch(rng, n, cfg):
    """The reference's algorithm: NumPy calls per sample and per table."""
    dense = rng.rand(n, cfg.dense_dim).astype(np.float32)
    offsets, indices = [], []
    for size in cfg.table_sizes:
        table_offsets, table_indices, count = [], [], 0
        for _ in range(n):
            r = rng.random(1)
            bag = int(np.round(max(1.0, r[0] * min(size, cfg.num_indices_per_lookup))))
            values = np.unique(np.round(rng.random(bag) * (size - 1)).astype(np.int64))
            table_offsets.append(count)
            count += values.size
            table_indices.append(values)
        offsets.append(table_offsets)
        indices.append(np.concatenate(table_indices))
    return dense, offsets, indices, rng.rand(n, 1).astype(np.float32)


def timed(fn, batches):
    times = []
    for _ in range(batches):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=10)
    args = ap.parse_args()
    cfg = RandomDataConfig(dense_dim=512, table_sizes=(1000000,) * 8, num_indices_per_lookup=100, batch_size=2048)
    rng = np.random.RandomState(727)
    for name, fn in (("vectorised (ours)", lambda: generate_random_batch(rng, 2048, cfg)),
                     ("per-sample (reference algorithm)", lambda: per_sample_batch(rng, 2048, cfg))):
        t = timed(fn, args.batches)
        print(f"{name}: median {statistics.median(t):.1f} ms/batch (min {min(t):.1f}, max {max(t):.1f}, n={len(t)})")


if __name__ == "__main__":
    main()
