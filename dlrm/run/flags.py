"""The benchmark's flags: the reference's names and defaults, and the run's configuration built from them.

:func:`build_parser` is the flag table; :func:`config_from_args` is the only reader of the parsed
flags: it validates every flag once and builds the frozen :class:`~dlrm.run.config.RunConfig`.
"""
from __future__ import annotations

import argparse
import math
from typing import Tuple

from dlrm.cli import FlagParser
from dlrm.common import ConfigError, parse_bool
from dlrm.model.dlrm import ModelConfig, top_mlp_input_width
from dlrm.model.dlrm import LOSSES
from dlrm.outputs.side_channels import OutputConfig
from dlrm.run.config import InferenceConfig, RunConfig, SystemConfig
from dlrm.run.train import OPTIMIZERS, TrainConfig


# =============================================================================================
# Flags: the reference's names and defaults; dest= gives each a clear name inside.
# =============================================================================================


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
    """The command line: every reference flag with its spelling, type and default."""
    p = FlagParser(prog="dlrm_s_pytorch.py", description="Train and evaluate DLRM on random, synthetic or Criteo data.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _model_flags(p.add_argument_group("model"))
    _data_flags(p.add_argument_group("data"))
    _training_flags(p.add_argument_group("training"))
    _evaluation_flags(p.add_argument_group("evaluation"))
    _output_flags(p.add_argument_group("output"))
    for action in p._actions:  # name values after the flag users type, not the attribute inside
        if action.option_strings and action.metavar is None and action.choices is None and action.nargs != 0:
            action.metavar = action.option_strings[0].lstrip("-").upper().replace("-", "_")
    return p


def _model_flags(m) -> None:
    m.add_argument("--arch-sparse-feature-size", dest="embedding_dim", type=int, default=2, help="embedding dimension D; equals the bottom MLP's last width")
    m.add_argument("--arch-embedding-size", dest="table_sizes", type=DASH_INTS, default="4-3-2", help="rows of each table (random data)")
    m.add_argument("--arch-mlp-bot", dest="bottom_mlp", type=DASH_INTS, default="4-3-2", help="bottom MLP widths, input included")
    m.add_argument("--arch-mlp-top", dest="top_mlp", type=DASH_INTS, default="4-2-1", help="top MLP widths, input excluded (computed); the last must be 1")
    m.add_argument("--arch-interaction-op", dest="interaction", choices=["dot", "cat"], default="dot", help="feature interaction")
    m.add_argument("--arch-interaction-itself", dest="interaction_itself", action="store_true", help="include self dot products")
    m.add_argument("--weighted-pooling", dest="weighted_pooling", choices=["fixed", "learned"], default=None, help="per-row pooling weights: fixed at 1.0 or learned")
    m.add_argument("--md-flag", dest="md_flag", action="store_true", help="mixed-dimension embeddings")
    m.add_argument("--md-threshold", dest="md_threshold", type=int, default=200, help="tables with more rows use mixed dimensions")
    m.add_argument("--md-temperature", dest="md_temperature", type=float, default=0.3, help="alpha of the mixed-dimension power rule")
    m.add_argument("--md-round-dims", dest="md_round_dims", action="store_true", help="round mixed dimensions to powers of two")
    m.add_argument("--qr-flag", dest="qr_flag", action="store_true", help="quotient-remainder embeddings")
    m.add_argument("--qr-threshold", dest="qr_threshold", type=int, default=200, help="tables with more rows use QR")
    m.add_argument("--qr-operation", dest="qr_operation", choices=["mult", "add", "concat"], default="mult", help="how QR combines its two tables")
    m.add_argument("--qr-collisions", dest="qr_collisions", type=int, default=4, help="QR remainder table size")
    m.add_argument("--activation-function", dest="activation", choices=["relu", "sigmoid", "tanh"], default="relu", help="hidden-layer activation")
    m.add_argument("--loss-function", dest="loss_function", choices=list(LOSSES), default="mse", help="training loss")
    m.add_argument("--loss-weights", dest="loss_weights", type=DASH_FLOATS, default="1.0-1.0", help="wbce weights of class 0 and class 1")
    m.add_argument("--loss-threshold", dest="loss_threshold", type=float, default=0.0, help="if in (0,1), clamp predictions to [t, 1-t]")
    m.add_argument("--round-targets", dest="round_targets", type=BOOL, default=False, help="round random targets to 0/1")
    m.add_argument("--embedding-backend", dest="embedding_backend", choices=["auto", "plain", "fused"], default="auto",
                   help="not in the reference: 'plain' is one EmbeddingBag per table updated by the optimizer (the "
                        "reference's step); 'fused' looks all tables up at once and applies SGD inside backward "
                        "(same numbers, bit for bit; SGD, one process, plain tables, no gradient accumulation); "
                        "'auto' picks fused where it applies and the tables hold at least 1M values")
    m.add_argument("--fast-numerics", dest="fast_numerics", action="store_true",
                   help="not in the reference: the MLPs' GEMMs through the fastest kernels here (oneDNN or MKL by "
                        "shape) with fused activations, and a fused dot interaction; float32 throughout, but "
                        "summed in another order, so the numbers change slightly (CPU only)")
    m.add_argument("--mixed-precision", dest="mixed_precision", choices=["none", "bf16"], default="none",
                   help="not in the reference: run the forward under bfloat16 autocast (faster on CPUs with "
                        "AVX512-BF16/AMX; changes the numbers; tables, updates and the loss stay float32)")


def _data_flags(d) -> None:
    d.add_argument("--data-size", dest="data_size", type=int, default=1, help="random samples")
    d.add_argument("--num-batches", dest="num_batches", type=int, default=0, help="if > 0, train this many batches per epoch (and test as many, as the reference does)")
    d.add_argument("--data-generation", dest="data_generation", choices=["random", "synthetic", "dataset", "internal"], default="random", help="where batches come from")
    d.add_argument("--rand-data-dist", dest="rand_data_dist", choices=["uniform", "gaussian"], default="uniform", help="distribution of random indices")
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
    d.add_argument("--num-workers", dest="num_workers", type=int, default=0, help="loader workers (random data: their batches, drawn in this process)")
    d.add_argument("--memory-map", dest="memory_map", action="store_true", help="Criteo: day files, memory-mapped")
    d.add_argument("--dataset-multiprocessing", dest="dataset_multiprocessing", action="store_true", help="Criteo: preprocess days in parallel")
    d.add_argument("--mlperf-bin-loader", dest="mlperf_bin_loader", action="store_true", help="Terabyte: MLPerf binary files")
    d.add_argument("--mlperf-bin-shuffle", dest="mlperf_bin_shuffle", action="store_true", help="Terabyte: shuffle binary batches")


def _training_flags(t) -> None:
    t.add_argument("--mini-batch-size", dest="batch_size", type=int, default=1, help="samples per training batch")
    t.add_argument("--nepochs", dest="nepochs", type=int, default=1, help="epochs")
    t.add_argument("--learning-rate", dest="learning_rate", type=float, default=0.01, help="learning rate")
    t.add_argument("--numpy-rand-seed", dest="seed", type=int, default=123, help="seed of NumPy (all draws) and torch")
    t.add_argument("--sync-dense-params", dest="sync_dense_params", type=BOOL, default=True,
                   help="accepted for the reference's scripts and has no effect: it re-replicated the MLPs in "
                        "single-process multi-GPU runs, which this version does not have (run one process per GPU)")
    t.add_argument("--optimizer", dest="optimizer", choices=list(OPTIMIZERS), default="sgd", help="optimizer")
    t.add_argument("--lr-num-warmup-steps", dest="lr_num_warmup_steps", type=int, default=0, help="linear warmup steps")
    t.add_argument("--lr-decay-start-step", dest="lr_decay_start_step", type=int, default=0, help="step where polynomial decay starts")
    t.add_argument("--lr-num-decay-steps", dest="lr_num_decay_steps", type=int, default=0, help="polynomial decay steps")
    t.add_argument("--mlperf-grad-accum-iter", dest="grad_accum_iter", type=int, default=1, help="mlperf: batches per optimizer step")
    t.add_argument("--use-gpu", dest="use_gpu", action="store_true", help="train on CUDA when available")
    t.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1, help="distributed local rank")
    t.add_argument("--dist-backend", dest="dist_backend", choices=["", "gloo", "nccl", "mpi", "ccl"], default="",
                   help="torch.distributed backend; empty: nccl for GPUs, else gloo")
    t.add_argument("--dist-init-timeout", dest="dist_init_timeout", type=float, default=300.0,
                   help="not in the reference: seconds a process waits for the others to join (and for any "
                        "collective) before it gives up with an error")
    t.add_argument("--fix-reference-bugs", dest="fix_reference_bugs", action="store_true",
                   help="not in the reference: fix its bugs that change numbers (README, 'Differences'): random "
                        "test data from its own stream, gaussian bags without repeats, the learning-rate plateau "
                        "at the base rate, the whole test set despite --num-batches, real gradient accumulation, "
                        "exact QR quotients and init, debug mode training pooling weights, batch skipping only "
                        "in the resumed epoch, checkpoints only at improving tests, resuming the learning-rate "
                        "schedule and the row-wise Adagrad accumulators")


