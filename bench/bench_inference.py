"""Inference benchmark: fp32 against int8 MLPs and 8- and 4-bit tables, per batch size, same inputs.

Builds the model in-process from model flags spelled as the CLI spells them (default: the
Kaggle-shaped model: 26 tables with Kaggle's sizes, D=16, bottom 13-512-256-64-16, top 512-256-1,
one index per bag), draws random batches of its shape with the reference's generator, and for
every batch size and variant reports:

- samples/s: samples / time over the timed iterations (one forward each, batches cycled from a
  small pool); per batch size the variants take turns in ``--rounds`` rounds, so that a busy moment
  of a shared machine does not land on one variant only;
- p50 / p99 latency of one batch's forward (p99 of few iterations is close to their maximum; the
  table gives the count);
- model memory: bytes of every tensor in the state dict (parameters, buffers, packed tables, int8
  weights and their scales); for tables in files, the MLPs and the row cache instead;
- the change against fp32 on the same inputs: max and mean |p - p_fp32| of the predicted
  probabilities, and the fraction of samples whose rounded predictions agree.

Variants: fp32 (the model as built), int8-mlp (``quantize_mlp_bits=8``: dynamic int8 ``Linear``),
emb-8bit and emb-4bit (``quantize_emb_bits``: row-wise quantized tables), all through
``dlrm_model.quantize_for_inference``. With ``--use-gpu`` and CUDA available, fp32 runs on the GPU and
is timed with CUDA events; the quantized variants use CPU-only kernels and are skipped there.
``--embedding-backend=auto`` means plain tables here (auto's choice is about the training update).

From files: ``--stores=memory,disk:1,disk:10,disk:100`` adds, to the fp32 model in memory, the same
model with its tables in files under ``--embedding-store-dir`` behind a row cache of 1, 10 and 100
% of the tables' bytes (``dlrm.store``), as variants ``disk 1%`` and so on; their predictions are
compared with fp32's as the quantized ones are (they are equal: the same rows, the same sums).
``--warm-batches K`` first runs every variant, untimed, on K batches of 2048 drawn apart from the
timed ones, so that the caches hold what a serving process's would; the timed forwards then go
through the pool in order, each round going on where the last stopped, so that no batch repeats
while the pool lasts (``--pool`` at least ``--iters``): a repeated batch would find all its rows
cached.

    python -m bench.bench_inference --batch-sizes 1,128,2048,16384 --json /tmp/inf.json --markdown /tmp/inf.md
    python -m bench.bench_inference --arch-sparse-feature-size=64 --arch-embedding-size=1000000-1000000 \\
        --arch-mlp-bot=512-512-64 --arch-mlp-top=1024-1024-1024-1 --num-indices-per-lookup=100
    python -m bench.bench_inference --quick --batch-sizes 1,4   # the tiny default model, for tests
    python -m bench.bench_inference --batch-sizes 1,64,2048 --variants fp32 --stores memory,disk:1,disk:10,disk:100 \
        --embedding-store-dir=/scratch --rand-data-dist=zipf --pool 300 --iters 300 --warm-batches 64
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from bench.harness import KAGGLE_MODEL_FLAGS, _num, cpu_description, write_report
from dlrm.common import DLRMError
from dlrm.data.random import RandomDataConfig, generate_random_batch
from dlrm.model.dlrm import DLRM, quantize_for_inference
from dlrm.run.flags import build_parser as build_cli_parser, config_from_args
from dlrm.store.tables import StoredTables


VARIANTS = {"fp32": (32, 32), "int8-mlp": (32, 8), "emb-8bit": (8, 32), "emb-4bit": (4, 32)}
"""Variant name -> (quantize_emb_bits, quantize_mlp_bits)."""
COLUMNS = ("variant", "batch", "samples/s", "p50 ms", "p99 ms", "iters", "model MiB", "max abs Δp", "mean abs Δp",
           "agreement")


def model_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in ``model.state_dict()``: parameters, buffers, packed quantized
    tables, and the int8 weights, biases and scales of dynamic quantized layers."""
    def nbytes(value) -> int:
        if isinstance(value, torch.Tensor):
            extra = 0
            if value.is_quantized and value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                extra = nbytes(value.q_per_channel_scales()) + nbytes(value.q_per_channel_zero_points())
            return value.numel() * value.element_size() + extra
        if isinstance(value, (tuple, list)):
            return sum(nbytes(v) for v in value)
        return 0

    tables = getattr(model, "emb_l", None)
    if isinstance(tables, StoredTables):  # in RAM: the MLPs and the cache, not the tables in the files
        cache = tables.cache
        held = cache.held_weights.numel() * 4 + (cache.held_state.numel() * 4 if cache.held_state is not None else 0)
        return held + sum(nbytes(v) for k, v in model.state_dict().items() if not k.startswith("emb_l."))
    return sum(nbytes(v) for v in model.state_dict().values())


