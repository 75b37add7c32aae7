"""Benchmark harness: named configurations, two variants interleaved, and where the step's time goes.

Each run is ``dlrm_s_pytorch.py`` as a user runs it (a subprocess, so another checkout's script can be
measured too), with ``--print-time --print-freq=1 --num-batches=K``. Every ``Finished training it``
line is timestamped as it arrives. Per variant, over all its runs, after the first ``--warmup`` lines
of each run:

- ms/it: the printed per-iteration compute time (forward, backward, optimizer), median and IQR;
- samples/s: batch / median ms/it (compute only) and batch / median line gap (end to end);
- data ms/it: the wall time between two consecutive lines minus that iteration's compute (loading
  the batch, moving it, printing the line);
- start-up (to the first line), whole-run wall time and peak RSS of the child;
- GFLOP per step (see :func:`step_flops`), achieved GFLOP/s and its share of the measured peak;
- embedding bytes per step (see :func:`embedding_traffic`) and their rate against the measured
  copy bandwidth.

Two variants (``--a``/``--b`` flag sets, ``--script-a``/``--script-b`` checkouts) run interleaved:
round r runs A then B (B then A in odd rounds), each a short run, so both see the same machine.
The speed-up is median(A) / median(B) over the pooled iterations, with the per-round ratios as the
spread. At start-up the harness measures this machine's GEMM peak (fp32 and bf16, a few shapes,
best of several) and memory bandwidth (a large copy, and a random-row gather) and stores them in
the JSON.

    python -m bench.harness --configs cpu-benchmark,kaggle-128 \\
        --a "--embedding-backend=plain" --b "--embedding-backend=fused" \\
        --json /tmp/ab.json --markdown /tmp/ab.md
    python -m bench.harness --configs kaggle-128 --script-b /other/checkout/dlrm_s_pytorch.py
    python -m bench.harness --configs cpu-benchmark --threads 1 ...   # one thread per process: steadier on a shared VM
    python -m bench.harness --quick --configs tiny   # a few seconds; what the tests run

Configurations (``--list`` prints their flags): cpu-benchmark, kaggle-128, kaggle-2048,
mlperf-scaled (the MLPerf model with every table capped at 2,000,000 rows: 13.1M rows x 128 x 4 B
= 6.3 GiB of tables, 12.5 GiB even with a per-value optimizer state such as Adagrad's), tiny.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_SCRIPT = os.path.join(ROOT, "dlrm_s_pytorch.py")
KAGGLE_TABLE_SIZES = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                      14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)
# Criteo Terabyte's per-feature cardinalities with categories hashed below 40M (the MLPerf setting).
MLPERF_TABLE_SIZES = (39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
                      2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36)
MLPERF_ROW_CAP = 2_000_000


def _dashes(values: Sequence[int]) -> str:
    return "-".join(str(v) for v in values)


@dataclass(frozen=True)
class BenchConfig:
    """A named configuration: the CLI flags, iterations per run and how many to drop as warm-up."""

    name: str
    flags: Tuple[str, ...]
    num_batches: int
    warmup: int
    note: str = ""


KAGGLE_MODEL_FLAGS = (
    f"--arch-embedding-size={_dashes(KAGGLE_TABLE_SIZES)}", "--arch-sparse-feature-size=16",
    "--arch-mlp-bot=13-512-256-64-16", "--arch-mlp-top=512-256-1", "--arch-interaction-op=dot",
    "--num-indices-per-lookup=1", "--num-indices-per-lookup-fixed=true")
"""The Kaggle-shaped model and the shape of its random data (one index per bag)."""


def _kaggle_flags(batch: int) -> Tuple[str, ...]:
    return ("--data-generation=random", *KAGGLE_MODEL_FLAGS, "--loss-function=bce", "--round-targets=true",
            "--learning-rate=0.1", f"--mini-batch-size={batch}", "--numpy-rand-seed=727")


CONFIGS: Dict[str, BenchConfig] = {c.name: c for c in (
    BenchConfig("cpu-benchmark", (
        "--mini-batch-size=2048", "--data-generation=random", "--arch-mlp-bot=512-512-64",
        "--arch-mlp-top=1024-1024-1024-1", "--arch-sparse-feature-size=64",
        f"--arch-embedding-size={_dashes((1000000,) * 8)}", "--num-indices-per-lookup=100",
        "--arch-interaction-op=dot", "--numpy-rand-seed=727"), num_batches=12, warmup=2,
        note="the reference's CPU benchmark"),
    BenchConfig("kaggle-128", _kaggle_flags(128), num_batches=150, warmup=20,
                note="Kaggle-shaped model on random data, batch 128"),
    BenchConfig("kaggle-2048", _kaggle_flags(2048), num_batches=30, warmup=5,
                note="Kaggle-shaped model on random data, batch 2048"),
    BenchConfig("mlperf-scaled", (
        "--data-generation=random",
        f"--arch-embedding-size={_dashes(min(s, MLPERF_ROW_CAP) for s in MLPERF_TABLE_SIZES)}",
        "--arch-sparse-feature-size=128", "--arch-mlp-bot=13-512-256-128", "--arch-mlp-top=1024-1024-512-256-1",
        "--arch-interaction-op=dot", "--num-indices-per-lookup=1", "--num-indices-per-lookup-fixed=true",
        "--loss-function=bce", "--round-targets=true", "--learning-rate=1.0", "--mini-batch-size=2048",
        "--numpy-rand-seed=727"), num_batches=12, warmup=2,
        note=f"the MLPerf model, tables capped at {MLPERF_ROW_CAP:,} rows (6.3 GiB)"),
    BenchConfig("tiny", ("--data-generation=random", "--mini-batch-size=16", "--numpy-rand-seed=727"),
                num_batches=8, warmup=2, note="the CLI's default model (tables 4-3-2, D=2), for tests"),
)}


# ---------------------------------------------------------------------------------------------
# The machine: GEMM peak and memory bandwidth, measured here
# ---------------------------------------------------------------------------------------------


def _best_seconds(fn, repeats: int, budget_s: float = float("inf")) -> float:
    """Best of up to ``repeats`` timed calls after one untimed call; stops early once ``budget_s`` is spent."""
    fn()  # warm-up: first touch, kernel selection
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return best


def measure_gemm(dtype_name: str, shapes: Sequence[Tuple[int, int, int]], repeats: int,
                 budget_s: float = 1.0) -> Dict[str, object]:
    """Best GFLOP/s of ``torch.mm`` (m x k) @ (k x n) per shape, smallest shape first, at most about
    ``budget_s`` per shape. A shape whose predicted time per call (from the best rate so far)
    exceeds ``budget_s`` is skipped (None), so a dtype the CPU only emulates (bf16 without native
    support) costs a second, not minutes."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    rates: Dict[str, Optional[float]] = {}
    for m, k, n in sorted(shapes, key=lambda s: s[0] * s[1] * s[2]):
        flops = 2.0 * m * k * n
        known = [r for r in rates.values() if r]
        if known and flops / (max(known) * 1e9) > budget_s:
            rates[f"{m}x{k}x{n}"] = None
            continue
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        out = torch.empty(m, n, dtype=dtype)
        seconds = _best_seconds(lambda: torch.mm(a, b, out=out), repeats, budget_s)
        rates[f"{m}x{k}x{n}"] = flops / seconds / 1e9
    measured = {s: r for s, r in rates.items() if r}
    best_shape = max(measured, key=measured.get)
    return {"gflops_by_shape": rates, "peak_gflops": measured[best_shape], "peak_shape": best_shape}