def _evaluation_flags(e) -> None:
    e.add_argument("--inference-only", dest="inference_only", action="store_true", help="evaluate a loaded model, no training")
    e.add_argument("--quantize-mlp-with-bit", dest="quantize_mlp_bits", type=int, default=32, help="inference: 8 or 16 bit MLPs")
    e.add_argument("--quantize-emb-with-bit", dest="quantize_emb_bits", type=int, default=32, help="inference: 4 or 8 bit tables")
    e.add_argument("--test-freq", dest="test_freq", type=int, default=-1, help="evaluate every N batches (and at the last)")
    e.add_argument("--test-mini-batch-size", dest="test_batch_size", type=int, default=-1, help="test batch size; -1: the training one")
    e.add_argument("--test-num-workers", dest="test_num_workers", type=int, default=-1, help="test loader workers; -1: --num-workers")
    e.add_argument("--mlperf-logging", dest="mlperf_logging", action="store_true", help="scikit-learn metrics and MLPerf events")
    e.add_argument("--mlperf-log-file", dest="mlperf_log_file", default="",
                   help="not in the reference: where --mlperf-logging writes its events (default: dlrm.log next to "
                        "mlperf_logger.py, as in the reference)")
    e.add_argument("--mlperf-acc-threshold", dest="mlperf_acc_threshold", type=float, default=0.0, help="stop when test accuracy exceeds this")
    e.add_argument("--mlperf-auc-threshold", dest="mlperf_auc_threshold", type=float, default=0.0, help="stop when test AUC exceeds this")


