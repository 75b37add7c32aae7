"""DLRM: the Deep Learning Recommendation Model benchmark, on today's PyTorch.

A faithful re-implementation of the reference benchmark's command line, numbers and files
(``../shared/spec/reference-behaviour.md``), with its bugs fixed (README, "Differences").

    python dlrm_s_pytorch.py --mini-batch-size=2 --data-size=6        # a tiny run on random data
    python -m pytest -q                                               # the tests

The file reads top to bottom: the flag table, the run configuration, the model (MLPs, embedding
tables, interactions, DLRM), the loss, the training and evaluation loops, and ``main()``.

Dimension vocabulary (all docstrings): B batch, T tables, D embedding dimension, M dense features,
F = T + 1 interaction features, P interaction pairs, W top-MLP input width, N_t indices of table t.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch.profiler import record_function

from checkpoint import as_float, load_checkpoint, save_checkpoint
from dlrm_common import Batch, CheckpointError, ConfigError, DLRMError, parse_bool
from extend_distributed import (ButterflyShuffle, DistInfo, all_reduce_sum, average_gradients, gather_objects,
                                init_distributed, shard, shutdown_distributed)
from mlperf_logger import MLPerfLogger, make_mlperf_logger

# =============================================================================================
# Flags (spec §1.1): the reference's names and defaults; dest= gives each a clear name inside.
# =============================================================================================


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised as ConfigError (reported by main() in one line)."""

    def error(self, message: str):
        raise ConfigError(message)


def _dash_ints(text: str) -> Tuple[int, ...]:
    """'4-3-2' -> (4, 3, 2)."""
    try:
        return tuple(int(tok) for tok in str(text).split("-"))
    except ValueError:
        raise ValueError(f"expected dash-separated integers like 4-3-2, got {text!r}") from None


def _dash_floats(text: str) -> Tuple[float, ...]:
    """'1.0-1.0' -> (1.0, 1.0)."""
    try:
        return tuple(float(tok) for tok in str(text).split("-"))
    except ValueError:
        raise ValueError(f"expected dash-separated numbers like 1.0-1.0, got {text!r}") from None


def _named(fn, name):
    fn.__name__ = name  # argparse names the type in its error message
    return fn


DASH_INTS = _named(_dash_ints, "dash-separated integers")
DASH_FLOATS = _named(_dash_floats, "dash-separated numbers")
BOOL = _named(parse_bool, "boolean (true/false)")


def build_parser() -> argparse.ArgumentParser:
    """The command line: every reference flag with its spelling, type and default (spec §1.1)."""
    p = _Parser(
        prog="dlrm_s_pytorch.py",
        description="Train and evaluate DLRM on random, synthetic or Criteo data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument("--arch-sparse-feature-size", dest="embedding_dim", type=int, default=2, help="embedding dimension D; equals the bottom MLP's last width")
    m.add_argument("--arch-embedding-size", dest="table_sizes", type=DASH_INTS, default=_dash_ints("4-3-2"), help="rows of each table (random data)")
    m.add_argument("--arch-mlp-bot", dest="bottom_mlp", type=DASH_INTS, default=_dash_ints("4-3-2"), help="bottom MLP widths, input included")
    m.add_argument("--arch-mlp-top", dest="top_mlp", type=DASH_INTS, default=_dash_ints("4-2-1"), help="top MLP widths, input excluded (computed)")
    m.add_argument("--arch-interaction-op", dest="interaction", choices=["dot", "cat"], default="dot", help="feature interaction")
    m.add_argument("--arch-interaction-itself", dest="interaction_itself", action="store_true", help="include self dot products")
    m.add_argument("--weighted-pooling", dest="weighted_pooling", default=None, help="'fixed' (weights 1.0) or 'learned' per-row pooling weights")
    m.add_argument("--md-flag", dest="md_flag", action="store_true", help="mixed-dimension embeddings")
    m.add_argument("--md-threshold", dest="md_threshold", type=int, default=200, help="tables with more rows use mixed dimensions")
    m.add_argument("--md-temperature", dest="md_temperature", type=float, default=0.3, help="alpha of the mixed-dimension power rule")
    m.add_argument("--md-round-dims", dest="md_round_dims", action="store_true", help="round mixed dimensions to powers of two")
    m.add_argument("--qr-flag", dest="qr_flag", action="store_true", help="quotient-remainder embeddings")
    m.add_argument("--qr-threshold", dest="qr_threshold", type=int, default=200, help="tables with more rows use QR")
    m.add_argument("--qr-operation", dest="qr_operation", choices=["mult", "add", "concat"], default="mult", help="how QR combines its two tables")
    m.add_argument("--qr-collisions", dest="qr_collisions", type=int, default=4, help="QR remainder table size")
    m.add_argument("--activation-function", dest="activation", choices=["relu", "sigmoid", "tanh"], default="relu", help="hidden-layer activation")
    m.add_argument("--loss-function", dest="loss_function", default="mse", help="mse, bce or wbce")
    m.add_argument("--loss-weights", dest="loss_weights", type=DASH_FLOATS, default=_dash_floats("1.0-1.0"), help="wbce weights of class 0 and class 1")
    m.add_argument("--loss-threshold", dest="loss_threshold", type=float, default=0.0, help="if in (0,1), clamp predictions to [t, 1-t]")
    m.add_argument("--round-targets", dest="round_targets", type=BOOL, default=False, help="round random targets to 0/1")
    m.add_argument("--mixed-precision", dest="mixed_precision", choices=["none", "bf16"], default="none",
                   help="not in the reference: run the MLPs and interaction in bfloat16 autocast (faster on CPUs "
                        "with AVX512-BF16/AMX; changes the numbers; tables and updates stay float32)")

    d = p.add_argument_group("data")
    d.add_argument("--data-size", dest="data_size", type=int, default=1, help="random samples")
    d.add_argument("--num-batches", dest="num_batches", type=int, default=0, help="if > 0, train this many batches per epoch")
    d.add_argument("--data-generation", dest="data_generation", choices=["random", "synthetic", "dataset", "internal"], default="random", help="where batches come from")
    d.add_argument("--rand-data-dist", dest="rand_data_dist", default="uniform", help="uniform or gaussian random indices")
    d.add_argument("--rand-data-min", dest="rand_data_min", type=float, default=0, help="gaussian: lowest index")
    d.add_argument("--rand-data-max", dest="rand_data_max", type=float, default=1, help="gaussian: highest index")
    d.add_argument("--rand-data-mu", dest="rand_data_mu", type=float, default=-1, help="gaussian mean; -1: midpoint of min and max")
    d.add_argument("--rand-data-sigma", dest="rand_data_sigma", type=float, default=1, help="gaussian standard deviation")
    d.add_argument("--data-trace-file", dest="data_trace_file", default="./input/dist_emb_j.log", help="synthetic: distribution file, j = table number")
    d.add_argument("--data-set", dest="data_set", choices=["kaggle", "terabyte"], default="kaggle", help="Criteo data set")
    d.add_argument("--raw-data-file", dest="raw_data_file", default="", help="Criteo raw data: train.txt or the day_ prefix")
    d.add_argument("--processed-data-file", dest="processed_data_file", default="", help="Criteo processed .npz")
    d.add_argument("--data-randomize", dest="data_randomize", choices=["total", "day", "none"], default="total", help="Criteo shuffling")
    d.add_argument("--data-trace-enable-padding", dest="data_trace_enable_padding", type=BOOL, default=False, help="synthetic: trace padding")
    d.add_argument("--max-ind-range", dest="max_ind_range", type=int, default=-1, help="if > 0, hash categories modulo this and cap table sizes")
    d.add_argument("--data-sub-sample-rate", dest="data_sub_sample_rate", type=float, default=0.0, help="drop negatives with this probability")
    d.add_argument("--num-indices-per-lookup", dest="num_indices_per_lookup", type=int, default=10, help="random data: largest bag size")
    d.add_argument("--num-indices-per-lookup-fixed", dest="num_indices_per_lookup_fixed", type=BOOL, default=False, help="random data: every bag has exactly that size")
    d.add_argument("--num-workers", dest="num_workers", type=int, default=0, help="Criteo loader workers")
    d.add_argument("--memory-map", dest="memory_map", action="store_true", help="Criteo: day files, memory-mapped")
    d.add_argument("--dataset-multiprocessing", dest="dataset_multiprocessing", action="store_true", help="Criteo: preprocess days in parallel")
    d.add_argument("--mlperf-bin-loader", dest="mlperf_bin_loader", action="store_true", help="Terabyte: MLPerf binary files")
    d.add_argument("--mlperf-bin-shuffle", dest="mlperf_bin_shuffle", action="store_true", help="Terabyte: shuffle binary batches")

    t = p.add_argument_group("training")
    t.add_argument("--mini-batch-size", dest="batch_size", type=int, default=1, help="samples per training batch")
    t.add_argument("--nepochs", dest="nepochs", type=int, default=1, help="epochs")
    t.add_argument("--learning-rate", dest="learning_rate", type=float, default=0.01, help="learning rate")
    t.add_argument("--numpy-rand-seed", dest="seed", type=int, default=123, help="seed of NumPy (all draws) and torch")
    t.add_argument("--sync-dense-params", dest="sync_dense_params", type=BOOL, default=True, help="multi-GPU: re-replicate MLPs every step")
    t.add_argument("--optimizer", dest="optimizer", default="sgd", help="sgd, adagrad or rwsadagrad")
    t.add_argument("--lr-num-warmup-steps", dest="lr_num_warmup_steps", type=int, default=0, help="linear warmup steps")
    t.add_argument("--lr-decay-start-step", dest="lr_decay_start_step", type=int, default=0, help="step where polynomial decay starts")
    t.add_argument("--lr-num-decay-steps", dest="lr_num_decay_steps", type=int, default=0, help="polynomial decay steps")
    t.add_argument("--mlperf-grad-accum-iter", dest="grad_accum_iter", type=int, default=1, help="mlperf: batches per optimizer step")
    t.add_argument("--use-gpu", dest="use_gpu", action="store_true", help="train on CUDA when available")
    t.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1, help="distributed local rank")
    t.add_argument("--dist-backend", dest="dist_backend", default="", help="gloo, nccl, mpi or ccl")

    e = p.add_argument_group("evaluation")
    e.add_argument("--inference-only", dest="inference_only", action="store_true", help="evaluate a loaded model, no training")
    e.add_argument("--quantize-mlp-with-bit", dest="quantize_mlp_bits", type=int, default=32, help="inference: 8 or 16 bit MLPs")
    e.add_argument("--quantize-emb-with-bit", dest="quantize_emb_bits", type=int, default=32, help="inference: 4 or 8 bit tables")
    e.add_argument("--test-freq", dest="test_freq", type=int, default=-1, help="evaluate every N batches (and at the last)")
    e.add_argument("--test-mini-batch-size", dest="test_batch_size", type=int, default=-1, help="test batch size; -1: the training one")
    e.add_argument("--test-num-workers", dest="test_num_workers", type=int, default=-1, help="test loader workers; -1: --num-workers")
    e.add_argument("--mlperf-logging", dest="mlperf_logging", action="store_true", help="scikit-learn metrics and MLPerf events")
    e.add_argument("--mlperf-acc-threshold", dest="mlperf_acc_threshold", type=float, default=0.0, help="stop when test accuracy exceeds this")
    e.add_argument("--mlperf-auc-threshold", dest="mlperf_auc_threshold", type=float, default=0.0, help="stop when test AUC exceeds this")

    o = p.add_argument_group("output")
    o.add_argument("--print-precision", dest="print_precision", type=int, default=5, help="digits of printed parameters")
    o.add_argument("--print-freq", dest="print_freq", type=int, default=1, help="print every N batches (and at the last)")
    o.add_argument("--print-time", dest="print_time", action="store_true", help="print ms/it")
    o.add_argument("--print-wall-time", dest="print_wall_time", action="store_true", help="append (HH:MM) to training lines")
    o.add_argument("--debug-mode", dest="debug_mode", action="store_true", help="print architecture, data and parameters")
    o.add_argument("--enable-profiling", dest="enable_profiling", action="store_true", help="torch.profiler trace and tables")
    o.add_argument("--plot-compute-graph", dest="plot_compute_graph", action="store_true", help="draw the graph (needs torchviz)")
    o.add_argument("--tensor-board-filename", dest="tensor_board_filename", default="run_kaggle_pt", help="TensorBoard directory (if installed)")
    o.add_argument("--save-model", dest="save_model", default="", help="checkpoint path, written at improving tests")
    o.add_argument("--load-model", dest="load_model", default="", help="checkpoint to resume from or evaluate")
    o.add_argument("--save-onnx", dest="save_onnx", action="store_true", help="export dlrm_s_pytorch.onnx")
    return p


