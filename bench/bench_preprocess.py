"""Benchmark the Kaggle preprocessing (data_utils.preprocess_criteo): raw train.txt to the final
concatenated npz, on a fake Criteo file (dlrm/data/criteo/fake.py).

Each repeat runs in a fresh Python process on a fresh directory (the raw file hard-linked in),
and reports the wall time of preprocess_criteo alone (imports excluded), raw lines per second and
the process's peak RSS (VmHWM; worker processes of --multiprocessing not included), next to the
RSS right after the imports.

    python -m bench.bench_preprocess [--lines 2000000] [--repeats 5] [--workdir /tmp/dlrm_bench_pre]
                                     [--multiprocessing] [--memory-map]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_CHILD = r"""
import json, time
from dlrm.data.criteo.config import PreprocessConfig
from dlrm.data.criteo.preprocess import preprocess_criteo

def high_water_kb():  # VmHWM: peak RSS of this process image (ru_maxrss survives exec)
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1])

base = high_water_kb()
cfg = PreprocessConfig("kaggle", {raw!r}, progress=False, multiprocessing={mp}, memory_map={mm})
start = time.perf_counter()
preprocess_criteo(cfg, lambda message: None)
seconds = time.perf_counter() - start
print(json.dumps(dict(seconds=seconds, import_rss_kb=base, peak_rss_kb=high_water_kb())))
"""


def ensure_raw(workdir: str, lines: int, seed: int) -> str:
    """Generate (once) a fake Kaggle train.txt of ``lines`` lines; return its path."""
    raw_dir = os.path.join(workdir, f"raw_{lines}_{seed}")
    raw = os.path.join(raw_dir, "train.txt")
    if not os.path.exists(raw):
        from dlrm.data.criteo.fake import write_fake_kaggle

        start = time.perf_counter()
        write_fake_kaggle(raw, lines, seed)
        print(f"generated {raw} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return raw


def run_once(raw: str, workdir: str, mp: bool, mm: bool) -> dict:
    run_dir = os.path.join(workdir, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    target = os.path.join(run_dir, "train.txt")
    os.link(raw, target)
    subprocess.run(["sync"], check=False)  # start each repeat without pending writeback
    code = _CHILD.format(raw=target, mp=mp, mm=mm)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["disk_bytes"] = sum(os.path.getsize(os.path.join(run_dir, f)) for f in os.listdir(run_dir)
                               if f != "train.txt")
    shutil.rmtree(run_dir)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/dlrm_bench_preprocess")
    parser.add_argument("--multiprocessing", action="store_true")
    parser.add_argument("--memory-map", action="store_true")
    args = parser.parse_args(argv)
    raw = ensure_raw(args.workdir, args.lines, args.seed)
    results = []
    for k in range(args.repeats):
        result = run_once(raw, args.workdir, args.multiprocessing, args.memory_map)
        result["lines_per_s"] = args.lines / result["seconds"]
        results.append(result)
        print(json.dumps(result), file=sys.stderr)
    rates = [r["lines_per_s"] for r in results]
    seconds = [r["seconds"] for r in results]
    peaks = [r["peak_rss_kb"] / 1024 for r in results]
    print(f"lines={args.lines} repeats={args.repeats} multiprocessing={args.multiprocessing} "
          f"memory_map={args.memory_map}")
    print(f"seconds: median {statistics.median(seconds):.2f} (min {min(seconds):.2f}, "
          f"max {max(seconds):.2f})")
    print(f"lines/s: median {statistics.median(rates):,.0f} (min {min(rates):,.0f}, "
          f"max {max(rates):,.0f})")
    print(f"peak RSS MiB: median {statistics.median(peaks):.0f} (min {min(peaks):.0f}, "
          f"max {max(peaks):.0f}); after imports {results[0]['import_rss_kb'] / 1024:.0f}")
    print(f"output bytes on disk: {results[0]['disk_bytes']:,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