def make_variant(model: DLRM, name: str) -> nn.Module:
    """Quantize a shallow copy of ``model`` with ``quantize_for_inference``; ``model`` stays fp32.

    The int8-MLP copy shares the float tables instead of deep-copying them: only ``Linear`` layers,
    all in the MLPs, change."""
    emb_bits, mlp_bits = VARIANTS[name]
    if name == "fp32":
        return model
    shallow = copy.copy(model)
    shallow._modules = dict(model._modules)
    if mlp_bits == 32:
        return quantize_for_inference(shallow, emb_bits, mlp_bits)
    shallow._modules["emb_l"] = nn.Identity()  # not deep-copied by quantize_dynamic
    quantized = quantize_for_inference(shallow, emb_bits, mlp_bits)
    quantized._modules["emb_l"] = model.emb_l
    return quantized


def parse_stores(text: str) -> List[Optional[float]]:
    """``memory,disk:1,disk:10`` -> [None, 0.01, 0.1]: None for the tables in memory, else the
    cache's share of the tables' bytes.

    Raises:
        DLRMError: an entry that is neither ``memory`` nor ``disk:P`` with 0 <= P <= 100.
    """
    stores: List[Optional[float]] = []
    for entry in filter(None, text.split(",")):
        kind, _, percent = entry.partition(":")
        if kind == "memory" and not percent:
            stores.append(None)
            continue
        try:
            share = float(percent) / 100
        except ValueError:
            share = -1.0
        if kind != "disk" or not 0 <= share <= 1:
            raise DLRMError(f"--stores: {entry!r} is neither memory nor disk:P with P a percentage of the "
                            "tables (0 to 100)")
        stores.append(share)
    return stores


def disk_model(model_cfg, seed: int, share: float, store_cfg) -> DLRM:
    """The model of ``model_cfg`` drawn from ``seed`` as in memory, its tables in files under
    ``--embedding-store-dir`` behind a cache of ``share`` of their bytes."""
    table_bytes = sum(model_cfg.table_sizes) * model_cfg.embedding_dim * 4

    def make(cfg, rng):
        return StoredTables(cfg.table_sizes, cfg.embedding_dim, rng, store_cfg.embedding_store_dir,
                            int(share * table_bytes), "sgd")
    return DLRM(model_cfg, np.random.RandomState(seed), make_tables=make)


def store_label(share: float) -> str:
    return f"disk {share * 100:g}%"


def make_batches(data_cfg: RandomDataConfig, n: int, count: int, seed: int, device: torch.device) -> List[tuple]:
    """Draw ``count`` random batches of n samples as (dense_x, offsets, indices) on ``device``."""
    rng = np.random.RandomState(seed)
    cfg = replace(data_cfg, batch_size=n)
    batches = []
    for _ in range(count):
        b = generate_random_batch(rng, n, cfg)
        batches.append((b.dense_x.to(device), b.offsets.to(device), [i.to(device) for i in b.indices]))
    return batches


def predict(model: nn.Module, batches: Sequence[tuple]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(*b).float().flatten().cpu() for b in batches])