def measure_bandwidth(copy_mib: int, gather_rows: int, dim: int, repeats: int) -> Dict[str, float]:
    """GB/s of a large ``copy_`` (bytes read + written) and of ``index_select`` of random rows of
    ``dim`` floats from a table of ``gather_rows`` rows (rows read + written)."""
    import torch

    def copy_seconds() -> float:
        src = torch.ones(copy_mib << 18)  # 4-byte floats
        dst = torch.zeros_like(src)
        return _best_seconds(lambda: dst.copy_(src), repeats)

    copy_s = copy_seconds()  # its buffers are freed before the table below is made
    table = torch.zeros(gather_rows, dim)
    lookups = gather_rows // 4
    idx = torch.randint(0, gather_rows, (lookups,))
    out = torch.empty(lookups, dim)
    gather_s = _best_seconds(lambda: torch.index_select(table, 0, idx, out=out), repeats)
    return {"copy_GBps": 2 * copy_mib * 2**20 / copy_s / 1e9,
            "gather_GBps": 2 * lookups * dim * 4 / gather_s / 1e9,
            "copy_MiB": copy_mib, "gather_table_MiB": gather_rows * dim * 4 / 2**20, "gather_row_bytes": dim * 4}


def cpu_description() -> Dict[str, object]:
    """CPU model, logical CPUs, SIMD features that matter for GEMMs, torch threads, load average."""
    import torch

    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            info = {}
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())  # the first CPU's
        model = info.get("model name", model)
        flags = set(info.get("flags", "").split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return {"cpu_model": model, "logical_cpus": os.cpu_count(), "simd": simd, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "loadavg_start": list(os.getloadavg())}


def measure_machine(quick: bool) -> Dict[str, object]:
    """This machine's GEMM peaks (fp32, bf16) and bandwidths, measured now (a few seconds)."""
    start = time.perf_counter()
    machine = cpu_description()
    if quick:
        shapes, repeats, bw = [(128, 128, 128), (256, 256, 256)], 3, dict(copy_mib=16, gather_rows=1 << 16)
    else:
        shapes = [(256, 256, 256), (512, 512, 512), (2048, 512, 512), (2048, 1024, 1024), (2048, 2048, 2048)]
        repeats = 5
        bw = dict(copy_mib=512, gather_rows=1 << 21)
    machine["gemm"] = {d: measure_gemm(d, shapes, repeats, budget_s=0.2 if quick else 2.0) for d in ("fp32", "bf16")}
    machine["bandwidth"] = measure_bandwidth(dim=64, repeats=repeats, **bw)
    machine["measure_seconds"] = time.perf_counter() - start
    return machine


# ---------------------------------------------------------------------------------------------
# What a step has to do: FLOPs and embedding bytes, counted analytically
# ---------------------------------------------------------------------------------------------


def _mlp_macs(widths: Sequence[int]) -> int:
    return sum(a * b for a, b in zip(widths, widths[1:]))


def step_flops(model_cfg, batch: int) -> Dict[str, int]:
    """FLOPs of one training step's matrix products (1 multiply-add = 2 FLOPs), forward + backward.

    Forward: every MLP layer (n_in -> n_out) is a GEMM of 2 B n_in n_out FLOPs; the dot interaction
    is one batched product (B, F, D) x (B, D, F) of 2 B F^2 D FLOPs (the full F x F, as computed,
    though only the lower triangle is used; the cat interaction has none). Backward: each layer's
    gradients w.r.t. its weight and its input are one GEMM each, 2x its forward, except the bottom
    MLP's first layer, whose input (the dense features) needs no gradient (1x); the interaction's
    backward is two batched products (2x). Element-wise work (bias, activations, loss, the
    embedding sums and the parameter updates) is not counted: it is memory-bound, and the
    embedding part is in :func:`embedding_traffic`.
    """
    bottom, top = _mlp_macs(model_cfg.bottom_mlp), _mlp_macs(model_cfg.top_mlp)
    features, dim = model_cfg.num_tables + 1, model_cfg.bottom_mlp[-1]
    interaction = features * features * dim if model_cfg.interaction == "dot" else 0
    first = model_cfg.bottom_mlp[0] * model_cfg.bottom_mlp[1]
    forward = 2 * batch * (bottom + top + interaction)
    backward = 2 * batch * (2 * (bottom + top + interaction) - first)
    return {"forward": forward, "backward": backward, "total": forward + backward,
            "mlp_forward": 2 * batch * (bottom + top), "interaction_forward": 2 * batch * interaction}


def embedding_traffic(model_cfg, data_cfg, seed: int) -> Dict[str, int]:
    """Embedding bytes moved by one training step, counted on a batch drawn like the run's first
    (the reference's generator, ``seed``): L lookups (indices) and U distinct rows over all tables.

    gather = L x D x 4 (each looked-up row read once, float32); update = U x D x 4 x 2 (each
    updated row read and written once: the least an exact sparse SGD must move). Pooled outputs,
    gradients w.r.t. them (B x T x D) and indices are not counted.
    """
    from dlrm.data.random import generate_random_batch
    from dlrm.model.dlrm import table_dims

    batch = generate_random_batch(np.random.RandomState(seed), data_cfg.batch_size, data_cfg)
    dims = table_dims(model_cfg)
    lookups = [int(i.numel()) for i in batch.indices]
    rows = [int(np.unique(i.numpy()).size) for i in batch.indices]
    gather = sum(n * d * 4 for n, d in zip(lookups, dims))
    update = sum(2 * n * d * 4 for n, d in zip(rows, dims))
    return {"lookups": sum(lookups), "unique_rows": sum(rows), "gather_bytes": gather, "update_bytes": update,
            "total_bytes": gather + update}


def model_shape(flags: Sequence[str]) -> Optional[Dict[str, object]]:
    """The model, data and batch a flag list describes, read with this checkout's CLI parser
    (flags it does not know are ignored); None if it cannot read them."""
    from dlrm.run.flags import build_parser, config_from_args

    try:
        known, _ = build_parser().parse_known_args(list(flags))
        cfg = config_from_args(known)
    except (Exception, SystemExit):  # another checkout's flags; the counts are then left out
        return None
    return {"model": cfg.model, "data": cfg.data if cfg.random_data else None, "batch": cfg.train.batch_size,
            "seed": cfg.system.seed, "mixed_precision": cfg.train.mixed_precision}


def analytic_counts(flags: Sequence[str]) -> Optional[Dict[str, object]]:
    shape = model_shape(flags)
    if shape is None:
        return None
    model = shape["model"]
    traffic = embedding_traffic(model, shape["data"], shape["seed"]) if shape["data"] is not None else None
    return {"batch": shape["batch"], "flops": step_flops(model, shape["batch"]), "embedding": traffic,
            "precision": "bf16" if shape["mixed_precision"] == "bf16" else "fp32",
            "model": {"embedding_dim": model.embedding_dim, "tables": model.num_tables,
                      "table_rows": sum(model.table_sizes), "bottom_mlp": list(model.bottom_mlp),
                      "top_mlp": list(model.top_mlp), "interaction": model.interaction}}


# ---------------------------------------------------------------------------------------------
# Running the CLI
# ---------------------------------------------------------------------------------------------

TRAIN_LINE = re.compile(r"Finished training it (\d+)/(\d+) of epoch (\d+), (-?[\d.]+) ms/it, loss (\S+)")


@dataclass(frozen=True)
class TrainLine:
    step: int
    nbatches: int
    epoch: int
    ms: float
    loss: float


def parse_train_line(line: str) -> Optional[TrainLine]:
    """The fields of a ``Finished training it j/N of epoch k, X ms/it, loss L`` line, else None."""
    m = TRAIN_LINE.search(line)
    if m is None:
        return None
    return TrainLine(int(m.group(1)), int(m.group(2)), int(m.group(3)), float(m.group(4)),
                     float(m.group(5).rstrip(",")))


@dataclass
class Run:
    """One run of the CLI: per-line printed ms and arrival times (s since start), and totals."""

    ms: List[float] = field(default_factory=list)
    stamps: List[float] = field(default_factory=list)
    wall_s: float = 0.0
    peak_rss_mib: float = 0.0
    returncode: int = 0
    tail: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, object]:
        return {"ms": self.ms, "stamps_s": [round(s, 6) for s in self.stamps], "wall_s": self.wall_s,
                "peak_rss_mib": self.peak_rss_mib, "returncode": self.returncode}


