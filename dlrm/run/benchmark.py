"""One benchmark run, in the reference's order: :func:`run` reads as its table of contents.

The data and its loaders, the processes and the printer, the model, the optimizer and the side
channels, then training (or one evaluation) and what follows it: the debug-mode parameters, the
compute graph, ONNX export and the summary line.
"""
from __future__ import annotations

import functools
import json
import operator
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from dlrm.common import Batch, ConfigError, Interrupted
from dlrm.distributed import DistInfo, all_or_none, check_ranks_agree, init_distributed
from dlrm.io.interrupts import held
from dlrm.model.dlrm import (DLRM, ModelConfig, fit_to_data, make_loss, quantize_for_inference,
                             skip_reference_torch_init, table_bytes, with_per_table_layout)
from dlrm.outputs.metrics import MetricsFile, format_summary
from dlrm.optim.lr_schedule import LRPolicyScheduler
from dlrm.outputs.mlperf_logger import MISSING_PACKAGE_WARNING, MLPerfLogger, make_mlperf_logger
from dlrm.outputs.side_channels import (check_no_overwrites, check_outputs, draw_compute_graph as draw_graph,
                                        make_writer, profiling, remove_stale_outputs)
from dlrm.run.checkpoint import Expected, Resume, restore
from dlrm.run.config import (RunConfig, SystemConfig, check_distributed, check_memory, embedding_backend,
                             flag_warnings, input_files, rank_settings)
from dlrm.run.log_lines import Logger, format_arch, format_batch, format_parameters
from dlrm.run.parts import RunParts, ScalarWriter, TrainState
from dlrm.run.preflight import human
from dlrm.run.sharding import run_plan
from dlrm.run.train import (evaluate_once, graph_output, kept_checkpoint, make_optimizer, make_scheduler,
                            optimizer_groups, train)
from dlrm.shard.plan import ShardingPlan
from dlrm.shard.stored import stored_sharded_tables
from dlrm.store.tables import StoredTables, stores_of


# =============================================================================================
# The run's parts
# =============================================================================================


@dataclass(frozen=True)
class Data:
    """The loaders (``len(loader)`` is its number of batches) and the shape of the data they read."""

    train_loader: Iterable[Batch]
    test_loader: Iterable[Batch]
    table_sizes: Tuple[int, ...]
    dense_dim: int


def make_data(cfg: RunConfig, rng: np.random.RandomState, log: Logger) -> Data:
    """The training and test loaders, and the table sizes and dense width they fix."""
    if cfg.random_data:
        from dlrm.data.random import make_random_data_and_loaders

        _, train_ld, _, test_ld = make_random_data_and_loaders(cfg.data, rng, log.warn)
        return Data(train_ld, test_ld, cfg.data.table_sizes, cfg.data.dense_dim)
    from dlrm.data.criteo.loaders import make_criteo_data_and_loaders

    # Preprocessing is the first to draw, as in the reference, whose one global stream then goes on
    # to the loaders and the model: a run that preprocesses trains differently from later runs.
    # --fix-reference-bugs gives preprocessing a stream of its own, so every run trains alike.
    own_stream = cfg.train.fix_reference_bugs
    data = make_criteo_data_and_loaders(cfg.data, rng, log=log, preprocess_rng=None if own_stream else rng)
    return Data(data.train_loader, data.test_loader, data.table_sizes, data.dense_dim)


def setup_device(cfg: SystemConfig, log: Logger, info: DistInfo) -> torch.device:
    """CUDA when asked for and available (one GPU per process: ``cuda:<local rank>`` across
    processes), else CPU."""
    if cfg.use_gpu and torch.cuda.is_available():
        torch.cuda.manual_seed_all(cfg.seed)
        torch.backends.cudnn.deterministic = True
        log("Using 1 GPU(s)...")
        return torch.device("cuda", info.local_rank if info.world_size > 1 else 0)
    log("Using CPU...")
    return torch.device("cpu")


def debug_batches(train_loader, nbatches: int) -> List[str]:
    """``--debug-mode``: every training batch, printed before the model is built. Drawing them moves
    the NumPy stream, and the loader's iterator takes one torch draw for its base seed (every loader
    does, as the reference's did), so the model is initialised from the same streams as the reference's."""
    lines: List[str] = []
    for step, batch in enumerate(train_loader):
        if step >= nbatches:
            break
        lines += format_batch(step, batch)
    return lines


