"""Benchmark: milliseconds per training batch of the Kaggle-shaped Criteo loaders (criteo_data.py).

Writes a processed Kaggle-like data set of ``--rows`` samples (random values, the real Kaggle table
sizes) in the preprocessing's formats: the all-days processed npz, the day and feature
counts and the seven reordered day files, twice: uncompressed as data_utils.py writes them (read in
place) and compressed as the reference writes them (read through a row cache). Then, for each, in
the in-memory mode (randomize total and none) and the memory-map mode, it builds the loaders with
``make_criteo_data_and_loaders`` and times ``--batches`` batches of the train loader (batch
``--batch-size``, main process) per repeat.

Usage:
    python -m bench.bench_loader [--rows 2000000] [--batch-size 128] [--batches 2000]
        [--repeats 7] [--data-dir bench/out/loader] [--results bench/out/results_loader.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Dict, List

import numpy as np
import torch

from dlrm.data.criteo import loaders as criteo_data
from dlrm.data.criteo.config import PreprocessConfig
from dlrm.io.atomic import atomic_open
from dlrm.io.npz import save_npz

KAGGLE_TABLE_SIZES = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593,
                      3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105,
                      142572)


def write_fake_processed(data_dir: str, rows: int, compressed: bool,
                         seed: int = 0) -> Dict[str, str]:
    """Write processed-format Kaggle files for ``rows`` samples; returns raw and processed paths.

    compressed: np.savez_compressed with float64 X_cat (the reference's files), else np.savez with
    data_utils.py's dtypes (int32, and float64 X_int / y in the reordered files).
    """
    os.makedirs(data_dir, exist_ok=True)
    raw = os.path.join(data_dir, "train.txt")
    processed = os.path.join(data_dir, "kaggleAdDisplayChallenge_processed.npz")
    if os.path.exists(processed):
        return {"raw": raw, "processed": processed}
    gen = np.random.default_rng(seed)
    counts = np.array(KAGGLE_TABLE_SIZES, dtype=np.int32)
    day_sizes = [rows // 7 + (1 if d < rows % 7 else 0) for d in range(7)]
    x_int = np.floor(np.exp(gen.normal(1.5, 1.5, size=(rows, 13)))).astype(np.int32)
    x_cat = np.floor(gen.random((rows, 26)) * counts).astype(np.float64 if compressed else np.int32)
    y = (gen.random(rows) < 0.25).astype(np.int32)
    stem = os.path.join(data_dir, "train")
    save_npz(stem + "_day_count.npz", compressed=True, total_per_file=np.array(day_sizes))
    save_npz(stem + "_fea_count.npz", compressed=True, counts=counts)
    bounds = np.cumsum([0] + day_sizes)
    for day in range(7):
        part = slice(bounds[day], bounds[day + 1])
        save_npz(f"{stem}_day_{day}_reordered.npz", compressed=compressed,
                 X_int=x_int[part].astype(np.float64), X_cat=x_cat[part], y=y[part].astype(np.float64))
    save_npz(processed, compressed=compressed, X_cat=x_cat, X_int=x_int, y=y, counts=counts)
    return {"raw": raw, "processed": processed}


def remove_caches(data_dir: str) -> None:
    for name in os.listdir(data_dir):
        if name.endswith(".rows.npy"):
            os.remove(os.path.join(data_dir, name))


def time_batches(loader, batches: int) -> float:
    """Milliseconds per batch over the first ``batches`` batches of a fresh iterator."""
    iterator = iter(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return 1000 * (time.perf_counter() - start) / batches


def time_random_access(dataset, batches: int, seed: int = 0) -> float:
    """Milliseconds per batch reading ``batches`` batches of a batch dataset in random order."""
    order = np.random.RandomState(seed).randint(0, len(dataset), size=batches)
    start = time.perf_counter()
    for k in order:
        dataset[int(k)]
    return 1000 * (time.perf_counter() - start) / batches


def reference_collate(samples):
    """The reference's collate on per-sample tuples, for context only."""
    dense, sparse, labels = zip(*samples)
    dense_x = torch.log(torch.tensor(np.array(dense), dtype=torch.float) + 1)
    indices = torch.tensor(np.array(sparse), dtype=torch.long).t()
    offsets = torch.stack([torch.tensor(range(len(samples)))] * indices.shape[0])
    return dense_x, offsets, indices, torch.tensor(labels, dtype=torch.float32).view(-1, 1)


def measure_mode(name: str, cfg, data_dir: str, args) -> List[Dict[str, str]]:
    """Cold/warm construction and per-batch times of one loader configuration."""
    remove_caches(data_dir)
    quiet = lambda _: None  # noqa: E731
    start = time.perf_counter()
    criteo_data.make_criteo_data_and_loaders(cfg, np.random.RandomState(123), quiet)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    data = criteo_data.make_criteo_data_and_loaders(cfg, np.random.RandomState(123), quiet)
    warm = time.perf_counter() - start
    results = []
    sequential = [time_batches(data.train_loader, args.batches) for _ in range(args.repeats)]
    results.append(_row(name, "train loader, in order", sequential, cold, warm))
    random_order = [time_random_access(data.train_loader.dataset, args.batches, seed)
                    for seed in range(args.repeats)]
    results.append(_row(name, "batch dataset, random batch order", random_order))
    return results


def _row(mode: str, access: str, times: List[float], cold=None, warm=None) -> Dict[str, str]:
    return {"mode": mode, "access": access, "median": f"{statistics.median(times):.3f}",
            "spread": f"{min(times):.3f}-{max(times):.3f}",
            "build": "" if cold is None else f"{cold:.1f} s / {warm:.2f} s"}


def measure_per_sample(cfg, args) -> Dict[str, str]:
    """For context: per-sample indexing plus the reference's collate (the reference's approach)."""
    data = criteo_data.make_criteo_data_and_loaders(cfg, np.random.RandomState(123), lambda _: None)
    loader = torch.utils.data.DataLoader(data.train_data, batch_size=args.batch_size,
                                         collate_fn=reference_collate)
    batches = max(1, args.batches // 10)
    return _row("in-memory, per-sample + reference collate", "train loader, in order",
                [time_batches(loader, batches) for _ in range(3)])


def loader_config(data: PreprocessConfig, batch_size: int) -> criteo_data.CriteoLoaderConfig:
    return criteo_data.CriteoLoaderConfig(preprocess=data, batch_size=batch_size,
                                          test_batch_size=16384)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with open("/proc/cpuinfo") as info:
        names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    cpu = names[0] if names else cpu
    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, "
            f"torch {torch.__version__}, numpy {np.__version__}, torch threads "
            f"{torch.get_num_threads()}")


def write_results(path: str, args, rows: List[Dict[str, str]]) -> None:
    lines = ["# Criteo loader benchmark (criteo_data.py)", "",
             f"Machine: {machine()}", "",
             f"Command: `python -m bench.bench_loader --rows {args.rows} --batch-size "
             f"{args.batch_size} --batches {args.batches} --repeats {args.repeats}`", "",
             f"Data: {args.rows} Kaggle-shaped samples (random values, real Kaggle table sizes), "
             f"processed npz + 7 reordered day files, written uncompressed as data_utils.py does "
             f"(mapped in place) and compressed as the reference does (read through row caches). "
             f"Batch {args.batch_size}, main "
             f"process (num_workers=0). Times are ms per batch over {args.batches} batches, median "
             f"and min-max over {args.repeats} repeats; the files sit in the page cache (just written). "
             "Build = first construction (writes the row caches of compressed files) / later "
             "construction; both check every value once, as for any file without a provenance "
             "record.", "",
             "| mode | access | ms/batch median | spread (min-max) | build cold / warm |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['access']} | {r['median']} | {r['spread']} | {r['build']} |"
              for r in rows]
    worst = max(float(r["median"]) for r in rows if "per-sample" not in r["mode"])
    lines += ["", f"Load average (1 min) before / after: {args.load_before:.2f} / "
              f"{os.getloadavg()[0]:.2f} (other jobs shared the machine; spreads reflect that).",
              "", f"The slowest median of the batch loaders is {worst:.3f} ms, so loading stays "
              f"under 10% of any training step longer than {10 * worst:.2f} ms. The last row (one "
              "sample at a time, then the reference's collate) is for context only."]
    with atomic_open(path, "w") as out:
        out.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data-dir", default="bench/out/loader")
    parser.add_argument("--results", default="bench/out/results_loader.md", help="where to write the table (copy it into bench/RESULTS.md)")
    args = parser.parse_args(argv)
    args.load_before = os.getloadavg()[0]
    modes = [("in-memory, randomize total", dict(randomize="total")),
             ("in-memory, randomize none", dict(randomize="none")),
             ("memory-map", dict(memory_map=True))]
    rows, in_place = [], None
    for layout, compressed in (("in place", False), ("compressed, row cache", True)):
        data_dir = os.path.join(args.data_dir, "compressed" if compressed else "uncompressed")
        files = write_fake_processed(data_dir, args.rows, compressed)
        data = dict(data_set="kaggle", raw_data_file=files["raw"],
                    processed_data_file=files["processed"], progress=False)
        in_place = in_place or data
        for name, extra in modes:
            cfg = loader_config(PreprocessConfig(**data, **extra), args.batch_size)
            rows += measure_mode(f"{layout}: {name}", cfg, data_dir, args)
            print(rows[-2], rows[-1], sep="\n", flush=True)
    cfg = loader_config(PreprocessConfig(**in_place, randomize="total"), args.batch_size)
    rows.append(measure_per_sample(cfg, args))
    print(rows[-1])
    write_results(args.results, args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