def run_cli(script: str, flags: Sequence[str], echo: bool = False, threads: int = 0) -> Run:
    """Run ``script`` with ``flags`` in the current directory, timestamping training lines as they
    arrive. ``threads`` > 0 sets the child's OpenMP/MKL threads. Peak RSS is the child's
    ``ru_maxrss`` (from ``wait4``). TensorBoard is off unless the flags ask for it: a benchmark
    leaves no event files behind."""
    if not any(f.startswith("--tensor-board-filename") for f in flags):
        flags = [*flags, "--tensor-board-filename="]
    cmd = [sys.executable, os.path.abspath(script), *flags]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    run = Run()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
    for line in proc.stdout:
        now = time.perf_counter() - start
        if echo:
            print("    | " + line.rstrip(), flush=True)
        run.tail = (run.tail + [line.rstrip()])[-20:]
        parsed = parse_train_line(line)
        if parsed is not None:
            run.ms.append(parsed.ms)
            run.stamps.append(now)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = run.returncode = os.waitstatus_to_exitcode(status)
    run.wall_s = time.perf_counter() - start
    run.peak_rss_mib = usage.ru_maxrss / 1024  # kB on Linux
    return run


@dataclass(frozen=True)
class Variant:
    key: str  # "A" or "B"
    label: str
    script: str
    flags: Tuple[str, ...]