def time_point(model: nn.Module, batches: Sequence[tuple], args, cuda: bool, first: int = 0) -> List[float]:
    """Milliseconds per forward: ``args.warmup`` untimed, then at least ``args.min_iters`` and at
    most ``args.iters`` timed, stopping once ``args.time_budget`` seconds have passed; the timed ones
    take the batches from number ``first`` on."""
    times: List[float] = []
    events = []
    with torch.inference_mode():
        for i in range(args.warmup):
            model(*batches[i % len(batches)])
        start = time.perf_counter()
        while len(times) + len(events) < args.iters and (
                len(times) + len(events) < args.min_iters or time.perf_counter() - start < args.time_budget):
            b = batches[(first + len(times) + len(events)) % len(batches)]
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                model(*b)
                end.record()
                events.append((begin, end))
            else:
                t = time.perf_counter()
                model(*b)
                times.append(1000 * (time.perf_counter() - t))
        if cuda:
            torch.cuda.synchronize()
            times = [begin.elapsed_time(end) for begin, end in events]
    return times


def compare(pred: torch.Tensor, reference: torch.Tensor) -> Dict[str, float]:
    """Compare predictions: max and mean |pred - reference| and the share of equal rounded predictions."""
    diff = (pred - reference).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "agreement": float((torch.round(pred) == torch.round(reference)).float().mean())}