# =============================================================================================
# Configuration: the Namespace is read once, here.
# =============================================================================================

LOSSES = ("mse", "bce", "wbce")
OPTIMIZERS = ("sgd", "adagrad", "rwsadagrad")


@dataclass(frozen=True)
class ModelConfig:
    """The network (spec §1.3). ``top_mlp`` includes its computed input width W."""

    embedding_dim: int
    table_sizes: Tuple[int, ...]
    bottom_mlp: Tuple[int, ...]
    top_mlp: Tuple[int, ...]
    interaction: str = "dot"
    interaction_itself: bool = False
    weighted_pooling: Optional[str] = None
    activation: str = "relu"
    loss_threshold: float = 0.0
    mixed_precision: str = "none"
    md_flag: bool = False
    md_threshold: int = 200
    md_temperature: float = 0.3
    md_round_dims: bool = False
    qr_flag: bool = False
    qr_threshold: int = 200
    qr_operation: str = "mult"
    qr_collisions: int = 4


@dataclass(frozen=True)
class TrainConfig:
    """The loops: batches, epochs, optimizer, schedule, printing and testing."""

    batch_size: int = 1
    nepochs: int = 1
    num_batches: int = 0
    learning_rate: float = 0.01
    optimizer: str = "sgd"
    loss_function: str = "mse"
    loss_weights: Tuple[float, ...] = (1.0, 1.0)
    lr_num_warmup_steps: int = 0
    lr_decay_start_step: int = 0
    lr_num_decay_steps: int = 0
    grad_accum_iter: int = 1
    print_freq: int = 1
    test_freq: int = -1
    print_time: bool = False
    print_wall_time: bool = False
    mlperf_logging: bool = False
    mlperf_acc_threshold: float = 0.0
    mlperf_auc_threshold: float = 0.0
    data_generation: str = "random"


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")