def run_flags(config: BenchConfig, variant: Variant, num_batches: int) -> List[str]:
    return [*config.flags, *variant.flags, "--print-time", "--print-freq=1", f"--num-batches={num_batches}"]


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def quartiles(values: Sequence[float]) -> Dict[str, float]:
    v = np.asarray(values, dtype=float)
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(v.min()), "max": float(v.max()),
            "n": int(v.size)}


def after_warmup(run: Run, warmup: int) -> Tuple[List[float], List[float]]:
    """Give (printed ms, line-gap ms) of the lines after the first ``warmup`` (the first has no gap)."""
    first = max(warmup, 1)
    ms = run.ms[first:]
    gaps = [1000 * (b - a) for a, b in zip(run.stamps[first - 1:], run.stamps[first:])]
    return ms, gaps


def summarize(runs: Sequence[Run], warmup: int, batch: Optional[int]) -> Dict[str, object]:
    """Pooled statistics of one variant's runs."""
    ms, gaps = [], []
    for run in runs:
        m, g = after_warmup(run, warmup)
        ms += m
        gaps += g
    if not ms:
        raise RuntimeError("no training lines after warm-up: raise --num-batches or lower --warmup")
    out = {"ms": quartiles(ms), "gap_ms": quartiles(gaps),
           "data_ms": quartiles([g - m for g, m in zip(gaps, ms)]),
           "startup_s": float(np.median([r.stamps[0] for r in runs])),
           "wall_s": float(np.median([r.wall_s for r in runs])),
           "peak_rss_mib": max(r.peak_rss_mib for r in runs), "runs": len(runs)}
    if batch:
        out["samples_per_s"] = 1000 * batch / out["ms"]["median"]
        out["samples_per_s_end_to_end"] = 1000 * batch / out["gap_ms"]["median"]
    return out


