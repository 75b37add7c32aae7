"""The benchmark's flags: the reference's names and defaults, and the run's configuration built from them.

:func:`build_parser` is the flag table, each flag's ``dest`` the name of the config field it fills;
:func:`config_from_args` is the only reader of the parsed flags: it builds each part of the frozen
:class:`~dlrm.run.config.RunConfig` with :func:`dlrm.cli.take`, and each part checks its own values
(a :class:`~dlrm.common.FlagError` names the field, which the command line prints as its option).
Only the flags that no part of a run holds (the other data source's) are checked here.
"""
from __future__ import annotations

import argparse
from typing import Dict, Optional, Tuple

from dlrm.cli import FlagParser, option_names, take
from dlrm.common import ConfigError, FlagError, parse_bool
from dlrm.data.config import RandomDataConfig, check_random_flags
from dlrm.model.dlrm import LOSSES, ModelConfig, top_mlp_input_width
from dlrm.outputs.side_channels import OutputConfig
from dlrm.run.config import InferenceConfig, RunConfig, SystemConfig
from dlrm.run.train import OPTIMIZERS, TrainConfig
from dlrm.shard.config import A2A_PRECISION_NAMES, SHARDINGS, ShardingConfig
from dlrm.store.config import STORES, StoreConfig
from dlrm.checkpoints.config import CheckpointConfig


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
    _sharding_flags(p.add_argument_group("sharding (not in the reference: tables split over several processes)"))
    _store_flags(p.add_argument_group("table store (not in the reference: tables in files behind a row cache)"))
    _checkpoint_flags(p.add_argument_group("periodic checkpoints (not in the reference: a base and increments)"))
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
    d.add_argument("--data-generation", dest="generation", choices=["random", "synthetic", "dataset", "internal"], default="random", help="where batches come from")
    d.add_argument("--rand-data-dist", dest="distribution", choices=["uniform", "gaussian", "zipf"], default="uniform",
                   help="distribution of random indices (zipf, not in the reference: skewed ids, row r looked up "
                        "about in proportion to (r + 1) ** -exponent, from the same draws as uniform)")
    d.add_argument("--rand-data-zipf-exponent", dest="zipf_exponent", type=float, default=1.05,
                   help="not in the reference: the exponent of --rand-data-dist=zipf (> 0; larger: more skewed)")
    d.add_argument("--rand-data-min", dest="rand_min", type=float, default=0, help="gaussian: lowest index")
    d.add_argument("--rand-data-max", dest="rand_max", type=float, default=1, help="gaussian: highest index")
    d.add_argument("--rand-data-mu", dest="rand_mu", type=float, default=-1, help="gaussian mean; -1: midpoint of min and max")
    d.add_argument("--rand-data-sigma", dest="rand_sigma", type=float, default=1, help="gaussian standard deviation")
    d.add_argument("--data-trace-file", dest="trace_file", default="./input/dist_emb_j.log", help="synthetic: distribution file, j = table number")
    d.add_argument("--data-set", dest="data_set", choices=["kaggle", "terabyte"], default="kaggle", help="Criteo data set")
    d.add_argument("--raw-data-file", dest="raw_data_file", default="", help="Criteo raw data: train.txt or the day_ prefix")
    d.add_argument("--processed-data-file", dest="processed_data_file", default="", help="Criteo processed .npz")
    d.add_argument("--data-randomize", dest="randomize", choices=["total", "day", "none"], default="total", help="Criteo shuffling")
    d.add_argument("--data-trace-enable-padding", dest="trace_padding", type=BOOL, default=False, help="synthetic: trace padding")
    d.add_argument("--max-ind-range", dest="max_ind_range", type=int, default=-1, help="if > 0, hash categories modulo this and cap table sizes")
    d.add_argument("--data-sub-sample-rate", dest="sub_sample_rate", type=float, default=0.0, help="drop negatives with this probability")
    d.add_argument("--num-indices-per-lookup", dest="num_indices_per_lookup", type=int, default=10, help="random data: largest bag size")
    d.add_argument("--num-indices-per-lookup-fixed", dest="fixed", type=BOOL, default=False, help="random data: every bag has exactly that size")
    d.add_argument("--num-workers", dest="num_workers", type=int, default=0, help="loader workers (random data: their batches, drawn in this process)")
    d.add_argument("--memory-map", dest="memory_map", action="store_true", help="Criteo: day files, memory-mapped")
    d.add_argument("--dataset-multiprocessing", dest="multiprocessing", action="store_true", help="Criteo: preprocess days in parallel")
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