def _output_flags(o) -> None:
    o.add_argument("--print-precision", dest="print_precision", type=int, default=5, help="digits of printed parameters")
    o.add_argument("--print-freq", dest="print_freq", type=int, default=1, help="print every N batches (and at the last)")
    o.add_argument("--print-time", dest="print_time", action="store_true", help="print ms/it (else -1.00)")
    o.add_argument("--print-wall-time", dest="print_wall_time", action="store_true", help="append (HH:MM) to training lines")
    o.add_argument("--debug-mode", dest="debug_mode", action="store_true", help="print architecture, data and parameters")
    o.add_argument("--enable-profiling", dest="enable_profiling", action="store_true", help="torch.profiler trace and tables")
    o.add_argument("--plot-compute-graph", dest="plot_compute_graph", action="store_true",
                   help="after the run, draw the training graph (the inference graph with --inference-only) with "
                        "torchviz: Graphviz source dlrm_s_pytorch_graph.gv, and a PDF when Graphviz's dot is installed")
    o.add_argument("--tensor-board-filename", dest="tensor_board_filename", default="run_kaggle_pt",
                   help="TensorBoard directory, one subdirectory per run (if tensorboard is installed)")
    o.add_argument("--save-model", dest="save_model", default="",
                   help="checkpoint path, written at each test that beats the accuracy the run started from (as "
                        "the reference; with --fix-reference-bugs, each test that improves the best result); "
                        "without tests, the final model is written at the end")
    o.add_argument("--load-model", dest="load_model", default="", help="checkpoint to resume from or evaluate")
    o.add_argument("--save-onnx", dest="save_onnx", action="store_true", help="export the model to ONNX (--onnx-file)")
    o.add_argument("--onnx-file", dest="onnx_file", default="dlrm_s_pytorch.onnx", help="where --save-onnx writes")
    o.add_argument("--metrics-file", dest="metrics_file", default="",
                   help="not in the reference: write one JSON line per printed line and per test (iteration, "
                        "epoch, loss, lr, ms/it, samples/s, accuracy, auc)")
    o.add_argument("--progress", dest="progress", action="store_true",
                   help="not in the reference: a progress bar with ETA over each epoch and test pass, on stderr "
                        "(only when the output is a terminal; the log lines stay as they are)")


