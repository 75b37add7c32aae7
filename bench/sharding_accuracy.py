"""Benchmark: what a bf16 or fp16 all-to-all does to the loss, accuracy and AUC of a Kaggle-shaped run.

Fake Criteo Kaggle lines (``dlrm.data.criteo.fake``) carry random labels, so nothing could be
learned from them. Here the labels are planted instead: a line's label is drawn with probability
sigmoid(s), s the sum of a fixed pseudo-random effect of each of eight categorical values
(``zlib.crc32`` of column and value, so the same value always has the same effect) and one dense
count, shifted to about 30% positives (Criteo has 26%). The model (the Kaggle benchmark's: 26
tables, dim 16, bottom 13-512-256-64-16, top 512-256-1, bce, lr 0.1, batch 128) can learn that, and
the fp32, bf16 and fp16 all-to-alls of the same sharded run then train to measurably different
numbers.

    python -m bench.sharding_accuracy [--lines 400000] [--ranks 2] [--sharding auto]
        [--model-seeds 123,1,2] [--dir DIR]

For each model seed (``--numpy-rand-seed``: the initial model; the data and its order are the same
for all runs), prints each precision's training loss (the mean of the last ten printed), the last
test's accuracy and AUC (``--mlperf-logging``) and their differences from that seed's fp32 run,
then the spread of the fp32 AUC over the seeds.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.sharding_runs import run  # noqa: E402
from dlrm.data.criteo.fake import write_fake_kaggle  # noqa: E402
from dlrm.io.atomic import atomic_open  # noqa: E402

PLANTED_COLUMNS = (0, 1, 4, 6, 7, 12, 14, 17)  # categorical columns with enough repeats to learn from
SHIFT = -2.2  # 31.6% positives on 400,000 fake lines of seed 0


def _effect(column: int, value: str) -> float:
    """A fixed effect in [-1.5, 1.5) of one categorical value (0 for a missing one)."""
    if not value:
        return 0.0
    return (zlib.crc32(f"{column}:{value}".encode()) % 3000) / 1000.0 - 1.5


def plant_labels(path: str, seed: int) -> float:
    """Rewrite ``path``'s labels as described above; the share of positives."""
    rng = np.random.default_rng(seed)
    with open(path) as f:
        lines = f.read().splitlines()
    draws = rng.random(len(lines))
    positives = 0
    with atomic_open(path, "w") as out:
        for line, u in zip(lines, draws):
            fields = line.split("\t")
            score = SHIFT + sum(_effect(c, fields[14 + c]) for c in PLANTED_COLUMNS)
            count = fields[2]  # I2
            score += 0.3 * math.log1p(max(int(count), 0)) if count else 0.0
            label = int(u < 1 / (1 + math.exp(-score)))
            positives += label
            out.write(f"{label}\t" + "\t".join(fields[1:]) + "\n")
    return positives / max(len(lines), 1)


def model_flags(data_dir: str) -> list:
    return ["--arch-sparse-feature-size=16", "--arch-mlp-bot=13-512-256-64-16", "--arch-mlp-top=512-256-1",
            "--data-generation=dataset", "--data-set=kaggle", f"--raw-data-file={data_dir}/train.txt",
            f"--processed-data-file={data_dir}/kaggleAdDisplayChallenge_processed.npz", "--loss-function=bce",
            "--round-targets=True", "--learning-rate=0.1", "--mini-batch-size=128", "--print-freq=256",
            "--test-freq=1024", "--test-mini-batch-size=4096", "--mlperf-logging",
            f"--mlperf-log-file={data_dir}/dlrm.log",
            f"--tensor-board-filename={data_dir}/tb"]


METRICS_LINE = re.compile(r"auc (\d+\.\d+), best auc [\d.]+, accuracy +([\d.]+) %")


def last_numbers(out: str):
    """(mean of the last ten printed training losses, the last test's accuracy % and AUC)."""
    train = [float(x) for x in re.findall(r"^Finished training it .* loss (\d+\.\d+)", out, re.M)]
    metrics = METRICS_LINE.findall(out)
    if not train or not metrics:
        raise SystemExit(f"error: no training or test lines in the output:\n{out[-2000:]}")
    auc, acc = metrics[-1]
    return sum(train[-10:]) / len(train[-10:]), float(acc), float(auc)


PRECISIONS = ("fp32", "bf16", "fp16")


def print_table(results, model_seeds) -> None:
    """One row per model seed and precision, with the differences from that seed's fp32 run, then
    the spread of fp32 itself over the seeds (what a difference has to beat to mean anything)."""
    print("| seed | a2a | training loss (last 10 lines) | - fp32 | test accuracy % | - fp32 | test AUC | - fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for seed in model_seeds:
        loss0, acc0, auc0 = results[seed, "fp32"]
        for precision in PRECISIONS:
            loss, acc, auc = results[seed, precision]
            print(f"| {seed} | {precision} | {loss:.6f} | {loss - loss0:+.6f} | {acc:.3f} | {acc - acc0:+.3f} | "
                  f"{auc:.4f} | {auc - auc0:+.4f} |")
    aucs = [results[seed, "fp32"][2] for seed in model_seeds]
    print(f"fp32 AUC over the seeds: {min(aucs):.4f} to {max(aucs):.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=400_000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--sharding", default="auto")
    parser.add_argument("--dir", default=None, help="where the data goes (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0, help="the fake data's seed")
    parser.add_argument("--model-seeds", default="123,1,2", help="--numpy-rand-seed of the runs, comma-separated")
    args = parser.parse_args(argv)
    args.model_seeds = [int(x) for x in args.model_seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="dlrm-a2a-acc-") as tmp:
        data_dir = args.dir or tmp
        os.makedirs(data_dir, exist_ok=True)
        raw = os.path.join(data_dir, "train.txt")
        if not os.path.exists(os.path.join(data_dir, "kaggleAdDisplayChallenge_processed.npz")):
            write_fake_kaggle(raw, args.lines, args.seed)
            print(f"planted labels: {plant_labels(raw, args.seed):.1%} positives", flush=True)
            prep = run(1, model_flags(data_dir) + ["--num-batches=1"])  # preprocess once, in one process
            if prep["code"] != 0:
                raise SystemExit(f"error: preprocessing failed:\n{prep['err'][-2000:]}")
        results = {}
        for model_seed in args.model_seeds:
            for precision in PRECISIONS:
                flags = model_flags(data_dir) + [f"--sharding={args.sharding}", f"--a2a-precision={precision}",
                                                 f"--numpy-rand-seed={model_seed}"]
                result = run(args.ranks, flags)
                if result["code"] != 0:
                    raise SystemExit(f"error: the {precision} run failed:\n{result['err'][-2000:]}")
                results[model_seed, precision] = last_numbers(result["out"])
                print(f"seed {model_seed}, {precision}: {results[model_seed, precision]} ({result['wall_s']:.0f} s)",
                      flush=True)
    print_table(results, args.model_seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