def optimizer_and_schedule(cfg: RunConfig, model: DLRM, device: torch.device
                           ) -> Tuple[Optional[torch.optim.Optimizer], Optional[LRPolicyScheduler]]:
    """The optimizer and its schedule (none when inference-only)."""
    t = cfg.train
    if cfg.inference.inference_only:
        return None, None
    if device.type == "cuda" and t.optimizer in ("adagrad", "rwsadagrad"):
        raise ConfigError("GPU version of Adagrad is not supported by PyTorch.")
    optimizer = make_optimizer(t.optimizer, optimizer_groups(model, t.debug_groups), t.learning_rate,
                               t.fix_reference_bugs, tables=model.emb_l)
    scheduler = make_scheduler(optimizer, t)
    if model.cfg.embedding_backend == "fused":  # the tables' SGD runs in backward, at the step's rate
        model.emb_l.follow_optimizer_lr(optimizer)
    return optimizer, scheduler


def _log_lines(log: Logger, lines: Sequence[str]) -> None:
    """Print each of ``lines``."""
    for line in lines:
        log(line)


# =============================================================================================
# The run
# =============================================================================================


def run(cfg: RunConfig) -> None:
    """The whole benchmark, in the reference's order."""
    started = time.time()
    check_no_overwrites(cfg.output, input_files(cfg))  # before any file is opened for writing
    mlperf = make_mlperf_logger(cfg.output.mlperf_logging, log_file=cfg.output.mlperf_log_file or None)
    mlperf.event("cache_clear", True)
    mlperf.start("init_start")
    rng = np.random.RandomState(cfg.system.seed)  # the reference's global NumPy stream, as an object
    torch.manual_seed(cfg.system.seed)
    torch.sparse.check_sparse_tensor_invariants.disable()  # explicit opt-out: torch warns otherwise
    info, log = start_processes(cfg, mlperf)
    device = setup_device(cfg.system, log, info)
    mlperf.end("init_stop")
    mlperf.start("run_start")
    data = load_data(cfg, rng, log, info)
    if cfg.train.mlperf_logging:
        log("command line args: " + json.dumps(dict(cfg.flags)))
    model = build_model(cfg, data, rng, info, device, log)
    try:
        parts, state = prepare_run(cfg, model, data, device, log, info, mlperf)
        t = cfg.train
        mlperf.submission_info(t.batch_size, cfg.system.seed, t.learning_rate, t.lr_num_warmup_steps,
                               t.lr_decay_start_step, t.lr_num_decay_steps)
        try:
            with closing_channels(parts), profiling(cfg.output.enable_profiling, device.type == "cuda", log.note):
                if cfg.inference.inference_only:
                    log("Testing for inference only")
                    evaluate_once(parts, t, state)
                else:
                    train(parts, t, state)
                    if parts.checkpoints is not None:
                        parts.checkpoints.close()  # the last write completes before the run reports
            finish(cfg, parts, state, model, data, started)
        except Interrupted as exc:
            raise exc.keeping(kept_checkpoint(cfg.output.save_model, state))
    finally:
        for store in stores_of(model.emb_l):
            store.close()  # the table files are a working copy


def _say(text: str) -> None:
    """A line on stderr from every process (before a rank-aware printer exists)."""
    print(text, file=sys.stderr, flush=True)


def start_processes(cfg: RunConfig, mlperf: MLPerfLogger) -> Tuple[DistInfo, Logger]:
    """This process's place in the run (none in debug mode, as in the reference) and its printer,
    once every rank has the same flags and can write its outputs (all ranks start, or none)."""
    info = DistInfo() if cfg.system.debug_mode else init_distributed(
        cfg.system.local_rank, cfg.system.use_gpu, cfg.system.dist_backend, cfg.system.dist_init_timeout,
        log=_say)
    check_ranks_agree(rank_settings(cfg), info)
    all_or_none(lambda: check_outputs(cfg.output), info, "start")  # before any data is read or table built
    log = Logger(info)
    if not cfg.system.debug_mode:
        log(f"world size: {info.world_size}, current rank: {info.rank}, local rank: {info.local_rank}")
    for warning in flag_warnings(cfg, info):
        log.warn(warning)
    mlperf.rank = info.rank  # events from rank 0 only
    if info.is_main:
        for name in remove_stale_outputs(cfg.output):
            log.note(f"removed {name}, a temporary file that an interrupted run left")
    if mlperf.missing_package:
        log.warn(MISSING_PACKAGE_WARNING)
    return info, log


def load_data(cfg: RunConfig, rng: np.random.RandomState, log: Logger, info: DistInfo) -> Data:
    """The data, read on every rank or none, of the same shape on every rank."""
    try:
        data = all_or_none(lambda: make_data(cfg, rng, log), info, "read the data")
    except Interrupted as exc:
        raise exc.during("loading the data")
    check_ranks_agree(data_settings(data), info)
    return data