# =============================================================================================
# Configuration: the parsed flags are read here, once, into frozen dataclasses.
# =============================================================================================


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    """Validate every flag once, resolve the -1 defaults and build the run's configuration."""
    flags = dict(vars(ns))
    _check_flags(flags)
    _resolve_test_defaults(flags)
    return RunConfig(
        model=_model_config(flags), data=_data_config(flags), train=_train_config(flags),
        system=SystemConfig(seed=flags["seed"], use_gpu=flags["use_gpu"], local_rank=flags["local_rank"],
                            dist_backend=flags["dist_backend"], debug_mode=flags["debug_mode"],
                            print_precision=flags["print_precision"], dist_init_timeout=flags["dist_init_timeout"]),
        output=OutputConfig(save_model=flags["save_model"], load_model=flags["load_model"],
                            save_onnx=flags["save_onnx"], onnx_file=flags["onnx_file"],
                            enable_profiling=flags["enable_profiling"],
                            tensor_board_filename=flags["tensor_board_filename"],
                            mlperf_events=flags["mlperf_logging"], mlperf_log_file=flags["mlperf_log_file"],
                            plot_compute_graph=flags["plot_compute_graph"],
                            metrics_file=flags["metrics_file"]),
        inference=InferenceConfig(inference_only=flags["inference_only"], quantize_mlp_bits=flags["quantize_mlp_bits"],
                                  quantize_emb_bits=flags["quantize_emb_bits"]),
        flags=tuple(reference_flag_values(flags).items()),
    )


def _resolve_test_defaults(flags: dict) -> None:
    """Replace the -1 test batch size and workers by the training ones, in ``flags``."""
    if flags["test_batch_size"] < 0:
        flags["test_batch_size"] = flags["batch_size"]
    if flags["test_num_workers"] < 0:
        flags["test_num_workers"] = flags["num_workers"]


def data_config_from_flags(flags: dict):
    """The data configuration alone, from flag values keyed by their dest names: what the
    reference's Python API (``reference_api``) builds its loaders from. Only the data flags are
    checked; the -1 test defaults are resolved as for a run."""
    flags = dict(flags)
    _positive("--mini-batch-size", flags["batch_size"])
    if flags["test_batch_size"] == 0:
        raise ConfigError("--test-mini-batch-size must be at least 1 (or -1 for the training size)")
    if flags["num_workers"] < 0 or flags["test_num_workers"] < -1:
        raise ConfigError("--num-workers must not be negative, nor --test-num-workers below -1 (-1: --num-workers)")
    _resolve_test_defaults(flags)
    return _data_config(flags)


