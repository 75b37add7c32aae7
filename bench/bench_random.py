"""Benchmark: the reference's CPU configuration on random data, end to end.

Runs ``dlrm_s_pytorch.py`` as a user would, with ``--print-freq=1 --print-time``, and timestamps each
``Finished training it`` line as it arrives. The time between consecutive lines is one iteration end
to end (data generation + forward/backward/update + printing); the printed ms/it is the compute
part only (what the reference reports). Also times building the model (start to first line).

    python -m bench.bench_random                     # the reference's CPU benchmark: 8 x 1M x 64, batch 2048
    python -m bench.bench_random --iters 30 --repeats 3
    python -m bench.bench_random --kaggle-build      # time building the Kaggle-shaped model only
    python -m bench.bench_random --kaggle-step       # a Kaggle-model training step at batch 128
    python -m bench.bench_random --interleaved 10    # ours vs the reference's data generation, alternating
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_CPU = [
    "--mini-batch-size=2048", "--data-generation=random", "--arch-mlp-bot=512-512-64",
    "--arch-mlp-top=1024-1024-1024-1", "--arch-sparse-feature-size=64",
    "--arch-embedding-size=" + "-".join(["1000000"] * 8), "--num-indices-per-lookup=100",
    "--arch-interaction-op=dot", "--numpy-rand-seed=727", "--print-time",
]
KAGGLE_SIZES = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
                5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
LINE = re.compile(r"Finished training it (\d+)/\d+ of epoch \d+, ([\d.]+) ms/it")


def run_once(extra, iters):
    """One run; returns (seconds to the first line, [end-to-end s/it], [printed ms/it])."""
    cmd = [sys.executable, "dlrm_s_pytorch.py", *REFERENCE_CPU, f"--num-batches={iters}", "--print-freq=1", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, bufsize=1)
    stamps, printed = [], []
    for line in proc.stdout:
        m = LINE.search(line)
        if m:
            stamps.append(time.perf_counter())
            printed.append(float(m.group(2)))
    if proc.wait() != 0:
        raise SystemExit(f"benchmark run failed: {' '.join(cmd)}")
    first = stamps[0] - start
    e2e = [b - a for a, b in zip(stamps, stamps[1:])]
    return first, e2e, printed


def _kaggle_config():
    from dlrm.model import dlrm

    return dlrm, dlrm.ModelConfig(embedding_dim=16, table_sizes=tuple(KAGGLE_SIZES), bottom_mlp=(13, 512, 256, 64, 16),
                                  top_mlp=(dlrm.top_mlp_input_width("dot", False, 26, 16), 512, 256, 1))


def kaggle_step(steps, batch=128):
    """Milliseconds per training step of the Kaggle model (bce, SGD) on Criteo-shaped batches."""
    import numpy as np
    import torch

    dlrm, cfg = _kaggle_config()
    model = dlrm.DLRM(cfg, np.random.RandomState(123))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = dlrm.make_loss("bce")
    g = torch.Generator().manual_seed(0)
    offsets = torch.arange(batch).repeat(26, 1)
    times = []
    for _ in range(steps + 3):
        dense = torch.log(torch.randint(0, 100, (batch, 13), generator=g).float() + 1)
        indices = torch.stack([torch.randint(0, n, (batch,), generator=g) for n in KAGGLE_SIZES])
        labels = torch.randint(0, 2, (batch, 1), generator=g).float()
        t = time.perf_counter()
        loss = loss_fn(model(dense, offsets, indices), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return times[3:]


def interleaved(iters):
    """End-to-end ms/it of the reference CPU configuration, alternating iterations that generate the
    batch with our vectorised generator and with the reference's per-sample algorithm (same numbers,
    same training step), so that both see the same machine state. Returns (ours, reference-style)."""
    import numpy as np
    import torch

    from dlrm.model import dlrm
    from bench.bench_datagen import per_sample_batch
    from dlrm.common import Batch
    from dlrm.data.random import RandomDataConfig, generate_random_batch

    sizes = (1000000,) * 8
    cfg = dlrm.ModelConfig(embedding_dim=64, table_sizes=sizes, bottom_mlp=(512, 512, 64),
                           top_mlp=(dlrm.top_mlp_input_width("dot", False, 8, 64), 1024, 1024, 1024, 1))
    model = dlrm.DLRM(cfg, np.random.RandomState(727))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = dlrm.make_loss("mse")
    data = RandomDataConfig(dense_dim=512, table_sizes=sizes, num_indices_per_lookup=100, batch_size=2048)
    rng = np.random.RandomState(727)

    def ours():
        return generate_random_batch(rng, 2048, data)

    def reference_style():
        dense, offsets, indices, labels = per_sample_batch(rng, 2048, data)
        return Batch(torch.from_numpy(dense), torch.tensor(offsets), [torch.from_numpy(i) for i in indices],
                          torch.from_numpy(labels))

    times = {ours: [], reference_style: []}
    for i in range(2 * iters + 2):
        make = ours if i % 2 == 0 else reference_style
        t = time.perf_counter()
        batch = make()
        loss = loss_fn(model(batch.dense_x, batch.offsets, batch.indices), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times[make].append(time.perf_counter() - t)
    return times[ours], times[reference_style]


def kaggle_build(repeats):
    """Seconds to build the Kaggle-shaped model (26 tables, 33.8M rows, dim 16)."""
    import numpy as np

    dlrm, cfg = _kaggle_config()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model = dlrm.DLRM(cfg, np.random.RandomState(123))
        times.append(time.perf_counter() - t)
        del model
    return times


def summary(values, scale=1.0, unit=""):
    v = sorted(x * scale for x in values)
    q = statistics.quantiles(v, n=4) if len(v) >= 4 else [v[0], statistics.median(v), v[-1]]
    return f"median {statistics.median(v):.1f}{unit} (IQR {q[0]:.1f}-{q[2]:.1f}, min {v[0]:.1f}, max {v[-1]:.1f}, n={len(v)})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20, help="iterations per run (the first is dropped)")
    ap.add_argument("--repeats", type=int, default=2, help="runs")
    ap.add_argument("--kaggle-build", action="store_true", help="only time building the Kaggle-shaped model")
    ap.add_argument("--kaggle-step", action="store_true", help="only time Kaggle-model training steps at batch 128")
    ap.add_argument("--interleaved", type=int, default=0, metavar="N",
                    help="N iterations each of ours and of reference-style data generation, alternating")
    ap.add_argument("extra", nargs="*", help="extra flags for dlrm_s_pytorch.py (after --)")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    if args.kaggle_build:
        print("Kaggle-shaped model build:", summary(kaggle_build(args.repeats), unit=" s"))
        return
    if args.interleaved:
        mine, ref = interleaved(args.interleaved)
        print("end to end, our data generation:", summary(mine, 1000, " ms"))
        print("end to end, reference-style data generation:", summary(ref, 1000, " ms"))
        return
    if args.kaggle_step:
        print("Kaggle model training step, batch 128:", summary(kaggle_step(args.iters), 1000, " ms"))
        return
    firsts, e2e, printed = [], [], []
    for _ in range(args.repeats):
        f, e, p = run_once(args.extra, args.iters)
        firsts.append(f)
        e2e += e[1:]  # drop the first (warm-up) interval
        printed += p[2:]
    print("start-up to first line:", summary(firsts, unit=" s"))
    print("end to end per iteration:", summary(e2e, 1000, " ms"))
    print("printed compute ms/it:", summary(printed, unit=" ms"))


if __name__ == "__main__":
    main()