def data_settings(data: Data) -> dict:
    """What every rank's data must share (each rank may read its own copy of the files), for
    :func:`extend_distributed.check_ranks_agree`."""
    shape = {"the data's table sizes": "-".join(str(rows) for rows in data.table_sizes),
             "the data's dense features": str(data.dense_dim),
             "the number of training batches": str(len(data.train_loader)),
             "the number of test batches": str(len(data.test_loader))}
    return {name: (text, text) for name, text in shape.items()}


def build_model(cfg: RunConfig, data: Data, rng: np.random.RandomState, info: DistInfo, device: torch.device,
                log: Logger) -> DLRM:
    """The model for the data's tables, drawn after the debug-mode data print, as in the reference."""
    model_cfg = cfg.model if cfg.random_data else fit_to_data(cfg.model, data.table_sizes, data.dense_dim)
    if cfg.system.debug_mode:
        _log_lines(log, format_arch(model_cfg, data.dense_dim) + ["data (inputs and targets):"])
        _log_lines(log, debug_batches(data.train_loader, nbatches_of(cfg, data)))
    check_distributed(cfg, info, len(data.table_sizes))
    model_cfg = replace(model_cfg, embedding_backend=embedding_backend(cfg, model_cfg, info, device))
    plan = run_plan(cfg, model_cfg, info, device, log)
    check_memory(cfg, model_cfg, info, device)
    model = DLRM(model_cfg, rng, info, log=log.warn, plan=plan, a2a_precision=cfg.sharding.a2a_precision,
                 make_tables=_stored_tables(cfg, log, info, plan) if cfg.store.on_disk else None).to(device)
    if cfg.random_data and cfg.data.num_workers >= 2 and not cfg.train.fix_reference_bugs:
        skip_reference_torch_init(model_cfg)  # the workers' base seeds come from torch's generator
    if cfg.train.fast_numerics:
        from dlrm.model.fast_numerics import accelerate_mlps, describe

        accelerate_mlps(model)
        log.note(describe())
    if cfg.system.debug_mode:
        _log_lines(log, ["initial parameters (weights and bias):"] + format_parameters(model, cfg.system.print_precision))
    return model


def _stored_tables(cfg: RunConfig, log: Logger, info: DistInfo, plan: Optional[ShardingPlan]):
    """What builds the tables in files under ``--embedding-store-dir`` (``--embedding-store=disk``):
    all of them in one process, this rank's pieces of them (``plan``) in several."""
    optimizer = "sgd" if cfg.inference.inference_only else cfg.train.optimizer
    s = cfg.store

    def make(model_cfg: ModelConfig, rng: np.random.RandomState) -> nn.Module:
        def store(sizes, dim, draw=None) -> StoredTables:
            return StoredTables(sizes, dim, rng, s.embedding_store_dir, s.cache_bytes, optimizer,
                                s.keep_embedding_store, log.warn, draw)

        if plan is None:
            return store(model_cfg.table_sizes, model_cfg.embedding_dim)
        return stored_sharded_tables(model_cfg.table_sizes, model_cfg.embedding_dim, model_cfg.bottom_mlp[-1], rng,
                                     plan, info, cfg.sharding.a2a_precision, store)
    return make


def nbatches_of(cfg: RunConfig, data: Data) -> int:
    """The batches an epoch trains on: ``--num-batches``, or the whole training loader."""
    return cfg.train.num_batches if cfg.train.num_batches > 0 else len(data.train_loader)


def prepare_run(cfg: RunConfig, model: DLRM, data: Data, device: torch.device, log: Logger, info: DistInfo,
                mlperf: MLPerfLogger) -> Tuple[RunParts, TrainState]:
    """The optimizer, a loaded checkpoint, inference quantization and the side channels, as the
    loops' parts and the state they start from."""
    optimizer, scheduler = optimizer_and_schedule(cfg, model, device)
    loss_fn = make_loss(cfg.train.loss_function, cfg.train.loss_weights)
    nbatches, nbatches_test = nbatches_of(cfg, data), len(data.test_loader)
    resume = Resume()
    if cfg.output.load_model:
        expected = Expected(cfg.train.optimizer, cfg.train.nepochs, nbatches, nbatches_test,
                            cfg.train.mlperf_logging, cfg.train.fix_reference_bugs)
        resume = all_or_none(lambda: restore(
            cfg.output.load_model, model, optimizer, scheduler, info, log, expected,
            inference_only=cfg.inference.inference_only), info, "load the checkpoint")
        check_ranks_agree(resume_settings(resume), info)
    run_model = inference_model(cfg, model, log) if cfg.inference.inference_only else model
    log("time/loss/accuracy (if enabled):")
    writer, metrics = open_channels(cfg, info, log)
    parts = RunParts(run_model, loss_fn, optimizer, scheduler, data.train_loader, data.test_loader, nbatches,
                     nbatches_test, device, log, writer=writer, mlperf=mlperf, save_model=cfg.output.save_model,
                     info=info, num_tables=len(data.table_sizes), metrics=metrics,
                     checkpoints=_periodic_checkpoints(cfg, model, optimizer, log, resume))
    return parts, TrainState.resuming(resume)