def reference_flag_values(flags: dict) -> dict:
    """Every flag's value under the reference's attribute name (``arch_sparse_feature_size``...), dash
    lists written as typed: what the reference's ``--mlperf-logging`` args line holds."""
    out = {}
    for action in build_parser()._actions:
        if not action.option_strings or action.dest not in flags:
            continue
        value = flags[action.dest]
        if isinstance(value, tuple):
            value = "-".join(str(v) for v in value)
        out[action.option_strings[0].lstrip("-").replace("-", "_")] = value
    return out


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")


def _check_flags(f: dict) -> None:
    """Raise ConfigError, naming the flag, for values that cannot work."""
    for name, key in (("--mini-batch-size", "batch_size"), ("--arch-sparse-feature-size", "embedding_dim"),
                      ("--nepochs", "nepochs"), ("--print-freq", "print_freq"),
                      ("--mlperf-grad-accum-iter", "grad_accum_iter")):
        _positive(name, f[key])
    if f["test_batch_size"] == 0:
        raise ConfigError("--test-mini-batch-size must be at least 1 (or -1 for the training size)")
    _check_floats(f)
    if f["loss_function"] == "wbce" and len(f["loss_weights"]) != 2:
        raise ConfigError(f"--loss-weights needs two values (class 0 and class 1), got {len(f['loss_weights'])}")
    _check_architecture(f)
    _check_schedule(f)
    _check_inference(f)
    if (f["mlperf_logging"] and f["data_generation"] in ("random", "synthetic") and not f["round_targets"]
            and (f["test_freq"] > 0 or f["inference_only"])):
        raise ConfigError("--mlperf-logging computes classification metrics, which need 0/1 targets: "
                          "add --round-targets=true for random or synthetic data")
    if f["data_generation"] == "internal":
        raise ConfigError("--data-generation=internal needs Meta-internal loaders, which are not available")
    _check_ranges(f)
    if f["save_onnx"]:
        from dlrm.outputs.onnx_export import require_onnx

        require_onnx()


# Every float flag, with the lowest value it may take (None: any finite value). NaN and infinity
# are refused everywhere: none of these has a meaning for them, and the comparisons that check
# the others are all false for NaN.
FLOAT_FLAGS = (
    ("--learning-rate", "learning_rate", 0.0), ("--md-temperature", "md_temperature", 0.0),
    ("--loss-threshold", "loss_threshold", None), ("--rand-data-min", "rand_data_min", None),
    ("--rand-data-max", "rand_data_max", None), ("--rand-data-mu", "rand_data_mu", None),
    ("--rand-data-sigma", "rand_data_sigma", 0.0), ("--data-sub-sample-rate", "data_sub_sample_rate", 0.0),
    ("--dist-init-timeout", "dist_init_timeout", None), ("--mlperf-acc-threshold", "mlperf_acc_threshold", 0.0),
    ("--mlperf-auc-threshold", "mlperf_auc_threshold", 0.0),
)


def _check_floats(f: dict) -> None:
    """Refuse NaN, infinity and negative values (where a flag cannot be negative), naming the flag."""
    values = [(flag, f[key], lowest) for flag, key, lowest in FLOAT_FLAGS]
    values += [("--loss-weights", w, 0.0) for w in f["loss_weights"]]
    for flag, value, lowest in values:
        if not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}")
        if lowest is not None and value < lowest:
            raise ConfigError(f"{flag} must not be negative, got {value:g}")
    if f["data_sub_sample_rate"] > 1:
        raise ConfigError(f"--data-sub-sample-rate must be in [0, 1], got {f['data_sub_sample_rate']:g}")


def _check_ranges(f: dict) -> None:
    """Values the reference accepted and then crashed on, or silently used wrongly."""
    if not 0 <= f["seed"] < 2**32:
        raise ConfigError(f"--numpy-rand-seed must be in [0, 2**32) (NumPy's range), got {f['seed']}")
    if f["rand_data_dist"] == "gaussian" and f["rand_data_min"] > f["rand_data_max"]:
        raise ConfigError(f"--rand-data-min={f['rand_data_min']:g} is above --rand-data-max={f['rand_data_max']:g}")
    if f["qr_flag"] and f["qr_collisions"] < 1:
        raise ConfigError(f"--qr-collisions must be at least 1, got {f['qr_collisions']}")
    if f["qr_flag"] and f["md_flag"]:
        raise ConfigError("--qr-flag and --md-flag cannot be combined (a table is one or the other)")
    if f["dist_init_timeout"] <= 0:
        raise ConfigError(f"--dist-init-timeout must be positive, got {f['dist_init_timeout']:g}")
    if f["num_workers"] < 0 or f["test_num_workers"] < -1:
        raise ConfigError("--num-workers must not be negative, nor --test-num-workers below -1 (-1: --num-workers)")