def compare(a_runs: Sequence[Run], b_runs: Sequence[Run], warmup: int) -> Dict[str, object]:
    """Speed-up of B over A: median(A) / median(B) of pooled iterations, and per round."""
    pooled = [float(np.median(sum((after_warmup(r, warmup)[0] for r in runs), []))) for runs in (a_runs, b_runs)]
    rounds = [float(np.median(after_warmup(a, warmup)[0]) / np.median(after_warmup(b, warmup)[0]))
              for a, b in zip(a_runs, b_runs)]
    return {"speedup_b_over_a": pooled[0] / pooled[1], "per_round": rounds,
            "per_round_min": min(rounds), "per_round_max": max(rounds)}


def where_time_goes(summary: Dict[str, object], counts: Optional[Dict[str, object]],
                    machine: Dict[str, object]) -> Optional[Dict[str, float]]:
    """Achieved rates, and the step's compute time split into GEMMs at the measured peak, embedding
    bytes at the measured copy bandwidth, and the rest."""
    if counts is None:
        return None
    compute_ms = summary["ms"]["median"]
    peak = machine["gemm"][counts["precision"]]["peak_gflops"]
    flops = counts["flops"]["total"]
    out = {"gflop_per_step": flops / 1e9, "achieved_gflops": flops / compute_ms / 1e6,
           "peak_gflops": peak, "gemm_ms_at_peak": flops / peak / 1e6, "compute_ms": compute_ms}
    out["fraction_of_peak"] = out["achieved_gflops"] / peak
    emb = counts["embedding"]
    bandwidth = machine["bandwidth"]["copy_GBps"]
    if emb is not None:
        out.update({"emb_mb_per_step": emb["total_bytes"] / 1e6, "emb_GBps": emb["total_bytes"] / compute_ms / 1e6,
                    "emb_ms_at_bandwidth": emb["total_bytes"] / bandwidth / 1e6, "bandwidth_GBps": bandwidth})
        out["fraction_of_bandwidth"] = out["emb_GBps"] / bandwidth
    out["rest_ms"] = compute_ms - out["gemm_ms_at_peak"] - out.get("emb_ms_at_bandwidth", 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 1, scale: float = 1.0) -> str:
    return "–" if value is None else f"{value * scale:,.{digits}f}"