def _sharding_flags(s) -> None:
    s.add_argument("--sharding", dest="sharding", choices=list(SHARDINGS), default="table",
                   help="how a multi-process run splits the tables: table (each rank holds whole tables, the "
                        "reference's layout), row (row blocks over the ranks), column (column blocks), auto (a "
                        "planner balances bytes and lookups per step, splitting the largest tables)")
    s.add_argument("--rank-memory-gib", dest="rank_memory_gib", type=float, default=None,
                   help="the tables' budget per rank (weights and optimizer state), GiB; a plan that does not fit "
                        "is refused before anything is allocated (default: the memory available on each host "
                        "divided by its processes)")
    s.add_argument("--print-sharding-plan", dest="print_sharding_plan", action="store_true",
                   help="print where every table lives (type, ranks, bytes, expected lookups per step) and the "
                        "per-rank totals before training")
    s.add_argument("--a2a-precision", dest="a2a_precision", choices=list(A2A_PRECISION_NAMES), default="fp32",
                   help="the type of the pooled embeddings and their gradients in the all-to-all: fp32 (exact), "
                        "bf16 or fp16 (half the bytes, rounded)")


def _checkpoint_flags(c) -> None:
    c.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=0,
                   help="write a checkpoint every N training batches into --checkpoint-dir: a base, then increments "
                        "holding only the table rows changed since (resume with --load-model=DIR)")
    c.add_argument("--checkpoint-dir", dest="checkpoint_dir", default="",
                   help="with --checkpoint-every: the directory of the checkpoints (a manifest, a base, increments)")
    c.add_argument("--checkpoint-rebase-every", dest="checkpoint_rebase_every", type=int, default=16,
                   help="with --checkpoint-every: a new base after this many increments (default 16; also once the "
                        "increments hold half the base's bytes)")
    c.add_argument("--checkpoint-quantize", dest="checkpoint_quantize", type=int, default=0,
                   help="with --checkpoint-every: write the tables' rows in 8, 4 or 2 bits a value (a scale and an "
                        "offset a row; optimizer state and MLPs stay exact), twice the bits after each restore from "
                        "quantized checkpoints (default: exact)")
    c.add_argument("--checkpoint-writer", dest="checkpoint_writer", default="async",
                   help="with --checkpoint-every: async (the step copies what changed, a background thread writes "
                        "it; the default) or sync (the step writes)")