def _periodic_checkpoints(cfg: RunConfig, model: DLRM, optimizer, log: Logger, resume: Resume):
    """``--checkpoint-every``'s writer (None without it, or when the run only evaluates)."""
    if not cfg.checkpoints.on or optimizer is None:
        return None
    from dlrm.checkpoints.periodic import PeriodicCheckpoints
    from dlrm.run.checkpoint import model_flags

    config = {"model": model_flags(model.cfg), "table_sizes": list(model.cfg.table_sizes),
              "embedding_dim": model.cfg.embedding_dim, "optimizer": cfg.train.optimizer}
    return PeriodicCheckpoints(cfg.checkpoints, model, optimizer, config, model.cfg.table_sizes, note=log.note,
                               quantized_restores=resume.quantized_restores)


def open_channels(cfg: RunConfig, info: DistInfo, log: Logger) -> Tuple[Optional[ScalarWriter], Optional[MetricsFile]]:
    """TensorBoard's writer and the metrics file, on the main rank (each only when asked for)."""
    if not info.is_main:
        return None, None
    with held():  # a writer cut short while it starts would keep its thread running
        directory = cfg.output.tensor_board_filename  # "" (--tensor-board-filename=): no TensorBoard
        writer = make_writer(directory, log.note) if directory else None
    return writer, MetricsFile(cfg.output.metrics_file) if cfg.output.metrics_file else None


def inference_model(cfg: RunConfig, model: DLRM, log: Logger) -> torch.nn.Module:
    """``--inference-only``: the model with its tables and MLPs quantized as asked."""
    if cfg.train.fast_numerics and cfg.inference.quantize_mlp_bits != 32:
        from dlrm.model.fast_numerics import restore_mlps

        restore_mlps(model)  # dynamic quantization replaces plain Linear layers
    before = table_bytes(model.emb_l)
    quantized = quantize_for_inference(model, cfg.inference.quantize_emb_bits, cfg.inference.quantize_mlp_bits)
    if cfg.inference.quantize_emb_bits != 32:
        log.note(f"quantized the tables to {cfg.inference.quantize_emb_bits} bits per value: "
                 f"{human(before)} -> {human(table_bytes(model.emb_l))}")
    return quantized


def resume_settings(resume) -> dict:
    """Where the loaded checkpoint resumes, which every rank's copy must share."""
    where = (resume.epoch, resume.batch, resume.best_acc, resume.best_auc)
    return {"the loaded checkpoint": (where, f"epoch {resume.epoch} batch {resume.batch} "
                                             f"(accuracy {resume.best_acc * 100:.3f} %)")}


@contextmanager
def closing_channels(parts: RunParts) -> Iterator[None]:
    """Close TensorBoard's writer and the metrics file when the block ends, however it ends."""
    try:
        yield
    finally:
        with held():  # closing must not be cut short: TensorBoard's thread would outlive the run
            for channel in (parts.writer, parts.metrics):
                if channel is not None:
                    channel.close()


def finish(cfg: RunConfig, parts: RunParts, state: TrainState, model: DLRM, data: Data, started: float) -> None:
    """After the run: debug-mode parameters, the compute graph, ONNX export and the summary line."""
    log = parts.log
    if cfg.system.debug_mode:
        _log_lines(log, ["updated parameters (weights and bias):"] + format_parameters(model, cfg.system.print_precision))
    sample = state.first_batch if state.first_batch is not None else next(iter(data.train_loader))
    if cfg.output.plot_compute_graph and parts.info.is_main:
        draw_graph(graph_output(parts, cfg.train, sample, cfg.inference.inference_only), parts.model, log.note)
    if cfg.output.save_onnx:
        from dlrm.outputs.onnx_export import export_onnx

        if cfg.train.fast_numerics:
            from dlrm.model.fast_numerics import restore_mlps

            restore_mlps(model)  # export the plain layers, which ONNX knows
        export_onnx(with_per_table_layout(model), sample, cfg.output.onnx_file, log)
    stores = stores_of(model.emb_l)
    store = functools.reduce(operator.add, (s.stats() for s in stores)).describe() if stores else None
    log.note(format_summary(time.time() - started, state.trained.samples, state.trained.seconds, state.best.result,
                            state.saved.path, store))