def _num(value: Optional[float]) -> str:
    """Three significant digits or more, without exponents: 0.00123, 1.23, 123, 12,345."""
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.2e}"


def _pct(fraction: Optional[float]) -> str:
    return "–" if fraction is None else f"{100 * fraction:.0f}%"


def machine_markdown(machine: Dict[str, object]) -> List[str]:
    g, bw = machine["gemm"], machine["bandwidth"]
    load = machine.get("loadavg_end", machine["loadavg_start"])
    return [
        f"Machine: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs, SIMD "
        f"{', '.join(machine['simd']) or 'none listed'}; torch {machine['torch']} ({machine['torch_threads']} "
        f"threads, children too); load average {machine['loadavg_start'][0]:.2f} at the start, "
        f"{load[0]:.2f} at the end.",
        f"Measured here: fp32 GEMM peak {_num(g['fp32']['peak_gflops'])} GFLOP/s (`torch.mm` "
        f"{g['fp32']['peak_shape']}, best of several), bf16 {_num(g['bf16']['peak_gflops'])} GFLOP/s "
        f"({g['bf16']['peak_shape']}); copy bandwidth {_num(bw['copy_GBps'])} GB/s (read + write of "
        f"{bw['copy_MiB']} MiB), random {bw['gather_row_bytes']}-byte-row gather {_num(bw['gather_GBps'])} GB/s.",
    ]


COLUMNS = ("variant", "ms/it median", "IQR", "n", "samples/s", "data ms/it", "line gap ms", "start-up s",
           "run wall s", "peak RSS GiB", "GFLOP/step", "GFLOP/s", "of peak", "emb MB/step", "emb GB/s",
           "of copy bw")


def _variant_row(label: str, s: Dict[str, object], w: Optional[Dict[str, float]]) -> str:
    w = w or {}
    cells = [label, _fmt(s["ms"]["median"], 2), f"{s['ms']['q1']:.2f}–{s['ms']['q3']:.2f}", str(s["ms"]["n"]),
             _fmt(s.get("samples_per_s"), 0), _fmt(s["data_ms"]["median"], 2), _fmt(s["gap_ms"]["median"], 2),
             _fmt(s["startup_s"], 1), _fmt(s["wall_s"], 1), _fmt(s["peak_rss_mib"] / 1024, 2),
             _num(w.get("gflop_per_step")), _num(w.get("achieved_gflops")),
             _pct(w.get("fraction_of_peak")), _num(w.get("emb_mb_per_step")), _num(w.get("emb_GBps")),
             _pct(w.get("fraction_of_bandwidth"))]
    return "| " + " | ".join(cells) + " |"


def _where_line(label: str, w: Optional[Dict[str, float]]) -> str:
    if not w:
        return f"- {label}: no analytic counts (flags this checkout cannot read)."
    c = w["compute_ms"]
    parts = [f"GEMMs at the measured peak {_num(w['gemm_ms_at_peak'])} ms ({_pct(w['gemm_ms_at_peak'] / c)})"]
    if "emb_ms_at_bandwidth" in w:
        parts.append(f"embedding bytes at copy bandwidth {_num(w['emb_ms_at_bandwidth'])} ms "
                     f"({_pct(w['emb_ms_at_bandwidth'] / c)})")
    return (f"- {label}: {_num(c)} ms compute = " + " + ".join(parts)
            + f" + {_num(w['rest_ms'])} ms ({_pct(w['rest_ms'] / c)}) elsewhere (GEMMs below peak, "
            "element-wise ops, sparse-gradient handling, framework overhead).")