def _store_flags(s) -> None:
    s.add_argument("--embedding-store", dest="embedding_store", choices=list(STORES), default="memory",
                   help="where the embedding tables live: memory (the reference) or disk (one file per table under "
                        "--embedding-store-dir, rows cached in RAM; the same numbers, bit for bit)")
    s.add_argument("--embedding-store-dir", dest="embedding_store_dir", default="",
                   help="with --embedding-store=disk: the directory (on a disk) the run makes its table files in; "
                        "they are a working copy, removed at exit")
    s.add_argument("--embedding-cache-gib", dest="embedding_cache_gib", type=float, default=1.0,
                   help="with --embedding-store=disk: RAM for cached rows (weights and optimizer state), GiB")
    s.add_argument("--keep-embedding-store", dest="keep_embedding_store", action="store_true",
                   help="with --embedding-store=disk: leave the table files when the run ends")


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
# Configuration: the parsed flags are read here, once, into frozen dataclasses that check themselves.
# =============================================================================================


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    """Build the run's configuration from the parsed flags, each part from the flags named like its
    fields (every part checks its own values), with the -1 test defaults resolved."""
    flags = dict(vars(ns))
    _resolve_test_defaults(flags)
    _check_unread_flags(flags)
    data = _data_config(flags)
    bottom, tables = flags["bottom_mlp"], flags["table_sizes"]
    width = top_mlp_input_width(flags["interaction"], flags["interaction_itself"], len(tables), bottom[-1])
    cfg = RunConfig(
        model=take(ModelConfig, flags, top_mlp=(width,) + flags["top_mlp"]), data=data,
        train=take(TrainConfig, flags, debug_groups=flags["debug_mode"] and not flags["fix_reference_bugs"]),
        system=take(SystemConfig, flags), output=take(OutputConfig, flags), inference=take(InferenceConfig, flags),
        sharding=take(ShardingConfig, flags), store=take(StoreConfig, flags),
        checkpoints=take(CheckpointConfig, flags), flags=tuple(reference_flag_values(flags).items()))
    if cfg.output.save_onnx:
        from dlrm.outputs.onnx_export import require_onnx

        require_onnx()
    return cfg


def _resolve_test_defaults(flags: dict) -> None:
    """Replace the -1 test batch size and workers by the training ones, in ``flags`` (a test batch
    size below -1 too; workers below -1 are left for the data's configuration to refuse)."""
    if flags["test_batch_size"] < 0:
        flags["test_batch_size"] = flags["batch_size"]
    if flags["test_num_workers"] == -1:
        flags["test_num_workers"] = flags["num_workers"]


def _check_unread_flags(flags: dict) -> None:
    """Check the flags that no part of this run's configuration holds (the other data source's),
    as every run does, and refuse ``--data-generation=internal``."""
    if flags["generation"] == "internal":
        raise FlagError("{generation}=internal needs Meta-internal loaders, which are not available")
    if flags["generation"] not in ("random", "synthetic"):
        check_random_flags(flags)
    from dlrm.data.criteo.config import check_sub_sample_rate  # checked even when no Criteo data is read

    check_sub_sample_rate(flags["sub_sample_rate"])


def data_config_from_flags(flags: dict):
    """The data configuration alone, from flag values keyed by their dest names: what the
    reference's Python API (``reference_api``) builds its loaders from. The -1 test defaults are
    resolved as for a run."""
    flags = dict(flags)
    _resolve_test_defaults(flags)
    try:
        return _data_config(flags)
    except FlagError as exc:  # named by the option, as on the command line
        raise ConfigError(exc.message(option_names(build_parser()))) from None


def reference_names(parser: Optional[argparse.ArgumentParser] = None) -> Dict[str, str]:
    """dest -> the flag's attribute name in the reference: its option without the dashes, ``-`` as
    ``_`` (``batch_size``: ``mini_batch_size``)."""
    options = option_names(parser or build_parser())
    return {dest: option.lstrip("-").replace("-", "_") for dest, option in options.items()}


def reference_flag_values(flags: dict) -> dict:
    """Every flag's value under the reference's attribute name (``arch_sparse_feature_size``...), dash
    lists written as typed: what the reference's ``--mlperf-logging`` args line holds."""
    return {name: "-".join(map(str, flags[dest])) if isinstance(flags[dest], tuple) else flags[dest]
            for dest, name in reference_names().items() if dest in flags}


def _data_config(flags: dict):
    """The random (or synthetic) data's configuration, or the Criteo loaders'."""
    if flags["generation"] in ("random", "synthetic"):
        return take(RandomDataConfig, flags, dense_dim=flags["bottom_mlp"][0])
    from dlrm.data.criteo.loaders import CriteoLoaderConfig
    from dlrm.data.criteo.config import PreprocessConfig

    # A run's preprocessing draws its bars whenever stderr is a terminal; --progress is the loops'.
    preprocess = take(PreprocessConfig, flags, progress=True)
    return take(CriteoLoaderConfig, flags, preprocess=preprocess)