def _check_architecture(f: dict) -> None:
    for name, widths in (("--arch-mlp-bot", f["bottom_mlp"]), ("--arch-mlp-top", f["top_mlp"])):
        if any(w < 1 for w in widths):
            raise ConfigError(f"{name}: every width must be at least 1, got {'-'.join(map(str, widths))}")
    if len(f["bottom_mlp"]) < 2:
        raise ConfigError("--arch-mlp-bot needs at least an input and an output width, like 4-3-2")
    if f["top_mlp"][-1] != 1:
        raise ConfigError(f"--arch-mlp-top must end in 1 (one prediction per sample), got "
                          f"{'-'.join(map(str, f['top_mlp']))}")
    if f["data_generation"] in ("random", "synthetic"):
        for t, rows in enumerate(f["table_sizes"]):
            if rows < 1:
                raise ConfigError(f"--arch-embedding-size: table {t} has {rows} rows (must be at least 1)")
    concat = f["qr_flag"] and f["qr_operation"] == "concat"
    expected = 2 * f["embedding_dim"] if concat else f["embedding_dim"]
    if f["bottom_mlp"][-1] != expected:
        raise ConfigError(
            f"--arch-sparse-feature-size={f['embedding_dim']} does not match the bottom MLP's output width "
            f"{f['bottom_mlp'][-1]} (--arch-mlp-bot={'-'.join(map(str, f['bottom_mlp']))}; they must be equal"
            + (", or the output twice the size with QR concat)" if f["qr_flag"] else ")"))
    if f["weighted_pooling"] is not None and (f["qr_flag"] or f["md_flag"]):
        raise ConfigError("--weighted-pooling cannot be combined with --qr-flag or --md-flag")


def _check_schedule(f: dict) -> None:
    for key in ("lr_num_warmup_steps", "lr_decay_start_step", "lr_num_decay_steps"):
        if f[key] < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must not be negative")
    if f["lr_num_decay_steps"] > 0 and f["lr_decay_start_step"] < f["lr_num_warmup_steps"]:
        raise ConfigError("Learning rate warmup must finish before the decay starts "
                          "(--lr-decay-start-step < --lr-num-warmup-steps)")


def _check_inference(f: dict) -> None:
    if f["quantize_mlp_bits"] not in (8, 16, 32):
        raise ConfigError(f"--quantize-mlp-with-bit must be 8, 16 or 32, got {f['quantize_mlp_bits']}")
    if f["quantize_emb_bits"] not in (4, 8, 32):
        raise ConfigError(f"--quantize-emb-with-bit must be 4, 8 or 32, got {f['quantize_emb_bits']}")
    if f["fast_numerics"] and f["use_gpu"]:
        raise ConfigError("--fast-numerics is for CPUs; it cannot be combined with --use-gpu")
    if f["quantize_emb_bits"] != 32 and (f["qr_flag"] or f["md_flag"] or f["use_gpu"]):
        raise ConfigError("--quantize-emb-with-bit works on CPU with plain tables only "
                          "(not with --qr-flag, --md-flag or --use-gpu)")