def config_markdown(name: str, entry: Dict[str, object]) -> List[str]:
    lines = [f"### {name}", "", f"{entry['note']}. Flags: `{' '.join(entry['flags'])}`; "
             f"{entry['num_batches']} iterations per run, the first {entry['warmup']} dropped, "
             f"{entry['rounds']} round(s).", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for key, v in entry["variants"].items():
        lines.append(_variant_row(f"{key}: {v['label']}", v["summary"], v["where"]))
    if "comparison" in entry:
        c = entry["comparison"]
        lines += ["", f"**Speed-up of B over A** (median A / median B, pooled): **{c['speedup_b_over_a']:.2f}×**; "
                      f"per-round ratios {c['per_round_min']:.2f}–{c['per_round_max']:.2f} "
                      f"({len(c['per_round'])} rounds: {', '.join(f'{r:.2f}' for r in c['per_round'])})."]
    lines += ["", "Where the step goes:"]
    lines += [_where_line(f"{k}: {v['label']}", v["where"]) for k, v in entry["variants"].items()]
    return lines + [""]


def write_report(report: Dict[str, object], markdown: str, json_path: Optional[str],
                 markdown_path: Optional[str]) -> None:
    """Print the Markdown table; write the report as JSON and the table, where paths are given,
    each through a temporary name (a killed benchmark leaves no half-written file)."""
    from dlrm.io.atomic import atomic_open

    print(markdown)
    for path, content in ((json_path, json.dumps(report, indent=1)), (markdown_path, markdown + "\n")):
        if path:
            with atomic_open(path, "w") as f:
                f.write(content)


def to_markdown(report: Dict[str, object]) -> str:
    lines = ["## Harness results", "", *machine_markdown(report["machine"]), "",
             "Columns: ms/it = printed compute per iteration (forward, backward, optimizer), pooled over runs "
             "after warm-up; data ms/it = line gap minus compute; GFLOP/step = GEMM FLOPs forward + backward; "
             "emb MB/step = lookups x D x 4 + 2 x distinct rows x D x 4.", ""]
    for name, entry in report["configs"].items():
        lines += config_markdown(name, entry)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _variants(args) -> List[Variant]:
    out = []
    for key in ("a", "b"):
        flags, script = getattr(args, key), getattr(args, f"script_{key}")
        if key == "b" and flags is None and script is None:
            break
        flags_t = tuple(shlex.split(flags or ""))
        label = getattr(args, f"label_{key}") or " ".join(
            ([os.path.relpath(script)] if script else []) + list(flags_t)) or "default"
        out.append(Variant(key.upper(), label, script or DEFAULT_SCRIPT, flags_t))
    return out


def run_rounds(config: BenchConfig, variants: Sequence[Variant], num_batches: int, warmup: int, rounds: int,
               echo: bool, threads: int) -> Dict[str, List[Run]]:
    """Run every variant ``rounds`` times, interleaved: A B, then B A, ... Raises if a run fails."""
    runs: Dict[str, List[Run]] = {v.key: [] for v in variants}
    for r in range(rounds):
        for v in (variants if r % 2 == 0 else list(reversed(variants))):
            flags = run_flags(config, v, num_batches)
            run = run_cli(v.script, flags, echo=echo, threads=threads)
            if run.returncode != 0 or len(run.ms) <= max(warmup, 1):
                raise RuntimeError(f"{config.name} {v.key}: exit {run.returncode}, {len(run.ms)} training lines: "
                                   f"{' '.join(flags)}\n" + "\n".join(run.tail))
            runs[v.key].append(run)
            print(f"[{config.name}] round {r + 1}/{rounds} {v.key}: median "
                  f"{np.median(after_warmup(run, warmup)[0]):.2f} ms/it, start-up {run.stamps[0]:.1f} s, "
                  f"wall {run.wall_s:.1f} s, peak RSS {run.peak_rss_mib / 1024:.2f} GiB", flush=True)
    return runs


def bench_config(config: BenchConfig, variants: Sequence[Variant], args,
                 machine: Dict[str, object]) -> Dict[str, object]:
    """Interleaved rounds of every variant on one configuration; the JSON entry for it."""
    num_batches = args.num_batches or config.num_batches
    warmup = config.warmup if args.warmup is None else args.warmup
    runs = run_rounds(config, variants, num_batches, warmup, args.rounds, args.echo, args.threads)
    entry = {"note": config.note, "flags": list(config.flags), "num_batches": num_batches, "warmup": warmup,
             "rounds": args.rounds, "variants": {}}
    for v in variants:
        counts = analytic_counts(run_flags(config, v, num_batches))
        summary = summarize(runs[v.key], warmup, counts["batch"] if counts else None)
        entry["variants"][v.key] = {"label": v.label, "script": v.script, "flags": list(v.flags), "counts": counts,
                                    "summary": summary, "where": where_time_goes(summary, counts, machine),
                                    "runs": [r.to_json() for r in runs[v.key]]}
    if len(variants) == 2:
        entry["comparison"] = compare(runs["A"], runs["B"], warmup)
    return entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="cpu-benchmark", help="comma-separated names (default: %(default)s)")
    p.add_argument("--a", default=None, help="flags of variant A, one string (default: none)")
    p.add_argument("--b", default=None, help="flags of variant B; B runs if this or --script-b is given")
    p.add_argument("--script-a", default=None, help="dlrm_s_pytorch.py of variant A (default: this checkout's)")
    p.add_argument("--script-b", default=None, help="dlrm_s_pytorch.py of variant B (default: this checkout's)")
    p.add_argument("--label-a", default=None, help="name of A in the tables")
    p.add_argument("--label-b", default=None, help="name of B in the tables")
    p.add_argument("--rounds", type=int, default=3, help="runs of each variant, interleaved (default: 3)")
    p.add_argument("--num-batches", type=int, default=0, help="iterations per run (default: the config's)")
    p.add_argument("--warmup", type=int, default=None, help="lines dropped per run (default: the config's)")
    p.add_argument("--threads", type=int, default=0, help="OpenMP/MKL threads of the children and of the "
                   "machine measurement (default: torch's default)")
    p.add_argument("--quick", action="store_true", help="1 round, short machine measurement (for tests)")
    p.add_argument("--machine-json", default=None, help="reuse the machine measurement of an earlier JSON")
    p.add_argument("--echo", action="store_true", help="print the children's output as it arrives")
    p.add_argument("--json", default=None, help="write the full report (raw per-iteration numbers included)")
    p.add_argument("--markdown", default=None, help="write the Markdown tables (also printed)")
    p.add_argument("--list", action="store_true", help="print the configurations and exit")
    return p