def sweep(models: Dict[str, nn.Module], pools: Dict[int, List[tuple]], args, cuda: bool) -> List[Dict[str, object]]:
    """Per batch size, ``args.rounds`` rounds over the variants (the order rotating each round), each
    point timed for its share of the budget, so that every variant sees the machine's slow and
    fast moments alike; then each variant's predictions against fp32's on the same batches."""
    rows = []
    names = list(models)
    share = argparse.Namespace(warmup=args.warmup, iters=max(1, args.iters // args.rounds),
                               min_iters=-(-args.min_iters // args.rounds), time_budget=args.time_budget / args.rounds)
    for n, batches in pools.items():
        times: Dict[str, List[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name] += time_point(models[name], batches, share, cuda, first=len(times[name]))
        reference = predict(models["fp32"], batches) if "fp32" in models else None
        for name in names:
            t = times[name]
            row = {"variant": name, "batch": n, "iters": len(t), "model_bytes": model_bytes(models[name]),
                   "samples_per_s": n * len(t) / (sum(t) / 1000), "p50_ms": float(np.percentile(t, 50)),
                   "p99_ms": float(np.percentile(t, 99)), "times_ms": t}
            if reference is not None:
                row.update(compare(predict(models[name], batches), reference))
            rows.append(row)
            print(f"{name:>9} batch {n:>6}: {row['samples_per_s']:>12,.0f} samples/s, p50 {row['p50_ms']:.3f} ms, "
                  f"p99 {row['p99_ms']:.3f} ms ({len(t)} iters)", flush=True)
    return rows


def _change_cells(row: Dict[str, object]) -> List[str]:
    if "agreement" not in row:
        return ["–", "–", "–"]  # fp32 was not run
    return [f"{row['max_abs_diff']:.2e}", f"{row['mean_abs_diff']:.2e}", f"{100 * row['agreement']:.2f}%"]


def to_markdown(report: Dict[str, object]) -> str:
    m = report["machine"]
    lines = ["## Inference results", "",
             f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} "
             f"({m['torch_threads']} threads), device {report['device']}; load average "
             f"{m['loadavg_start'][0]:.2f} at the start, {m['loadavg_end'][0]:.2f} at the end.",
             f"Model flags: `{' '.join(report['model_flags']) or '(the CLI defaults)'}`; batches cycled from "
             f"{report['args']['pool']} per batch size; variants interleaved in {report['args']['rounds']} rounds "
             "per batch size; p99 over the 'iters' timed forwards.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    order = list(dict.fromkeys(r["variant"] for r in report["rows"]))
    for r in sorted(report["rows"], key=lambda r: (r["batch"], order.index(r["variant"]))):
        lines.append("| " + " | ".join([
            r["variant"], str(r["batch"]), f"{r['samples_per_s']:,.0f}", f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
            str(r["iters"]), _num(r["model_bytes"] / 2**20), *_change_cells(r)]) + " |")
    lines += [f"Skipped: {s}" for s in report["skipped"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other flags are model flags of dlrm_s_pytorch.py.")
    p.add_argument("--batch-sizes", default="1,128,2048,16384", help="comma-separated (default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed forwards per point (default: 5)")
    p.add_argument("--iters", type=int, default=500, help="most timed forwards per point (default: 500)")
    p.add_argument("--min-iters", type=int, default=10, help="fewest timed forwards per point (default: 10)")
    p.add_argument("--time-budget", type=float, default=3.0, help="seconds of timed forwards per point "
                   "(default: 3)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the variants per batch size, each "
                   "taking 1/rounds of the budget and iterations (default: 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--pool", type=int, default=4, help="distinct batches per batch size (default: 4)")
    p.add_argument("--stores", default="memory", help="comma-separated: memory (the fp32 model as built) and "
                   "disk:P (its tables in files behind a cache of P %% of their bytes; needs --variants=fp32 "
                   "and --embedding-store-dir) (default: %(default)s)")
    p.add_argument("--warm-batches", type=int, default=0, help="batches of 2048, drawn apart from the timed "
                   "ones, that every variant runs untimed first (warms a disk store's cache) (default: 0)")
    p.add_argument("--quick", action="store_true", help="the CLI's tiny default model and short points (tests)")
    p.add_argument("--json", default=None, help="write rows and per-iteration times as JSON")
    p.add_argument("--markdown", default=None, help="write the Markdown table (also printed)")
    return p


def model_flags(rest: Sequence[str], quick: bool) -> List[str]:
    """The model flags: the Kaggle-shaped model unless any --arch- flag is given (or --quick)."""
    if quick or any(f.startswith("--arch-") for f in rest):
        return list(rest)
    return [*KAGGLE_MODEL_FLAGS, *rest]


def run(args, flags: Sequence[str]) -> Dict[str, object]:
    cfg = config_from_args(build_cli_parser().parse_args(list(flags)))
    cuda = cfg.system.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backend = "plain" if cfg.model.embedding_backend == "auto" else cfg.model.embedding_backend
    model_cfg = replace(cfg.model, embedding_backend=backend)
    model = DLRM(model_cfg, np.random.RandomState(cfg.system.seed)).to(device)
    model.eval()
    stores = [share for share in parse_stores(args.stores) if share is not None]
    if stores and (cuda or args.variants.split(",") != ["fp32"] or not cfg.store.embedding_store_dir):
        raise DLRMError("--stores with disk entries needs --variants=fp32, the CPU and --embedding-store-dir")
    pools = {n: make_batches(cfg.data, n, args.pool, cfg.system.seed + 1, device)
             for n in (int(x) for x in args.batch_sizes.split(","))}
    report = {"machine": cpu_description(), "device": str(device), "model_flags": list(flags), "args": vars(args),
              "rows": [], "skipped": []}
    models = {}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise DLRMError(f"--variants: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
        if cuda and name != "fp32":
            report["skipped"].append(f"{name}: quantized inference is CPU-only (FBGEMM kernels), not run on CUDA")
            continue
        models[name] = make_variant(model, name)
    disks = []
    try:
        for share in stores:
            disks.append(disk_model(model_cfg, cfg.system.seed, share, cfg.store))
            disks[-1].eval()
            models[store_label(share)] = disks[-1]
        if args.warm_batches:
            warm = make_batches(cfg.data, 2048, args.warm_batches, cfg.system.seed + 2, device)
            for name in models:  # untimed: the caches start as a serving process's would be
                predict(models[name], warm)
        report["rows"] = sweep(models, pools, args, cuda)
    finally:
        for disk in disks:
            disk.emb_l.close()
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.quick:
        args.warmup, args.iters, args.min_iters, args.time_budget, args.pool, args.rounds = 1, 6, 2, 0.2, 2, 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        report = run(args, model_flags(rest, args.quick))
    except DLRMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_report(report, to_markdown(report), args.json, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