def _model_config(f: dict) -> ModelConfig:
    bottom = tuple(f["bottom_mlp"])
    width = top_mlp_input_width(f["interaction"], f["interaction_itself"], len(f["table_sizes"]), bottom[-1])
    return ModelConfig(
        embedding_dim=f["embedding_dim"], table_sizes=tuple(f["table_sizes"]), bottom_mlp=bottom,
        top_mlp=(width,) + tuple(f["top_mlp"]), interaction=f["interaction"],
        interaction_itself=f["interaction_itself"], weighted_pooling=f["weighted_pooling"],
        activation=f["activation"], loss_threshold=f["loss_threshold"], md_flag=f["md_flag"],
        md_threshold=f["md_threshold"], md_temperature=f["md_temperature"], md_round_dims=f["md_round_dims"],
        qr_flag=f["qr_flag"], qr_threshold=f["qr_threshold"], qr_operation=f["qr_operation"],
        qr_collisions=f["qr_collisions"], fix_reference_bugs=f["fix_reference_bugs"],
        embedding_backend=f["embedding_backend"])


def _train_config(f: dict) -> TrainConfig:
    return TrainConfig(
        batch_size=f["batch_size"], nepochs=f["nepochs"], num_batches=f["num_batches"],
        learning_rate=f["learning_rate"], optimizer=f["optimizer"], loss_function=f["loss_function"],
        loss_weights=tuple(f["loss_weights"]), lr_num_warmup_steps=f["lr_num_warmup_steps"],
        lr_decay_start_step=f["lr_decay_start_step"], lr_num_decay_steps=f["lr_num_decay_steps"],
        grad_accum_iter=f["grad_accum_iter"], print_freq=f["print_freq"], test_freq=f["test_freq"],
        print_time=f["print_time"], print_wall_time=f["print_wall_time"], mlperf_logging=f["mlperf_logging"],
        mlperf_acc_threshold=f["mlperf_acc_threshold"], mlperf_auc_threshold=f["mlperf_auc_threshold"],
        testing=f["data_generation"] in ("dataset", "random", "synthetic"),
        fix_reference_bugs=f["fix_reference_bugs"], mixed_precision=f["mixed_precision"],
        debug_groups=f["debug_mode"] and not f["fix_reference_bugs"], progress=f["progress"],
        fast_numerics=f["fast_numerics"])


def _data_config(f: dict):
    if f["data_generation"] in ("random", "synthetic"):
        from dlrm.data.random import RandomDataConfig, validate_random_config

        cfg = RandomDataConfig(
            dense_dim=f["bottom_mlp"][0], table_sizes=tuple(f["table_sizes"]), data_size=f["data_size"],
            batch_size=f["batch_size"], num_batches=f["num_batches"],
            num_indices_per_lookup=f["num_indices_per_lookup"], fixed=f["num_indices_per_lookup_fixed"],
            distribution=f["rand_data_dist"], rand_min=f["rand_data_min"], rand_max=f["rand_data_max"],
            rand_mu=f["rand_data_mu"], rand_sigma=f["rand_data_sigma"], round_targets=f["round_targets"],
            seed=f["seed"], generation=f["data_generation"], trace_file=f["data_trace_file"],
            trace_padding=f["data_trace_enable_padding"], num_workers=f["num_workers"],
            fix_reference_bugs=f["fix_reference_bugs"])
        validate_random_config(cfg)
        return cfg
    from dlrm.data.criteo.loaders import CriteoLoaderConfig
    from dlrm.data.criteo.preprocess import PreprocessConfig

    preprocess = PreprocessConfig(
        data_set=f["data_set"], raw_data_file=f["raw_data_file"], processed_data_file=f["processed_data_file"],
        max_ind_range=f["max_ind_range"], sub_sample_rate=f["data_sub_sample_rate"], randomize=f["data_randomize"],
        memory_map=f["memory_map"], multiprocessing=f["dataset_multiprocessing"], seed=f["seed"])
    return CriteoLoaderConfig(
        preprocess=preprocess, batch_size=f["batch_size"], test_batch_size=f["test_batch_size"],
        num_workers=f["num_workers"], test_num_workers=f["test_num_workers"], mlperf_logging=f["mlperf_logging"],
        mlperf_bin_loader=f["mlperf_bin_loader"], mlperf_bin_shuffle=f["mlperf_bin_shuffle"])