FLAG_SET_OPTIONS = ("--a", "--b")


def join_flag_sets(argv: Sequence[str]) -> List[str]:
    """Join a flag set given as a separate argument to its option: ``--a "--x=1 --y"`` as ``--a=--x=1 --y``.

    argparse would read a value that starts with a dash as an option of its own."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in FLAG_SET_OPTIONS and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _machine(args) -> Dict[str, object]:
    """The machine measurement: made now (with ``--threads`` threads), or read from ``--machine-json``."""
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if not args.machine_json:
        return measure_machine(args.quick)
    with open(args.machine_json) as f:
        machine = json.load(f)["machine"]
    machine["loadavg_start"] = list(os.getloadavg())
    return machine


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(join_flag_sets(argv))
    if args.list:
        for c in CONFIGS.values():
            print(f"{c.name}: {c.note}\n    {' '.join(c.flags)}")
        return 0
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"error: unknown configuration(s) {', '.join(unknown)} (known: {', '.join(CONFIGS)})",
              file=sys.stderr)
        return 2
    if args.quick:
        args.rounds = 1
    machine = _machine(args)
    variants = _variants(args)
    report = {"command": ["bench/harness.py", *argv],
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine, "configs": {}}
    for name in names:
        report["configs"][name] = bench_config(CONFIGS[name], variants, args, machine)
    machine["loadavg_end"] = list(os.getloadavg())
    write_report(report, to_markdown(report), args.json, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