def validate_args(ns: argparse.Namespace) -> None:
    """Raise ConfigError, naming the flag, for values that cannot work (spec §1.2 step 3, §1.3)."""
    _positive("--mini-batch-size", ns.batch_size)
    _positive("--arch-sparse-feature-size", ns.embedding_dim)
    _positive("--nepochs", ns.nepochs)
    if ns.test_batch_size == 0:
        raise ConfigError("--test-mini-batch-size must be at least 1 (or -1 for the training size)")
    if ns.learning_rate < 0:
        raise ConfigError(f"--learning-rate must not be negative, got {ns.learning_rate}")
    if ns.loss_function not in LOSSES:
        raise ConfigError(f"--loss-function={ns.loss_function} is not supported (use mse, bce or wbce)")
    if ns.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer={ns.optimizer} is not supported (use sgd, adagrad or rwsadagrad)")
    if ns.loss_function == "wbce" and len(ns.loss_weights) != 2:
        raise ConfigError(f"--loss-weights needs two values (class 0 and class 1), got {len(ns.loss_weights)}")
    for name, widths in (("--arch-mlp-bot", ns.bottom_mlp), ("--arch-mlp-top", ns.top_mlp)):
        if any(w < 1 for w in widths):
            raise ConfigError(f"{name}: every width must be at least 1, got {'-'.join(map(str, widths))}")
    if len(ns.bottom_mlp) < 2:
        raise ConfigError("--arch-mlp-bot needs at least an input and an output width, like 4-3-2")
    if ns.data_generation in ("random", "synthetic"):
        for t, rows in enumerate(ns.table_sizes):
            if rows < 1:
                raise ConfigError(f"--arch-embedding-size: table {t} has {rows} rows (must be at least 1)")
    if ns.print_freq < 1:
        raise ConfigError(f"--print-freq must be at least 1, got {ns.print_freq}")
    _positive("--mlperf-grad-accum-iter", ns.grad_accum_iter)
    for name in ("lr_num_warmup_steps", "lr_decay_start_step", "lr_num_decay_steps"):
        if getattr(ns, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
    if ns.lr_num_decay_steps > 0 and ns.lr_decay_start_step < ns.lr_num_warmup_steps:
        raise ConfigError("Learning rate warmup must finish before the decay starts "
                          "(--lr-decay-start-step < --lr-num-warmup-steps)")
    if ns.weighted_pooling is not None and (ns.qr_flag or ns.md_flag):
        raise ConfigError("--weighted-pooling cannot be combined with --qr-flag or --md-flag")
    if ns.quantize_mlp_bits not in (8, 16, 32):
        raise ConfigError(f"--quantize-mlp-with-bit must be 8, 16 or 32, got {ns.quantize_mlp_bits}")
    if ns.quantize_emb_bits not in (4, 8, 32):
        raise ConfigError(f"--quantize-emb-with-bit must be 4, 8 or 32, got {ns.quantize_emb_bits}")
    if ns.quantize_emb_bits != 32 and (ns.qr_flag or ns.md_flag or ns.use_gpu):
        raise ConfigError("--quantize-emb-with-bit works on CPU with plain tables only "
                          "(not with --qr-flag, --md-flag or --use-gpu)")
    if (ns.mlperf_logging and ns.data_generation in ("random", "synthetic") and not ns.round_targets
            and (ns.test_freq > 0 or ns.inference_only)):
        raise ConfigError("--mlperf-logging computes classification metrics, which need 0/1 targets: "
                          "add --round-targets=true for random or synthetic data")
    if ns.data_generation == "internal":
        raise ConfigError("--data-generation=internal needs Meta-internal loaders, which are not available")


def top_mlp_input_width(interaction: str, itself: bool, num_tables: int, dense_out: int) -> int:
    """W: the interaction's output width (spec §1.4), the top MLP's first width. The interaction
    classes own the formula (``output_width``); this only picks the class."""
    features = num_tables + 1
    layer = DotInteraction(features, itself) if interaction == "dot" else CatInteraction(features)
    return layer.output_width(dense_out)


def model_config(ns: argparse.Namespace, table_sizes: Sequence[int], dense_dim: int) -> ModelConfig:
    """The model's sizes once the data has fixed the tables and dense width (spec §1.2 step 12)."""
    bottom = (dense_dim,) + tuple(ns.bottom_mlp[1:])
    if ns.data_generation in ("random", "synthetic") and ns.bottom_mlp[0] != dense_dim:
        raise ConfigError(f"--arch-mlp-bot input {ns.bottom_mlp[0]} does not match the dense features ({dense_dim})")
    expected = 2 * ns.embedding_dim if (ns.qr_flag and ns.qr_operation == "concat") else ns.embedding_dim
    if bottom[-1] != expected:
        raise ConfigError(
            f"--arch-sparse-feature-size={ns.embedding_dim} does not match the bottom MLP's output width "
            f"{bottom[-1]} (--arch-mlp-bot={'-'.join(map(str, ns.bottom_mlp))}; they must be equal"
            + (", or the output twice the size with QR concat)" if ns.qr_flag else ")")
        )
    width = top_mlp_input_width(ns.interaction, ns.interaction_itself, len(table_sizes), bottom[-1])
    pooling = None if ns.weighted_pooling is None else ("fixed" if ns.weighted_pooling == "fixed" else "learned")
    return ModelConfig(
        embedding_dim=ns.embedding_dim, table_sizes=tuple(int(s) for s in table_sizes), bottom_mlp=bottom,
        top_mlp=(width,) + tuple(ns.top_mlp), interaction=ns.interaction,
        interaction_itself=ns.interaction_itself, weighted_pooling=pooling, activation=ns.activation,
        loss_threshold=ns.loss_threshold, mixed_precision=ns.mixed_precision, md_flag=ns.md_flag, md_threshold=ns.md_threshold,
        md_temperature=ns.md_temperature, md_round_dims=ns.md_round_dims, qr_flag=ns.qr_flag,
        qr_threshold=ns.qr_threshold, qr_operation=ns.qr_operation, qr_collisions=ns.qr_collisions,
    )


def train_config(ns: argparse.Namespace) -> TrainConfig:
    """The loop settings, read from the flags."""
    names = TrainConfig.__dataclass_fields__.keys()
    return TrainConfig(**{name: getattr(ns, name) for name in names})


# =============================================================================================
# Model (spec §1.3-1.5)
# =============================================================================================


def _activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[name]()


def draw_linear(rng: np.random.RandomState, n_in: int, n_out: int) -> nn.Linear:
    """A Linear(n_in -> n_out) initialised from ``rng`` as the reference does (spec §1.3):
    weight ~ normal(0, sqrt(2 / (n_in + n_out))), shape (n_out, n_in), then bias ~ normal(0,
    sqrt(1 / n_out)), both drawn in float64 and cast to float32. torch's own init is skipped."""
    layer = nn.utils.skip_init(nn.Linear, n_in, n_out, bias=True)
    weight = rng.normal(0.0, np.sqrt(2 / (n_out + n_in)), size=(n_out, n_in)).astype(np.float32)
    bias = rng.normal(0.0, np.sqrt(1 / n_out), size=n_out).astype(np.float32)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer


def make_mlp(widths: Sequence[int], rng: np.random.RandomState, activation: str = "relu",
             sigmoid_last: bool = False) -> nn.Sequential:
    """Linear layers between consecutive ``widths``, each followed by an activation.

    Layers are at even indices and activations at odd ones, so state-dict keys are
    ``0.weight``, ``0.bias``, ``2.weight``, ... as in the reference. The last activation is a
    Sigmoid when ``sigmoid_last`` (the top MLP), else the hidden activation (the bottom MLP).
    """
    layers: List[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(draw_linear(rng, n_in, n_out))
        last = i == len(widths) - 2
        layers.append(nn.Sigmoid() if (last and sigmoid_last) else _activation(activation))
    return nn.Sequential(*layers)


def draw_table(rng: np.random.RandomState, rows: int, dim: int, chunk_values: int = 1 << 16) -> torch.Tensor:
    """(rows, dim) float32 weights ~ uniform(-sqrt(1/rows), sqrt(1/rows)) from ``rng`` (spec §1.3).

    Drawn in row chunks into the final float32 tensor: the same stream as one big draw, without the
    float64 copy of the whole table (8 bytes a value) that the reference needs.
    """
    weight = torch.empty(rows, dim, dtype=torch.float32)
    out = weight.numpy()
    bound = np.sqrt(1 / rows)
    step = max(1, chunk_values // max(dim, 1))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        out[start:stop] = rng.uniform(low=-bound, high=bound, size=(stop - start, dim))
    return weight


class PerTableEmbeddings(nn.ModuleList):
    """The reference's embedding layout: one sum-pooled ``nn.EmbeddingBag`` per table, sparse grads.

    Its state-dict keys are ``K.weight`` (under the model: ``emb_l.K.weight``) with shape
    (rows_K, D). Another layout (one fused table, sharded or quantized tables) can replace this
    module as long as ``forward`` keeps its signature and the keys stay the same.

    Args:
        tables: the per-table modules, each called as ``table(indices, offsets, per_sample_weights)``.

    Shape:
        - offsets: (T, B) int64, bag starts per table.
        - indices: (T, N) int64 or a list of T tensors (N_t,).
        - pooling_weights: None, or a list of T per-row weight vectors (rows_t,).
        - Output: a list of T tensors (B, D).
    """

    def forward(self, offsets: torch.Tensor, indices: Union[torch.Tensor, List[torch.Tensor]],
                pooling_weights: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        pooled = []
        for t, table in enumerate(self):
            table_indices = indices[t]
            weights = None if pooling_weights is None else pooling_weights[t][table_indices]
            pooled.append(table(table_indices, offsets[t], per_sample_weights=weights))
        return pooled


class QuantizedTables(nn.Module):
    """Row-wise 8- or 4-bit quantized copies of float tables, for inference (spec §1.11).

    Each table is pre-packed with ``torch.ops.quantized.embedding_bag_{byte,4bit}_prepack`` (a scale
    and bias per row) and looked up with the matching ``*_rowwise_offsets`` op. ``forward`` has
    :class:`PerTableEmbeddings`' signature, so the model needs no other change.

    Args:
        tables: the float tables (``nn.EmbeddingBag``) to quantize.
        bits: 8 or 4.
    """

    def __init__(self, tables: PerTableEmbeddings, bits: int):
        super().__init__()
        if bits not in (4, 8):
            raise ConfigError(f"--quantize-emb-with-bit must be 4 or 8 to quantize, got {bits}")
        if not all(isinstance(t, nn.EmbeddingBag) for t in tables):
            raise ConfigError("--quantize-emb-with-bit works on plain tables only (not with --qr-flag or --md-flag)")
        ops = torch.ops.quantized
        prepack = ops.embedding_bag_byte_prepack if bits == 8 else ops.embedding_bag_4bit_prepack
        self._lookup = ops.embedding_bag_byte_rowwise_offsets if bits == 8 else ops.embedding_bag_4bit_rowwise_offsets
        for t, table in enumerate(tables):
            self.register_buffer(f"packed_{t}", prepack(table.weight.detach().float().contiguous()))
        self.num_tables = len(tables)

    def forward(self, offsets: torch.Tensor, indices: Union[torch.Tensor, List[torch.Tensor]],
                pooling_weights: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        pooled = []
        for t in range(self.num_tables):
            table_indices = indices[t]
            weights = None if pooling_weights is None else pooling_weights[t][table_indices].float()
            pooled.append(self._lookup(getattr(self, f"packed_{t}"), table_indices, offsets[t], False, 0, False,
                                       weights, None, False))
        return pooled


class ShardedTables(nn.ModuleDict):
    """This rank's contiguous shard of the tables, in a multi-process run (spec §4).

    Keys are the global table numbers, so the state-dict keys stay ``emb_l.K.weight``. ``forward``
    has :class:`PerTableEmbeddings`' signature: it looks up the local tables for the whole global
    batch and returns, through the all-to-all, all T tables' outputs for this rank's batch rows.

    Shape:
        - offsets: (T, B); indices: (T, N) or list of T (N_t,), for the whole batch.
        - Output: a list of T tensors (B_local, D).
    """

    def __init__(self, tables: Dict[int, nn.Module], table_counts: Sequence[int], info: DistInfo):
        super().__init__({str(k): table for k, table in tables.items()})
        self.table_counts = list(table_counts)
        self.info = info

    def forward(self, offsets: torch.Tensor, indices: Union[torch.Tensor, List[torch.Tensor]],
                pooling_weights: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        local = [table(indices[int(k)], offsets[int(k)]) for k, table in self.items()]  # n_local x (B, D)
        return list(ButterflyShuffle.apply(self.info, self.table_counts, *local))


def _skip_draws(rng: np.random.RandomState, count: int, chunk: int = 1 << 20) -> None:
    """Advance ``rng`` by ``count`` uniform draws without keeping them (another rank's table)."""
    for start in range(0, count, chunk):
        rng.random_sample(min(chunk, count - start))


def build_tables(cfg: ModelConfig, rng: np.random.RandomState, info: DistInfo = DistInfo()) -> nn.Module:
    """The T tables in table order, each drawn from ``rng`` (plain, QR or mixed-dimension).

    In a multi-process run only this rank's shard is kept, but every table's draws are made, so
    each table holds exactly the values it has in a single process."""
    if info.world_size > 1:
        shards = [shard(len(cfg.table_sizes), info.world_size, r) for r in range(info.world_size)]
        start, stop = shards[info.rank]
        tables = {}
        for k, rows in enumerate(cfg.table_sizes):
            if start <= k < stop:
                weight = draw_table(rng, rows, cfg.embedding_dim)
                tables[k] = nn.EmbeddingBag(rows, cfg.embedding_dim, mode="sum", sparse=True, _weight=weight)
            else:
                _skip_draws(rng, rows * cfg.embedding_dim)
        return ShardedTables(tables, [b - a for a, b in shards], info)
    dims = _table_dims(cfg)
    tables = []
    for rows, dim in zip(cfg.table_sizes, dims):
        if cfg.qr_flag and rows > cfg.qr_threshold:
            from tricks.qr_embedding_bag import QREmbeddingBag

            table = QREmbeddingBag(rows, dim, cfg.qr_collisions, operation=cfg.qr_operation, mode="sum", sparse=True)
            table.reset_parameters(rng)
        elif cfg.md_flag and rows > cfg.md_threshold:
            from tricks.md_embedding_bag import PrEmbeddingBag

            table = PrEmbeddingBag(rows, dim, max(dims))
            table.reset_parameters(rng)
        else:
            table = nn.EmbeddingBag(rows, dim, mode="sum", sparse=True, _weight=draw_table(rng, rows, dim))
        tables.append(table)
    return PerTableEmbeddings(tables)


def _table_dims(cfg: ModelConfig) -> List[int]:
    """Each table's dimension: D; the mixed dimensions of spec §5.2 with ``--md-flag`` (tables up to
    ``--md-threshold`` rows keep D); with QR ``concat``, 2D for the plain tables, so that every table
    outputs 2D like the QR ones (the reference mixed D and 2D and crashed, spec §8 bug 15)."""
    if cfg.qr_flag and cfg.qr_operation == "concat":
        return [cfg.embedding_dim if rows > cfg.qr_threshold else 2 * cfg.embedding_dim for rows in cfg.table_sizes]
    if not cfg.md_flag:
        return [cfg.embedding_dim] * len(cfg.table_sizes)
    from tricks.md_embedding_bag import md_solver

    dims = md_solver(torch.tensor(cfg.table_sizes), cfg.md_temperature, d0=cfg.embedding_dim,
                     round_dim=cfg.md_round_dims)
    return [int(d) if rows > cfg.md_threshold else cfg.embedding_dim for d, rows in zip(dims, cfg.table_sizes)]


class DotInteraction(nn.Module):
    """Pairwise dot products of the bottom-MLP output and the pooled embeddings.

    Output order (fixed: checkpoints and printed numbers depend on it): the bottom-MLP vector x
    itself, then <v_i, v_j> for the features v = [x, e_1, ..., e_T] over the strictly lower
    triangle, read row by row: (1,0), (2,0), (2,1), (3,0), ... ; with ``self_interaction`` the
    diagonal is included, j <= i: (0,0), (1,0), (1,1), (2,0), ... (spec §1.4). This is NOT
    TorchRec's order; reordering would permute the columns of ``top_l.0.weight`` and break
    reference checkpoints. The pair indices are built once, as non-persistent buffers.

    Args:
        num_features: F = T + 1.
        self_interaction: include the diagonal.

    Shape:
        - dense: (B, D); embedded: list of T tensors (B, D).
        - Output: (B, D + P), P = F(F-1)/2 (or F(F+1)/2 with the diagonal).
    """

    def __init__(self, num_features: int, self_interaction: bool = False):
        super().__init__()
        extra = 1 if self_interaction else 0
        pairs = [(i, j) for i in range(num_features) for j in range(i + extra)]  # row by row
        self.register_buffer("rows", torch.tensor([i for i, _ in pairs], dtype=torch.long), persistent=False)
        self.register_buffer("cols", torch.tensor([j for _, j in pairs], dtype=torch.long), persistent=False)

    def output_width(self, dim: int) -> int:
        return dim + self.rows.numel()

    def forward(self, dense: torch.Tensor, embedded: List[torch.Tensor]) -> torch.Tensor:
        batch, dim = dense.shape
        features = torch.cat([dense] + embedded, dim=1).view(batch, -1, dim)  # (B, F, D)
        products = torch.bmm(features, features.transpose(1, 2))  # (B, F, F)
        pairs = products[:, self.rows, self.cols]  # (B, P)
        return torch.cat([dense, pairs], dim=1)  # (B, D + P)


class CatInteraction(nn.Module):
    """Concatenation [x, e_1, ..., e_T] (spec §1.4). Output (B, F * D)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def output_width(self, dim: int) -> int:
        return self.num_features * dim

    def forward(self, dense: torch.Tensor, embedded: List[torch.Tensor]) -> torch.Tensor:
        return torch.cat([dense] + embedded, dim=1)


class DLRM(nn.Module):
    """The DLRM network: bottom MLP, embedding tables, interaction, top MLP with a sigmoid.

    Parameters are drawn from ``rng`` in the reference's order (spec §1.3, §7.3): every table,
    then the bottom MLP layers, then the top MLP layers; so the same seed gives the same numbers.
    State-dict keys: ``emb_l.K.weight``, ``v_W_l.K`` (learned pooling), ``bot_l.N.weight/bias``,
    ``top_l.N.weight/bias``.

    Args:
        cfg: sizes and options.
        rng: the NumPy legacy stream (seeded with ``--numpy-rand-seed``).

    Shape:
        - dense_x: (B, M); offsets: (T, B); indices: (T, N) or list of T (N_t,).
        - Output: (B, 1) probabilities; in a multi-process run (B_local, 1) for this rank's rows.
    """

    def __init__(self, cfg: ModelConfig, rng: np.random.RandomState, info: DistInfo = DistInfo()):
        super().__init__()
        self.cfg = cfg
        self.info = info
        self.emb_l = build_tables(cfg, rng, info)
        if cfg.weighted_pooling == "learned":
            self.v_W_l = nn.ParameterList([nn.Parameter(torch.ones(rows)) for rows in cfg.table_sizes])
        elif cfg.weighted_pooling == "fixed":
            for t, rows in enumerate(cfg.table_sizes):
                self.register_buffer(f"fixed_pooling_{t}", torch.ones(rows), persistent=False)
        self.bot_l = make_mlp(cfg.bottom_mlp, rng, cfg.activation, sigmoid_last=False)
        self.top_l = make_mlp(cfg.top_mlp, rng, cfg.activation, sigmoid_last=True)
        features = len(cfg.table_sizes) + 1
        if cfg.interaction == "dot":
            self.interaction = DotInteraction(features, cfg.interaction_itself)
        else:
            self.interaction = CatInteraction(features)

    def pooling_weights(self) -> Optional[List[torch.Tensor]]:
        if self.cfg.weighted_pooling == "learned":
            return list(self.v_W_l)
        if self.cfg.weighted_pooling == "fixed":
            return [getattr(self, f"fixed_pooling_{t}") for t in range(len(self.cfg.table_sizes))]
        return None

    def forward(self, dense_x: torch.Tensor, offsets: torch.Tensor,
                indices: Union[torch.Tensor, List[torch.Tensor]]) -> torch.Tensor:
        with record_function("DLRM embedding forward"):
            embedded = self.emb_l(offsets, indices, self.pooling_weights())  # T x (B, D)
        if self.info.world_size > 1:  # this rank's rows of the global batch (spec §4)
            start, stop = shard(dense_x.shape[0], self.info.world_size, self.info.rank)
            dense_x = dense_x[start:stop]
        bf16 = self.cfg.mixed_precision == "bf16"
        with torch.autocast(dense_x.device.type, dtype=torch.bfloat16, enabled=bf16):
            with record_function("DLRM bottom nlp forward"):
                x = self.bot_l(dense_x)  # (B, D)
            with record_function("DLRM interaction forward"):
                z = self.interaction(x, embedded)  # (B, W)
            with record_function("DLRM top nlp forward"):
                p = self.top_l(z)  # (B, 1)
        p = p.float()
        threshold = self.cfg.loss_threshold
        if 0.0 < threshold < 1.0:
            p = torch.clamp(p, min=threshold, max=1.0 - threshold)
        return p


def make_loss(name: str, class_weights: Sequence[float] = (1.0, 1.0)) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of ``probs`` (B, 1) against ``labels`` (B, 1) (spec §1.5).

    mse and bce are batch means. wbce weighs each sample's BCE by ``class_weights[label]`` (labels
    must be 0/1) in float64, as the reference does, then takes the mean.
    """
    if name == "mse":
        return nn.MSELoss(reduction="mean")
    if name == "bce":
        return nn.BCELoss(reduction="mean")
    if name == "wbce":
        weights = torch.tensor(class_weights, dtype=torch.float64)
        bce = nn.BCELoss(reduction="none")

        def weighted_bce(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            per_sample = weights.to(labels.device)[labels.long()] * bce(probs, labels)
            return per_sample.mean()

        return weighted_bce
    raise ConfigError(f"--loss-function={name} is not supported (use mse, bce or wbce)")


# =============================================================================================
# Output: pure formatters (spec §1.6, §1.8) and one rank-aware printer
# =============================================================================================


class Logger:
    """Prints on the main rank only, flushing every line."""

    def __init__(self, dist: DistInfo = DistInfo(), stream=None):
        self.enabled = dist.is_main
        self.stream = stream

    def __call__(self, text: object = "") -> None:
        if self.enabled:
            print(text, file=self.stream or sys.stdout, flush=True)


def format_train_line(step: int, nbatches: int, epoch: int, ms_per_it: float, loss: float,
                      wall_time: Optional[str] = None, inference: bool = False) -> str:
    """``Finished training it 1/3 of epoch 0, -1.00 ms/it, loss 0.025266`` (spec §1.6)."""
    mode = "inference" if inference else "training"
    line = f"Finished {mode} it {step}/{nbatches} of epoch {epoch}, {ms_per_it:.2f} ms/it, loss {loss:.6f}"
    return line + (f" ({wall_time})" if wall_time else "")


def format_test_header(step: int, nbatches: int, epoch: int) -> str:
    return f"Testing at - {step}/{nbatches} of epoch {epoch},"


def format_accuracy_line(acc: float, best_acc: float) -> str:
    """`` accuracy 50.000 %, best 50.000 %`` (leading space, spec §1.8)."""
    return f" accuracy {acc * 100:3.3f} %, best {best_acc * 100:3.3f} %"


def format_mlperf_metrics_line(m: Dict[str, float], best_auc: float, best_acc: float) -> str:
    """The scikit-learn metrics line of ``--mlperf-logging`` (spec §1.8)."""
    return (f"recall {m['recall']:.4f}, precision {m['precision']:.4f}, f1 {m['f1']:.4f}, "
            f"ap {m['ap']:.4f}, auc {m['roc_auc']:.4f}, best auc {best_auc:.4f}, "
            f"accuracy {m['accuracy'] * 100:3.3f} %, best accuracy {best_acc * 100:3.3f} %")


def format_arch(cfg: ModelConfig, dense_dim: int) -> List[str]:
    """The ``--debug-mode`` architecture block (spec §1.15 item 2)."""
    top, bot = np.array(cfg.top_mlp), np.array(cfg.bottom_mlp)
    dims = cfg.embedding_dim if not cfg.md_flag else _table_dims(cfg)
    return [
        "model arch:",
        f"mlp top arch {top.size - 1} layers, with input to output dimensions:", str(top),
        "# of interactions", str(cfg.top_mlp[0]),
        f"mlp bot arch {bot.size - 1} layers, with input to output dimensions:", str(bot),
        "# of features (sparse and dense)", str(len(cfg.table_sizes) + 1),
        "dense feature size", str(dense_dim),
        "sparse feature size", str(dims),
        f"# of embeddings (= # of sparse features) {len(cfg.table_sizes)}, with dimensions {dims}x:",
        str(np.array(cfg.table_sizes)),
    ]


def format_batch(j: int, batch: Batch) -> List[str]:
    """The ``--debug-mode`` print of one batch (spec §1.15 item 3): dense, bag lengths (T, B)
    int32, the per-table index tensors, and the targets."""
    counts = [len(batch.indices[t]) for t in range(batch.offsets.shape[0])]
    ends = torch.cat([batch.offsets[:, 1:], torch.tensor(counts, dtype=torch.long).view(-1, 1)], dim=1)
    lengths = (ends - batch.offsets).to(torch.int32)
    indices = [batch.indices[t] for t in range(len(counts))]
    return [f"mini-batch: {j}", str(batch.dense_x), str(lengths), str(indices), str(batch.labels)]


def format_parameters(model: nn.Module, precision: int) -> List[str]:
    """Every parameter as a NumPy array, in ``parameters()`` order (spec §1.15 items 4 and 6)."""
    with np.printoptions(precision=precision):
        return [str(p.detach().cpu().numpy()) for p in model.parameters()]


# =============================================================================================
# Optimizer and learning-rate schedule (spec §1.7)
# =============================================================================================


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """sgd, adagrad or the row-wise sparse adagrad, over every parameter in one group."""
    params = list(model.parameters())
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name == "rwsadagrad":
        from optim.rwsadagrad import RWSAdagrad

        return RWSAdagrad(params, lr=lr)
    raise ConfigError(f"--optimizer={name} is not supported (use sgd, adagrad or rwsadagrad)")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    from optim.lr_schedule import LRPolicyScheduler

    return LRPolicyScheduler(optimizer, cfg.lr_num_warmup_steps, cfg.lr_decay_start_step, cfg.lr_num_decay_steps)


# =============================================================================================
# Training and evaluation (spec §1.6, §1.8)
# =============================================================================================


@dataclass
class TrainState:
    """What the loops carry between batches and tests (and what a checkpoint restores)."""

    best_acc: float = 0.0
    best_auc: float = 0.0
    skip_epoch: int = 0
    skip_batch: int = 0
    stop: bool = False
    total_time: float = 0.0
    total_iter: int = 0
    total_samples: int = 0
    total_loss: Optional[torch.Tensor] = None
    onnx_batch: Optional[Batch] = None


@dataclass
class RunParts:
    """Everything the loops need, built once by ``main``."""

    model: DLRM
    loss_fn: Callable
    optimizer: Optional[torch.optim.Optimizer]
    scheduler: object
    train_loader: object
    test_loader: object
    nbatches: int
    nbatches_test: int
    device: torch.device
    log: Logger
    writer: object = None
    mlperf: MLPerfLogger = field(default_factory=MLPerfLogger)
    save_model: str = ""
    info: DistInfo = DistInfo()


def to_device(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    indices = batch.indices.to(device) if isinstance(batch.indices, torch.Tensor) else [i.to(device) for i in batch.indices]
    return Batch(batch.dense_x.to(device), batch.offsets.to(device), indices, batch.labels.to(device))


def local_rows(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's contiguous rows of a whole-batch tensor (all of it in a single process)."""
    if info.world_size == 1:
        return tensor
    start, stop = shard(tensor.shape[0], info.world_size, info.rank)
    return tensor[start:stop]


def _dense_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The data-parallel parameters (everything but the sharded tables)."""
    return [p for name, p in model.named_parameters() if not name.startswith("emb_l.")]


def _sync(device: torch.device) -> float:
    """Wall time, after waiting for the GPU (the reference's ``time_wrap``)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def evaluate(parts: RunParts, cfg: TrainConfig, state: TrainState, log_iter: int) -> Dict[str, float]:
    """One pass over the test loader (spec §1.8). Updates ``state.best_acc``/``best_auc`` (the
    reference never kept them, spec §8 bug 4) and returns the metrics plus ``is_best``."""
    model, device = parts.model, parts.device
    correct, samples = 0, 0
    scores, targets = [], []
    model.eval()
    with torch.no_grad():
        for batch in parts.test_loader:
            if parts.info.world_size > 1 and batch.labels.shape[0] % parts.info.world_size:
                continue  # as in training (spec §4): every rank needs rows of the batch
            batch = to_device(batch, device)
            probs = model(batch.dense_x, batch.offsets, batch.indices)
            labels = local_rows(batch.labels, parts.info)
            with record_function("DLRM accuracy compute"):
                if cfg.mlperf_logging:
                    scores.append(probs.detach().cpu().numpy())
                    targets.append(labels.detach().cpu().numpy())
                else:
                    correct += int((torch.round(probs) == labels).sum().item())
                    samples += labels.shape[0]
    model.train()
    correct, samples = (int(v) for v in all_reduce_sum([correct, samples], parts.info))
    if cfg.mlperf_logging:
        scores = [x for part in gather_objects(scores, parts.info) for x in part]
        targets = [x for part in gather_objects(targets, parts.info) for x in part]
        metrics = _sklearn_metrics(np.concatenate(scores).ravel(), np.concatenate(targets).ravel())
        is_best = metrics["roc_auc"] > state.best_auc
        state.best_auc = max(state.best_auc, metrics["roc_auc"])
        state.best_acc = max(state.best_acc, metrics["accuracy"])
        parts.log(format_mlperf_metrics_line(metrics, state.best_auc, state.best_acc))
        for name, value in metrics.items():
            _scalar(parts.writer, f"mlperf-metrics-test/{name}", value, log_iter)
    else:
        acc = correct / max(samples, 1)
        is_best = acc > state.best_acc
        state.best_acc = max(state.best_acc, acc)
        metrics = {"accuracy": acc}
        _scalar(parts.writer, "Test/Acc", acc, log_iter)
        parts.log(format_accuracy_line(acc, state.best_acc))
    metrics["is_best"] = is_best
    return metrics


def _sklearn_metrics(scores: np.ndarray, targets: np.ndarray) -> Dict[str, float]:
    """recall, precision, f1 and accuracy of rounded scores; ap and roc_auc of raw scores."""
    from sklearn import metrics as skm

    with record_function("DLRM mlperf sklearn metrics compute"):
        rounded = np.round(scores)
        return {
            "recall": skm.recall_score(targets, rounded, zero_division=0),
            "precision": skm.precision_score(targets, rounded, zero_division=0),
            "f1": skm.f1_score(targets, rounded, zero_division=0),
            "ap": skm.average_precision_score(targets, scores),
            "roc_auc": skm.roc_auc_score(targets, scores) if len(np.unique(targets)) > 1 else 0.5,
            "accuracy": skm.accuracy_score(targets, rounded),
        }


def _scalar(writer, tag: str, value: float, step: int) -> None:
    if writer is not None:
        writer.add_scalar(tag, value, step)


def train_step(parts: RunParts, cfg: TrainConfig, batch: Batch, j: int) -> torch.Tensor:
    """Forward, loss, backward and (every ``grad_accum_iter`` batches) an optimizer step.

    Gradients accumulate over ``grad_accum_iter`` batches, each loss scaled by 1/accum, and are
    zeroed only after the step (the reference zeroed them before the stepping backward, spec §8
    bug 6). With the default of 1 this is the reference's plain step.
    """
    accum = cfg.grad_accum_iter if cfg.mlperf_logging else 1
    with record_function("DLRM forward"):
        probs = parts.model(batch.dense_x, batch.offsets, batch.indices)
    with record_function("DLRM loss compute"):
        loss = parts.loss_fn(probs, local_rows(batch.labels, parts.info))
    with record_function("DLRM backward"):
        (loss / accum if accum > 1 else loss).backward()
        if parts.info.world_size > 1:
            average_gradients(_dense_parameters(parts.model), parts.info)
    if (j + 1) % accum == 0:
        parts.optimizer.step()
        parts.scheduler.step()
        parts.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _report_and_test(parts: RunParts, cfg: TrainConfig, state: TrainState, j: int, k: int) -> None:
    """Print the training line and, when due, test, save and check the MLPerf thresholds."""
    nb = parts.nbatches
    should_print = (j + 1) % cfg.print_freq == 0 or j + 1 == nb
    should_test = cfg.test_freq > 0 and cfg.data_generation in ("dataset", "random", "synthetic") and (
        (j + 1) % cfg.test_freq == 0 or j + 1 == nb)
    if not (should_print or should_test):
        return
    log_iter = nb * k + j + 1
    ms = 1000.0 * state.total_time / state.total_iter if cfg.print_time and state.total_iter else -1.0
    loss = _mean_loss(state, parts.info)  # sync point: printing
    state.total_time, state.total_iter, state.total_samples, state.total_loss = 0.0, 0, 0, None
    wall = time.strftime("%H:%M") if cfg.print_wall_time else None
    parts.log(format_train_line(j + 1, nb, k, ms, loss, wall))
    _scalar(parts.writer, "Train/Loss", loss, log_iter)
    if not should_test:
        return
    parts.log(format_test_header(j + 1, nb, k))
    parts.mlperf.start("eval_start", epoch_num=(j + 1) / nb + k + 1)
    metrics = evaluate(parts, cfg, state, log_iter)
    parts.mlperf.end("eval_stop", epoch_num=(j + 1) / nb + k + 1)
    if metrics["is_best"] and parts.save_model:
        parts.log(f"Saving model to {parts.save_model}")
        payload = _checkpoint_payload(parts, cfg.nepochs, metrics, loss, j, k)  # every rank takes part
        if parts.info.is_main:
            save_checkpoint(parts.save_model, payload)
    _check_thresholds(parts, cfg, state)


def _mean_loss(state: TrainState, info: DistInfo) -> float:
    """The mean training loss since the last print; over all ranks' rows in a multi-process run."""
    if not state.total_samples:
        return 0.0
    if info.world_size == 1:  # float32 throughout, as the reference accumulates it
        return float((state.total_loss / state.total_samples).item())
    total, samples = all_reduce_sum([float(state.total_loss.item()), state.total_samples], info)
    return total / samples


def _check_thresholds(parts: RunParts, cfg: TrainConfig, state: TrainState) -> None:
    """Stop the whole run once a test passes an MLPerf threshold (spec §8 bugs 4 and 5)."""
    if cfg.mlperf_acc_threshold > 0 and state.best_acc > cfg.mlperf_acc_threshold:
        parts.log(f"MLPerf testing accuracy threshold {cfg.mlperf_acc_threshold:f} reached, stop training")
        state.stop = True
    if cfg.mlperf_auc_threshold > 0 and state.best_auc > cfg.mlperf_auc_threshold:
        parts.log(f"MLPerf testing auc threshold {cfg.mlperf_auc_threshold:f} reached, stop training")
        parts.mlperf.end("run_stop", status="success")
        state.stop = True


def train_one_epoch(parts: RunParts, cfg: TrainConfig, state: TrainState, k: int) -> None:
    """One pass over the training loader (spec §1.6), resuming after ``state.skip_batch`` in the
    checkpoint's epoch. Losses are accumulated on the device; only printing reads them back."""
    device = parts.device
    for j, batch in enumerate(parts.train_loader):
        if j >= parts.nbatches:
            break
        if j == 0 and state.onnx_batch is None:
            state.onnx_batch = batch
        if k == state.skip_epoch and j < state.skip_batch:
            continue
        if parts.info.world_size > 1 and batch.labels.shape[0] % parts.info.world_size:
            parts.log(f"Warning: Skiping the batch {j} with size {batch.labels.shape[0]}")
            continue
        batch = to_device(batch, device)
        t1 = _sync(device)
        loss = train_step(parts, cfg, batch, j)
        t2 = _sync(device)
        n = batch.labels.shape[0] // parts.info.world_size
        weighted = loss * n
        state.total_loss = weighted if state.total_loss is None else state.total_loss + weighted
        state.total_time += t2 - t1
        state.total_iter += 1
        state.total_samples += n
        _report_and_test(parts, cfg, state, j, k)
        if state.stop:
            return


def train(parts: RunParts, cfg: TrainConfig, state: TrainState) -> None:
    """Every epoch from the checkpoint's (if any) on, until done or an MLPerf threshold stops it."""
    for k in range(state.skip_epoch, cfg.nepochs):
        parts.mlperf.start("block_start", first_epoch_num=k + 1, epoch_count=1)
        parts.mlperf.start("epoch_start", epoch_num=k + 1)
        train_one_epoch(parts, cfg, state, k)
        parts.mlperf.end("epoch_stop", epoch_num=k + 1)
        parts.mlperf.end("block_stop", first_epoch_num=k + 1)
        if state.stop:
            return
    if cfg.mlperf_auc_threshold > 0:
        parts.mlperf.end("run_stop", status="aborted")


# =============================================================================================
# Checkpoints (spec §1.10)
# =============================================================================================


def _checkpoint_payload(parts: RunParts, nepochs: int, metrics: Dict[str, float],
                        train_loss: float, j: int, k: int) -> Dict[str, object]:
    payload = {
        "nepochs": nepochs, "nbatches": parts.nbatches, "nbatches_test": parts.nbatches_test,
        "state_dict": full_state_dict(parts.model, parts.info), "test_acc": float(metrics["accuracy"]),
        "epoch": k, "iter": j + 1, "train_loss": float(train_loss), "total_loss": 0.0,
        "opt_state_dict": full_optimizer_state(parts.optimizer, parts.model, parts.info),
        "lr_scheduler_state_dict": parts.scheduler.state_dict(),
    }
    if "roc_auc" in metrics:
        payload["test_auc"] = float(metrics["roc_auc"])
    return payload


def full_state_dict(model: nn.Module, info: DistInfo) -> Dict[str, torch.Tensor]:
    """The model's state dict with every table, gathered from all ranks in a multi-process run,
    keys in the single-process order (tables first). Complete on rank 0, the rank that saves."""
    state = model.state_dict()
    if info.world_size == 1:
        return state
    tables = {}
    for part in gather_objects({k: v for k, v in state.items() if k.startswith("emb_l.")}, info, main_only=True):
        tables.update(part)
    ordered = {k: tables[k] for k in sorted(tables, key=lambda key: int(key.split(".")[1]))}
    ordered.update((k, v) for k, v in state.items() if not k.startswith("emb_l."))
    return ordered


def _full_parameter_names(model: DLRM) -> List[str]:
    """Parameter names in a single process's ``parameters()`` order (all tables first)."""
    tables = [f"emb_l.{k}.weight" for k in range(len(model.cfg.table_sizes))]
    return tables + [n for n, _ in model.named_parameters() if not n.startswith("emb_l.")]


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: DLRM, info: DistInfo) -> dict:
    """The optimizer's state dict in the single-process layout (every table's state, gathered on
    rank 0, the rank that saves)."""
    state = optimizer.state_dict()
    if info.world_size == 1:
        return state
    local = [n for n, _ in model.named_parameters()]
    index = {n: i for i, n in enumerate(_full_parameter_names(model))}
    merged = {}
    for part in gather_objects({index[local[i]]: v for i, v in state["state"].items()}, info, main_only=True):
        merged.update(part)
    groups = [{**g, "params": list(range(len(index)))} for g in state["param_groups"]]
    return {"state": dict(sorted(merged.items())), "param_groups": groups}


def local_optimizer_state(state: dict, model: DLRM, info: DistInfo) -> dict:
    """A single-process-layout optimizer state dict cut down to this rank's parameters."""
    if info.world_size == 1:
        return state
    local = [n for n, _ in model.named_parameters()]
    index = {n: i for i, n in enumerate(_full_parameter_names(model))}
    kept = {i: state["state"][index[n]] for i, n in enumerate(local) if index[n] in state["state"]}
    groups = [{**g, "params": list(range(len(local)))} for g in state["param_groups"]]
    return {"state": kept, "param_groups": groups}


def restore_checkpoint(path: str, parts: RunParts, state: TrainState, nepochs: int,
                       inference_only: bool, mlperf: bool) -> None:
    """Load weights (and, when training, the optimizer, schedule and position) from ``path``."""
    payload = load_checkpoint(path, map_location=parts.device)
    parts.log(f"Loading saved model {path}")
    own = parts.model.state_dict().keys()
    weights = payload["state_dict"]
    if parts.info.world_size > 1:  # this rank's tables and the MLPs
        weights = {k: v for k, v in weights.items() if k in own or not k.startswith("emb_l.")}
    try:
        parts.model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not fit this model ({str(exc).splitlines()[0]})") from None
    epoch, it = int(payload.get("epoch", 0)), int(payload.get("iter", 0))
    saved_nb = int(payload.get("nbatches", parts.nbatches))
    parts.log(f"Saved at: epoch = {epoch}/{payload.get('nepochs', nepochs)}, batch = {it}/{saved_nb}, "
              f"ntbatch = {payload.get('nbatches_test', parts.nbatches_test)}")
    parts.log(f"Training state: loss = {as_float(payload.get('train_loss')):.6f}")
    acc = as_float(payload.get("test_acc"))
    auc = payload.get("test_auc")
    parts.log(f"Testing state: accuracy = {acc * 100:3.3f} %" + (f", auc = {as_float(auc):.3f}" if mlperf and auc is not None else ""))
    state.best_acc = acc
    state.best_auc = as_float(auc)
    if inference_only:
        return
    if "opt_state_dict" in payload and parts.optimizer is not None:
        try:
            parts.optimizer.load_state_dict(local_optimizer_state(payload["opt_state_dict"], parts.model, parts.info))
        except (ValueError, KeyError, IndexError):
            print(f"warning: {path}: its optimizer state has another layout (parameter groups); "
                  "continuing with the weights only", file=sys.stderr)
    if "lr_scheduler_state_dict" in payload and parts.scheduler is not None:
        parts.scheduler.load_state_dict(payload["lr_scheduler_state_dict"])
    state.skip_epoch, state.skip_batch = epoch, it


# =============================================================================================
# Optional side channels: TensorBoard, MLPerf events, profiling, ONNX
# =============================================================================================


def _make_writer(name: str):
    """A TensorBoard SummaryWriter when tensorboard is installed, else None (never required)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=os.path.join(".", name))


@contextmanager
def _profiling(enabled: bool, use_cuda: bool):
    """torch.profiler around the run; afterwards the reference's three files (spec §1.9)."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        yield
    stamp = str(datetime.datetime.now()).replace(" ", "_")
    base = f"dlrm_s_pytorch{stamp}"
    sort_key = "self_cuda_time_total" if use_cuda else "self_cpu_time_total"
    with open(f"{base}_shape.prof", "w") as f:
        f.write(prof.key_averages(group_by_input_shape=True).table(sort_by=sort_key))
    with open(f"{base}_total.prof", "w") as f:
        f.write(prof.key_averages().table(sort_by=sort_key))
    prof.export_chrome_trace(f"{base}.json")


# =============================================================================================
# main
# =============================================================================================


def _random_data_config(ns: argparse.Namespace):
    from dlrm_data_pytorch import RandomDataConfig, validate_random_config

    cfg = RandomDataConfig(
        dense_dim=ns.bottom_mlp[0], table_sizes=tuple(ns.table_sizes), data_size=ns.data_size,
        batch_size=ns.batch_size, num_batches=ns.num_batches,
        num_indices_per_lookup=ns.num_indices_per_lookup, fixed=ns.num_indices_per_lookup_fixed,
        distribution=ns.rand_data_dist, rand_min=ns.rand_data_min, rand_max=ns.rand_data_max,
        rand_mu=ns.rand_data_mu, rand_sigma=ns.rand_data_sigma, round_targets=ns.round_targets,
        seed=ns.seed, generation=ns.data_generation, trace_file=ns.data_trace_file,
        trace_padding=ns.data_trace_enable_padding,
    )
    validate_random_config(cfg)
    return cfg


def make_data(ns: argparse.Namespace, rng: np.random.RandomState, log: Logger):
    """(train_loader, test_loader, table_sizes, dense_dim) for the chosen data source."""
    if ns.data_generation in ("random", "synthetic"):
        from dlrm_data_pytorch import make_random_data_and_loaders

        cfg = _random_data_config(ns)
        _, train_ld, _, test_ld = make_random_data_and_loaders(cfg, rng, log)
        return train_ld, test_ld, cfg.table_sizes, cfg.dense_dim
    from criteo_data import CriteoLoaderConfig, make_criteo_data_and_loaders
    from data_utils import PreprocessConfig

    data = PreprocessConfig(
        data_set=ns.data_set, raw_data_file=ns.raw_data_file, processed_data_file=ns.processed_data_file,
        max_ind_range=ns.max_ind_range, sub_sample_rate=ns.data_sub_sample_rate, randomize=ns.data_randomize,
        memory_map=ns.memory_map, multiprocessing=ns.dataset_multiprocessing, seed=ns.seed,
    )
    cfg = CriteoLoaderConfig(
        preprocess=data, batch_size=ns.batch_size, test_batch_size=ns.test_batch_size, num_workers=ns.num_workers,
        test_num_workers=ns.test_num_workers, mlperf_logging=ns.mlperf_logging,
        mlperf_bin_loader=ns.mlperf_bin_loader, mlperf_bin_shuffle=ns.mlperf_bin_shuffle,
    )
    # Preprocessing draws from its own stream with the run's seed: the same draws as the reference's (it
    # was the first consumer there), and the training stream does not depend on whether it ran.
    data = make_criteo_data_and_loaders(cfg, rng, log=log)
    return data.train_loader, data.test_loader, data.table_sizes, data.dense_dim


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and validate the flags; fills the test batch size and workers (spec §1.2 step 5)."""
    ns = build_parser().parse_args(argv)
    validate_args(ns)
    if ns.test_batch_size < 0:
        ns.test_batch_size = ns.batch_size
    if ns.test_num_workers < 0:
        ns.test_num_workers = ns.num_workers
    if ns.save_onnx:
        from onnx_export import require_onnx

        require_onnx()
    if ns.plot_compute_graph:
        raise ConfigError("--plot-compute-graph needs torchviz, which this version does not use; "
                          "use --enable-profiling for a trace instead")
    return ns


def setup_device(ns: argparse.Namespace, log: Logger, dist: DistInfo = DistInfo()) -> torch.device:
    """CUDA when asked for and available (one GPU per process: ``cuda:<local rank>`` across
    processes), else CPU (spec §1.2 steps 6-8)."""
    if ns.use_gpu and torch.cuda.is_available():
        torch.cuda.manual_seed_all(ns.seed)
        torch.backends.cudnn.deterministic = True
        log("Using 1 GPU(s)...")
        return torch.device("cuda", dist.local_rank if dist.world_size > 1 else 0)
    log("Using CPU...")
    return torch.device("cpu")


def _log_lines(log: Logger, lines: Sequence[str]) -> None:
    for line in lines:
        log(line)


def _debug_data(train_ld, nbatches: int) -> List[str]:
    """``--debug-mode``: every training batch, which draws them (and so moves the stream) before
    the model is built, as in the reference (spec §7.3 item 4)."""
    lines: List[str] = []
    for j, batch in enumerate(train_ld):
        if j >= nbatches:
            break
        lines += format_batch(j, batch)
    return lines


def build_parts(ns: argparse.Namespace, model: DLRM, tcfg: TrainConfig, train_ld, test_ld, nbatches: int,
                device: torch.device, log: Logger) -> RunParts:
    """The optimizer and schedule (unless inference-only) and everything the loops need."""
    optimizer = scheduler = None
    if not ns.inference_only:
        if device.type == "cuda" and ns.optimizer in ("adagrad", "rwsadagrad"):
            raise ConfigError("GPU version of Adagrad is not supported by PyTorch.")
        optimizer = make_optimizer(ns.optimizer, model, ns.learning_rate)
        scheduler = make_scheduler(optimizer, tcfg)
    return RunParts(model=model, loss_fn=make_loss(ns.loss_function, ns.loss_weights), optimizer=optimizer,
                    scheduler=scheduler, train_loader=train_ld, test_loader=test_ld, nbatches=nbatches,
                    nbatches_test=len(test_ld), device=device, log=log, save_model=ns.save_model,
                    info=model.info)


def check_distributed(ns: argparse.Namespace, dist: DistInfo, num_tables: int) -> None:
    """Raise ConfigError for what a multi-process run does not support (spec §1.3, §4)."""
    if dist.world_size == 1:
        return
    if num_tables < dist.world_size:
        raise ConfigError(f"only ({num_tables}) sparse features for ({dist.world_size}) devices, "
                          "table partitions will fail")
    for flag, used in (("--weighted-pooling", ns.weighted_pooling is not None), ("--qr-flag", ns.qr_flag),
                       ("--md-flag", ns.md_flag), ("--save-onnx", ns.save_onnx),
                       ("--quantize-emb-with-bit", ns.quantize_emb_bits != 32),
                       ("--quantize-mlp-with-bit", ns.quantize_mlp_bits != 32)):
        if used:
            raise ConfigError(f"{flag} is not supported in a multi-process run (world size {dist.world_size})")


def run(ns: argparse.Namespace) -> None:
    """The whole benchmark, in the reference's order (spec §1.2)."""
    mlperf = make_mlperf_logger(ns.mlperf_logging)
    mlperf.event("cache_clear", True)
    mlperf.start("init_start")
    rng = np.random.RandomState(ns.seed)  # the reference's global NumPy stream, as an object
    torch.manual_seed(ns.seed)
    torch.sparse.check_sparse_tensor_invariants.disable()  # explicit opt-out: torch warns otherwise
    dist = DistInfo() if ns.debug_mode else init_distributed(ns.local_rank, ns.use_gpu, ns.dist_backend)
    log = Logger(dist)
    mlperf.rank = dist.rank  # events from rank 0 only
    if not ns.debug_mode:
        log(f"world size: {dist.world_size}, current rank: {dist.rank}, local rank: {dist.local_rank}")
    device = setup_device(ns, log, dist)
    mlperf.end("init_stop")
    mlperf.start("run_start")
    train_ld, test_ld, table_sizes, dense_dim = make_data(ns, rng, log)
    if ns.mlperf_logging:
        log("command line args: " + json.dumps(vars(ns)))
    mcfg, tcfg = model_config(ns, table_sizes, dense_dim), train_config(ns)
    nbatches = ns.num_batches if ns.num_batches > 0 else len(train_ld)
    if ns.debug_mode:
        _log_lines(log, format_arch(mcfg, dense_dim) + ["data (inputs and targets):"])
        _log_lines(log, _debug_data(train_ld, nbatches))
    check_distributed(ns, dist, len(table_sizes))
    model = DLRM(mcfg, rng, dist).to(device)
    if ns.debug_mode:
        _log_lines(log, ["initial parameters (weights and bias):"] + format_parameters(model, ns.print_precision))
    parts = build_parts(ns, model, tcfg, train_ld, test_ld, nbatches, device, log)
    state = TrainState()
    if ns.load_model:
        restore_checkpoint(ns.load_model, parts, state, ns.nepochs, ns.inference_only, ns.mlperf_logging)
    if ns.inference_only:
        parts.model = quantize_for_inference(parts.model, ns)
    log("time/loss/accuracy (if enabled):")
    mlperf.submission_info(ns.batch_size, ns.seed, ns.learning_rate, ns.lr_num_warmup_steps,
                           ns.lr_decay_start_step, ns.lr_num_decay_steps)
    parts.mlperf, parts.writer = mlperf, (_make_writer(ns.tensor_board_filename) if dist.is_main else None)
    try:
        with _profiling(ns.enable_profiling, device.type == "cuda"):
            if ns.inference_only:
                log("Testing for inference only")
                evaluate(parts, tcfg, state, log_iter=0)
            else:
                train(parts, tcfg, state)
    finally:
        if parts.writer is not None:
            parts.writer.close()
    if ns.debug_mode:
        _log_lines(log, ["updated parameters (weights and bias):"] + format_parameters(model, ns.print_precision))
    if ns.save_onnx:
        from onnx_export import export_onnx

        sample = state.onnx_batch if state.onnx_batch is not None else next(iter(train_ld))
        export_onnx(model, sample, "dlrm_s_pytorch.onnx", log)


def quantize_for_inference(model: DLRM, ns: argparse.Namespace) -> nn.Module:
    """``--quantize-emb-with-bit`` 4/8: row-wise quantized tables; ``--quantize-mlp-with-bit``
    8/16: dynamic int8/float16 Linear layers (spec §1.11)."""
    if ns.quantize_emb_bits != 32:
        model.emb_l = QuantizedTables(model.emb_l, ns.quantize_emb_bits)
    if ns.quantize_mlp_bits == 32:
        return model
    dtype = torch.qint8 if ns.quantize_mlp_bits == 8 else torch.float16
    with warnings.catch_warnings():  # the reference's dynamic quantization API, deprecated upstream
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {nn.Linear}, dtype)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; report bad input as one ``error: ...`` line on stderr and exit code 2."""
    try:
        ns = parse_args(argv)
        try:
            run(ns)
        except BaseException:
            shutdown_distributed(wait=False)
            raise
        shutdown_distributed()
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except DLRMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
