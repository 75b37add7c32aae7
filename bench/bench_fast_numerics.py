"""Benchmark: the dense part with plain PyTorch against ``fast_numerics``, interleaved.

Every variant runs in one process on the same inputs; each iteration runs all of them in a fresh
random order, so the VM's slow and fast moments hit every variant alike. A timed step is the dense
part of a training step: bottom MLP, dot interaction, top MLP, MSE loss, backward (down to the
pooled embeddings, which are leaf tensors here) and ``torch.optim.SGD.step()`` on the MLPs, then
``zero_grad``. With ``--precision bf16`` the forward runs under ``torch.autocast("cpu", bfloat16)``
as ``--mixed-precision=bf16`` does.

Variants (``--variants``): ``exact`` (``nn.Linear``, ``DotInteraction``), ``fast``
(:func:`fast_numerics.accelerate_mlps` with its defaults), ``mkl`` and ``onednn`` (that GEMM backend
for every layer), ``fast-torchint`` (the interaction's pure-torch path instead of its C++ kernel),
``fast-noint`` (fast MLPs, plain interaction), ``compiled`` (``torch.compile`` of the exact dense
part; its compile time is printed).

``--whole-step`` instead times whole training steps of the CPU benchmark model (8 tables of 1M
rows, D=64, 100 lookups per bag), built with :class:`dlrm_model.DLRM`: ``plain`` (per-table
tables, the reference's step), ``fused`` (``--embedding-backend=fused``) and ``fused+fast`` (fused
tables and :func:`fast_numerics.accelerate_mlps`), through ``dlrm_train.train_step``.

Reports median and interquartile range of wall time, median process CPU time, GFLOP/s of the dense
GEMMs (6 B sum(N_in N_out) per step) and each variant's speed-up over the first one.

Usage:
    python -m bench.bench_fast_numerics [--config cpu|kaggle] [--precision fp32|bf16]
        [--threads 2] [--iters N] [--variants exact,mkl,onednn] [--whole-step]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from torch import nn

from dlrm.model import fast_numerics as fn
from dlrm.model.dlrm import DotInteraction, make_mlp

CONFIGS = {  # batch, bottom MLP, top MLP (its input width included), tables, D
    "cpu": dict(batch=2048, bottom=(512, 512, 64), top=(100, 1024, 1024, 1024, 1), tables=8, dim=64, iters=15),
    "kaggle": dict(batch=128, bottom=(13, 512, 256, 64, 16), top=(367, 512, 256, 1), tables=26, dim=16, iters=300),
}


class DensePart(nn.Module):
    """DLRM's dense part under the model's attribute names, so ``accelerate_mlps`` applies to it."""

    def __init__(self, bottom: Sequence[int], top: Sequence[int], tables: int, rng: np.random.RandomState):
        super().__init__()
        self.bot_l = make_mlp(bottom, rng)
        self.top_l = make_mlp(top, rng, sigmoid_last=True)
        self.interaction = DotInteraction(tables + 1)

    def forward(self, dense_x: torch.Tensor, embedded: List[torch.Tensor]) -> torch.Tensor:
        return self.top_l(self.interaction(self.bot_l(dense_x), embedded)).float()


def dense_flops(c: dict) -> float:
    """Forward plus both backward GEMMs of every Linear layer, per step."""
    macs = sum(a * b for w in (c["bottom"], c["top"]) for a, b in zip(w[:-1], w[1:]))
    return 6.0 * c["batch"] * macs


def dense_variants(c: dict, names: Sequence[str]) -> Dict[str, Callable]:
    """A step function per variant; every model starts from the same weights."""
    base = DensePart(c["bottom"], c["top"], c["tables"], np.random.RandomState(0))
    gen = torch.Generator().manual_seed(0)
    dense_x = torch.rand(c["batch"], c["bottom"][0], generator=gen)
    embedded = [torch.randn(c["batch"], c["dim"], generator=gen).requires_grad_() for _ in range(c["tables"])]
    labels = torch.rand(c["batch"], 1, generator=gen)
    steps = {}
    for name in names:
        model = copy.deepcopy(base)
        run = model
        if name == "fast":
            fn.accelerate_mlps(model)
        elif name in ("mkl", "onednn"):
            fn.accelerate_mlps(model, gemm=name)
        elif name == "fast-torchint":
            fn.accelerate_mlps(model, interaction_backend="torch")
        elif name == "fast-noint":
            fn.accelerate_mlps(model, interaction=False)
        elif name == "compiled":
            run = torch.compile(model)
        elif name != "exact":
            raise SystemExit(f"unknown variant {name}")
        steps[name] = _dense_step(run, torch.optim.SGD(model.parameters(), lr=0.01), dense_x, embedded, labels)
    return steps


def _dense_step(run: Callable, optimizer: torch.optim.Optimizer, dense_x: torch.Tensor,
                embedded: List[torch.Tensor], labels: torch.Tensor) -> Callable[[bool], torch.Tensor]:
    loss_fn = nn.MSELoss()

    def step(bf16: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            probs = run(dense_x, embedded)
        loss = loss_fn(probs, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for e in embedded:
            e.grad = None
        return loss.detach()

    return step


def interleave(steps: Dict[str, Callable], iters: int, warmup: int, bf16: bool, log: Callable[[str], None]):
    """Wall and process-CPU seconds per variant, all variants once per iteration in random order."""
    for name, step in steps.items():
        start = time.perf_counter()
        step(bf16)
        if name == "compiled":
            log(f"compiled: first step (compile included) {time.perf_counter() - start:.1f} s")
        for _ in range(warmup):
            step(bf16)
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    order = list(steps)
    for _ in range(iters):
        random.shuffle(order)
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            steps[name](bf16)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def report(wall: Dict[str, list], cpu: Dict[str, list], flops: float, label: str, log: Callable[[str], None]):
    names = list(wall)
    base_wall, base_cpu = statistics.median(wall[names[0]]), statistics.median(cpu[names[0]])
    log(f"| case | variant | wall median ms (IQR) | CPU ms median | GFLOP/s | {names[0]} / this (wall, CPU) |")
    log("|---|---|---|---|---|---|")
    for name in names:
        w = sorted(wall[name])
        q1, med, q3 = statistics.quantiles(w, n=4)
        c = statistics.median(cpu[name])
        gflops = f"{flops / med / 1e9:.1f}" if flops else "-"
        log(f"| {label} | {name} | {med * 1e3:.2f} ({q1 * 1e3:.2f}-{q3 * 1e3:.2f}) | {c * 1e3:.2f} | {gflops} | "
            f"{base_wall / med:.3f}, {base_cpu / c:.3f} |")


def whole_step_variants(names: Sequence[str], batches: int, log: Callable[[str], None]) -> Dict[str, Callable]:
    """Whole training steps of the CPU benchmark model; each variant is its own DLRM (same seed)."""
    from dlrm.data.random import RandomDataConfig, generate_random_batch
    from dlrm.model.dlrm import DLRM, ModelConfig, make_loss
    from dlrm.run.train import Logger, RunParts, TrainConfig, make_optimizer, make_scheduler, train_step

    sizes = (1_000_000,) * 8
    data = RandomDataConfig(dense_dim=512, table_sizes=sizes, batch_size=2048, num_indices_per_lookup=100)
    rng = np.random.RandomState(727)
    pool = [generate_random_batch(rng, 2048, data) for _ in range(batches)]
    steps = {}
    for name in names:
        backend = "plain" if name.startswith("plain") else "fused"
        cfg = ModelConfig(embedding_dim=64, table_sizes=sizes, bottom_mlp=(512, 512, 64),
                          top_mlp=(100, 1024, 1024, 1024, 1), embedding_backend=backend)
        start = time.perf_counter()
        model = DLRM(cfg, np.random.RandomState(727), log=log)
        if name.endswith("+fast"):
            fn.accelerate_mlps(model)
        optimizer = make_optimizer("sgd", list(model.parameters()), 0.01)
        tcfg = TrainConfig(batch_size=2048, learning_rate=0.01)
        if backend == "fused":
            model.emb_l.follow_optimizer_lr(optimizer)
        parts = RunParts(model, make_loss("mse"), optimizer, make_scheduler(optimizer, tcfg), None, None, 0, 0,
                         torch.device("cpu"), Logger())
        log(f"{name}: built in {time.perf_counter() - start:.1f} s")
        steps[name] = _whole_step(parts, tcfg, pool, train_step)
    return steps


def _whole_step(parts, tcfg, pool, train_step) -> Callable[[bool], torch.Tensor]:
    from dataclasses import replace

    counter = [0]

    def step(bf16: bool) -> torch.Tensor:
        cfg = replace(tcfg, mixed_precision="bf16" if bf16 else "none")
        j = counter[0]
        counter[0] += 1
        return train_step(parts, cfg, pool[j % len(pool)], j)

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=0, help="timed iterations (default: per config)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="", help="comma-separated (default: exact,fast; "
                   "with --whole-step plain,fused,fused+fast)")
    p.add_argument("--whole-step", action="store_true", help="time whole training steps of the CPU benchmark model")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = print
    bf16 = args.precision == "bf16"
    log(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {fn.has_native_bf16()}, "
        f"threads {args.threads}, load average {os.getloadavg()[0]:.1f}")
    if args.whole_step:
        names = [v for v in (args.variants or "plain,fused,fused+fast").split(",") if v]
        steps = whole_step_variants(names, batches=4, log=log)
        wall, cpu = interleave(steps, args.iters or 8, args.warmup, bf16, log)
        report(wall, cpu, 0.0, f"whole step, cpu, {args.precision}", log)
        return 0
    c = CONFIGS[args.config]
    names = [v for v in (args.variants or "exact,fast").split(",") if v]
    steps = dense_variants(c, names)
    wall, cpu = interleave(steps, args.iters or c["iters"], args.warmup, bf16, log)
    report(wall, cpu, dense_flops(c), f"{args.config} B={c['batch']} {args.precision} {args.threads}t", log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
