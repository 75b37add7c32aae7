"""Training and evaluation: the train step, the epoch and evaluation loops, and the records they keep.

The loops take explicit parts (:class:`RunParts`, built once and frozen) and the smallest config
they need (:class:`TrainConfig`); nothing here reads the command line. What the loops carry from
step to step is a few small records in :class:`TrainState`. Every printed line comes from a
formatter of :mod:`dlrm.run.log_lines` and goes through its one rank-aware :class:`Logger`.

One batch's path, from :func:`train`: :func:`train_one_epoch` fetches it, moves it to the device,
hands it to :func:`train_step` (forward, loss, backward, update), then prints and tests when due.

Dimension vocabulary: B batch (B_local: this rank's rows of it), T tables, M dense features.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.profiler import record_function

from dlrm.common import Batch, ConfigError, Interrupted, NonFiniteError, check_at_least_one, check_number
from dlrm.distributed import DistInfo, all_reduce_sum, average_gradients, gather_objects, shard
from dlrm.io import interrupts
from dlrm.model.dlrm import check_loss_weights
from dlrm.optim.lr_schedule import LRPolicyScheduler, check_schedule
from dlrm.outputs.metrics import progress_bar
from dlrm.run.checkpoint import Position, Resume, checkpoint_payload, save_checkpoint
from dlrm.run.log_lines import (Logger, format_accuracy_line, format_mlperf_metrics_line, format_test_header,
                                format_train_line)
from dlrm.run.parts import LastSave, PrintWindow, RunParts, ScalarWriter, TrainState
from dlrm.store.tables import stores_of

OPTIMIZERS = ("sgd", "adagrad", "rwsadagrad")

__all__ = [  # Logger and the format_* functions are re-exported from dlrm.run.log_lines
    "OPTIMIZERS", "TrainConfig", "optimizer_groups", "make_optimizer", "make_scheduler", "RunParts", "TrainState",
    "Logger", "format_accuracy_line", "format_mlperf_metrics_line", "format_test_header", "format_train_line",
    "to_device", "local_rows", "predict", "graph_output", "train", "train_one_epoch", "train_step", "save_position",
    "kept_checkpoint", "save_final", "divergence_message", "evaluate", "evaluate_once", "sklearn_metrics",
]


# ---------------------------------------------------------------------------------------------
# Configuration, optimizer and schedule
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """The loops: batches, epochs, optimizer, schedule, printing and testing.

    Attributes:
        fix_reference_bugs: the corrected behaviours that change numbers (whole test set despite
            ``--num-batches``, real gradient accumulation, the base-rate plateau, batch skipping
            only in the resumed epoch, checkpoints written only when a test improves).
        mixed_precision: "none" or "bf16" (autocast around the forward).
        debug_groups: the reference's three parameter groups of ``--debug-mode`` (tables, bottom
            MLP, top MLP; learned pooling weights left out).
        progress: show a progress bar over each epoch and test pass (on a terminal).
        fast_numerics: the model's MLPs and interaction run on ``fast_numerics``' kernels.
    """

    batch_size: int = 1
    nepochs: int = 1
    num_batches: int = 0
    learning_rate: float = 0.01
    optimizer: str = "sgd"
    loss_function: str = "mse"
    loss_weights: Sequence[float] = (1.0, 1.0)
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
    fix_reference_bugs: bool = False
    mixed_precision: str = "none"
    debug_groups: bool = False
    progress: bool = False
    fast_numerics: bool = False

    def __post_init__(self):
        check_at_least_one(dict(nepochs=self.nepochs, print_freq=self.print_freq, grad_accum_iter=self.grad_accum_iter))
        for name in ("learning_rate", "mlperf_acc_threshold", "mlperf_auc_threshold"):
            check_number(name, getattr(self, name), 0.0)
        check_loss_weights(self.loss_function, self.loss_weights)
        check_schedule(self.lr_num_warmup_steps, self.lr_decay_start_step, self.lr_num_decay_steps)


def optimizer_groups(model: nn.Module, debug_groups: bool) -> list:
    """Every parameter in one group; or the reference's three ``--debug-mode`` groups (tables,
    bottom MLP, top MLP), which leave learned pooling weights untrained."""
    if not debug_groups:
        return list(model.parameters())
    return [{"params": list(part.parameters())} for part in (model.emb_l, model.bot_l, model.top_l)]


def make_optimizer(name: str, params: list, lr: float, fix_reference_bugs: bool = False,
                   tables: Optional[nn.Module] = None) -> torch.optim.Optimizer:
    """sgd, adagrad or the row-wise sparse adagrad (which, unless ``fix_reference_bugs``, drops the
    accumulators of a loaded checkpoint at its first step, as the reference's does). ``tables``:
    the model's tables, which give the row-wise Adagrad the whole rows of column-split tables, or
    (tables in files) take the optimizer to set their working rows' state."""
    if name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr)
    elif name == "adagrad":
        optimizer = torch.optim.Adagrad(params, lr=lr)
    elif name == "rwsadagrad":
        from dlrm.optim.rwsadagrad import RWSAdagrad

        optimizer = RWSAdagrad(params, lr=lr, reference_reload=not fix_reference_bugs,
                               whole_row_squares=getattr(tables, "whole_row_squares", None))
    else:
        raise ConfigError(f"--optimizer={name} is not supported (use {', '.join(OPTIMIZERS)})")
    if hasattr(tables, "attach_optimizer"):  # tables in files: their working rows' state around each step
        tables.attach_optimizer(optimizer)
    return optimizer


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LRPolicyScheduler:
    """The warmup and decay schedule of ``cfg`` over ``optimizer``'s rate."""
    return LRPolicyScheduler(optimizer, cfg.lr_num_warmup_steps, cfg.lr_decay_start_step, cfg.lr_num_decay_steps,
                             reference_plateau=not cfg.fix_reference_bugs)


# ---------------------------------------------------------------------------------------------
# Batches on the device
# ---------------------------------------------------------------------------------------------


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` on ``device`` (the same object on the CPU)."""
    if device.type == "cpu":
        return batch
    indices = batch.indices.to(device) if isinstance(batch.indices, torch.Tensor) else [i.to(device) for i in batch.indices]
    return Batch(batch.dense_x.to(device), batch.offsets.to(device), indices, batch.labels.to(device))


def local_rows(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's contiguous rows of a whole-batch tensor (all of it in a single process). The one
    place that cuts the batch between ranks: dense features and labels go through it; the tables
    take the whole batch and hand each rank its rows through the all-to-all."""
    if info.world_size == 1:
        return tensor
    start, stop = shard(tensor.shape[0], info.world_size, info.rank)
    return tensor[start:stop]


def _autocast(device: torch.device, mixed_precision: str) -> ContextManager:
    """bf16 autocast on ``device`` when ``mixed_precision`` is "bf16"; else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if mixed_precision == "bf16" else nullcontext()


def predict(parts: RunParts, batch: Batch, mixed_precision: str) -> torch.Tensor:
    """The model's (B_local, 1) predictions for this rank's rows, under bf16 autocast if asked."""
    dense_x = local_rows(batch.dense_x, parts.info)
    with _autocast(dense_x.device, mixed_precision):
        return parts.model(dense_x, batch.offsets, batch.indices)


@contextmanager
def _bar(parts: RunParts, cfg: TrainConfig, total: int, desc: str):
    """A progress bar over ``total`` batches when ``cfg.progress`` (on a terminal, main rank); the
    run's lines print above it, unchanged."""
    enabled = None if cfg.progress and parts.log.enabled else False  # None: only on a terminal
    with progress_bar(total, desc, enabled) as bar:
        with parts.log.above(bar):
            yield bar


def graph_output(parts: RunParts, cfg: TrainConfig, batch: Batch, inference: bool) -> torch.Tensor:
    """What ``--plot-compute-graph`` draws: the loss of ``batch`` (the training graph), or with
    ``inference`` its predictions (the inference graph). Nothing is updated."""
    batch = to_device(batch, parts.device)
    probs = predict(parts, batch, cfg.mixed_precision)
    return probs if inference else parts.loss_fn(probs, local_rows(batch.labels, parts.info))


def _sync(device: torch.device) -> float:
    """Wall time, after waiting for the GPU (the only host synchronisation of a timed step)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def _scalar(writer: Optional[ScalarWriter], tag: str, value: float, global_step: int) -> None:
    """``value`` to TensorBoard, when there is a writer."""
    if writer is not None:
        with interrupts.held():  # a signal inside TensorBoard's queue would leave its thread unstoppable
            writer.add_scalar(tag, value, global_step)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train(parts: RunParts, cfg: TrainConfig, state: TrainState) -> None:
    """Every epoch from the resumed one on, until done or an MLPerf threshold stops the run; then,
    with ``--save-model`` and no test, the final model."""
    for epoch in range(state.progress.resume.epoch, cfg.nepochs):
        parts.mlperf.start("block_start", first_epoch_num=epoch + 1, epoch_count=1)
        parts.mlperf.start("epoch_start", epoch_num=epoch + 1)
        try:
            train_one_epoch(parts, cfg, state, epoch)
        except Interrupted as exc:
            where = f"iteration {state.progress.step + 1}/{parts.nbatches} of epoch {epoch}"
            raise exc.during("training").at(where)
        parts.mlperf.end("epoch_stop", epoch_num=epoch + 1)
        parts.mlperf.end("block_stop", first_epoch_num=epoch + 1)
        if state.progress.stop:
            break
    if cfg.mlperf_auc_threshold > 0 and not state.progress.stop:
        parts.mlperf.end("run_stop", status="aborted")
    if parts.save_model and state.best.result is None and state.trained.samples:
        save_final(parts, cfg, state, cfg.nepochs - 1)


def train_one_epoch(parts: RunParts, cfg: TrainConfig, state: TrainState, epoch: int) -> None:
    """One pass over the training loader: each batch is fetched, moved to the device and trained
    on; then, when due, the training line prints and the model is tested.

    Losses stay on the device; only the steps that print read them back.
    """
    with _bar(parts, cfg, parts.nbatches, f"epoch {epoch}") as bar:
        # tables (or a rank's pieces) in files read the next batch's rows while this one trains
        prefetch = parts.model.emb_l.prefetch if stores_of(parts.model.emb_l) else None

        def may_read_ahead(step: int) -> bool:  # not past a test: random test data may draw from the same stream
            return not (cfg.test_freq > 0 and _due(cfg.test_freq, step, parts.nbatches))

        for step, batch in enumerate(_reading_ahead(parts.train_loader, prefetch, may_read_ahead)):
            if step >= parts.nbatches:
                break
            state.progress.step = step
            bar.update()
            if state.first_batch is None:
                state.first_batch = batch
            if _left_out(parts, cfg, state, batch, step, epoch):
                continue
            batch = to_device(batch, parts.device)
            lr = parts.optimizer.param_groups[0]["lr"]  # the rate this step uses
            started = _sync(parts.device)
            with _predictions_checked(parts, state, step, epoch):
                loss = train_step(parts, cfg, batch, step)
            seconds = _sync(parts.device) - started
            state.count_step(step, loss, local_rows(batch.labels, parts.info).shape[0], seconds, lr,
                             parts.info.world_size)
            testing = cfg.test_freq > 0 and _due(cfg.test_freq, step, parts.nbatches)
            if _due(cfg.print_freq, step, parts.nbatches) or testing:
                printed_loss = _print_train_line(parts, cfg, state, step, epoch)
                if testing:
                    _test_and_save(parts, cfg, state, printed_loss, step, epoch)
            if parts.checkpoints is not None and parts.checkpoints.after_step(batch.indices):
                _write_periodic(parts, cfg, state, step, epoch)
            if state.progress.stop:
                return


def _reading_ahead(loader: Iterable[Batch], prefetch: Optional[Callable[[object, object], None]],
                   may_read_ahead: Callable[[int], bool]) -> Iterator[Batch]:
    """The loader's batches; with ``prefetch`` (tables in files), the successor of batch ``step`` is
    fetched before that batch is yielded and its indices and offsets handed to ``prefetch``, so its rows are
    read while the batch trains, unless ``may_read_ahead(step)`` says no (a test follows the step,
    and must draw its data first, as it does without reading ahead). The loader is asked for the
    same batches in the same order: the loop fetches one past its last batch either way."""
    if prefetch is None:
        yield from loader
        return
    batches = iter(loader)
    current, step = next(batches, None), 0
    while current is not None:
        ahead = may_read_ahead(step)
        following = next(batches, None) if ahead else None
        if following is not None:
            prefetch(following.indices, following.offsets)
        yield current
        current = following if ahead else next(batches, None)
        step += 1


def _dense_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The data-parallel parameters (everything but the sharded tables and their learned pooling
    weights, whose owner computes their whole gradient)."""
    return [p for name, p in model.named_parameters() if not name.startswith(("emb_l.", "v_W_l."))]


def _sum_split_pooling_gradients(model: nn.Module) -> None:
    """Complete the gradients of learned pooling weights whose table is split by columns (each
    owner has its columns' part)."""
    if hasattr(model, "v_W_l") and hasattr(model.emb_l, "sum_pooling_gradients"):
        model.emb_l.sum_pooling_gradients({int(k): v for k, v in model.v_W_l.items()})


def train_step(parts: RunParts, cfg: TrainConfig, batch: Batch, step: int) -> torch.Tensor:
    """Forward, loss, backward and (every ``grad_accum_iter`` batches under ``--mlperf-logging``) an
    optimizer update and a schedule step. Returns the loss, still on the device.

    With accumulation the reference zeroes the gradients right before the updating batch's
    backward, so each update uses that batch's gradients alone; that is the default. With
    ``fix_reference_bugs`` the gradients of ``grad_accum_iter`` batches really accumulate (each
    loss scaled by 1/N) and are zeroed after the update.
    """
    accum = cfg.grad_accum_iter if cfg.mlperf_logging else 1
    updating = (step + 1) % accum == 0
    with record_function("DLRM forward"):
        dense_x = local_rows(batch.dense_x, parts.info)
        with _autocast(dense_x.device, cfg.mixed_precision):
            probs = parts.model(dense_x, batch.offsets, batch.indices)
    with record_function("DLRM loss compute"):
        loss = parts.loss_fn(probs, local_rows(batch.labels, parts.info))
    reference_accum = accum > 1 and not cfg.fix_reference_bugs
    with record_function("DLRM backward"):
        if reference_accum and updating:
            parts.optimizer.zero_grad(set_to_none=True)
        (loss / accum if accum > 1 and not reference_accum else loss).backward()
        if parts.info.world_size > 1:
            average_gradients(_dense_parameters(parts.model), parts.info)
            _sum_split_pooling_gradients(parts.model)
    if updating:
        parts.optimizer.step()
        parts.scheduler.step()
        if not reference_accum:
            parts.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _due(freq: int, step: int, nbatches: int) -> bool:
    """Whether a line (or test) every ``freq`` steps falls at ``step`` (0-based), or it is the last."""
    return (step + 1) % freq == 0 or step + 1 == nbatches


def _left_out(parts: RunParts, cfg: TrainConfig, state: TrainState, batch: Batch, step: int, epoch: int) -> bool:
    """Whether this batch is not trained on: it was before the checkpoint this run resumed from, or
    (several processes) its rows do not divide among the ranks, which the reference warns of."""
    if _trained_before_resume(state.progress.resume, cfg, step, epoch):
        return True
    rows = batch.labels.shape[0]
    if parts.info.world_size > 1 and rows % parts.info.world_size:
        parts.log(f"Warning: Skiping the batch {step} with size {rows}")
        return True
    return False


def _trained_before_resume(resume: Resume, cfg: TrainConfig, step: int, epoch: int) -> bool:
    """Batches already trained before the checkpoint this run resumed from. The reference skips
    the saved batch count in every epoch from the saved one on (it hangs when that epoch is not the
    first); we do so when resuming from the first epoch, and otherwise, or with
    ``fix_reference_bugs``, only in the saved epoch."""
    if step >= resume.batch or epoch < resume.epoch:
        return False
    return epoch == resume.epoch or (resume.epoch == 0 and not cfg.fix_reference_bugs)


@contextmanager
def _predictions_checked(parts: RunParts, state: TrainState, step: int, epoch: int) -> Iterator[None]:
    """Turns BCE's refusal of NaN predictions (a traceback in the reference) into one line naming
    the step."""
    try:
        yield
    except RuntimeError as exc:
        if "should be between 0 and 1" not in str(exc):
            raise
        what = "the predictions became nan"
        raise NonFiniteError(divergence_message(parts, state, what, step + 1, step + 1, epoch)) from None


def _print_train_line(parts: RunParts, cfg: TrainConfig, state: TrainState, step: int, epoch: int) -> float:
    """Print the training line of the steps since the last one, send it to TensorBoard and the
    metrics file, and start a new window; returns its mean loss."""
    window, nbatches = state.window, parts.nbatches
    global_step = nbatches * epoch + step + 1
    measured_ms = 1000.0 * window.seconds / max(window.steps, 1)
    samples_per_s = window.rows * parts.info.world_size / window.seconds if window.seconds else None
    loss = window.mean_loss(parts.info)  # host synchronisation: this line prints
    if not math.isfinite(loss):  # NaN stays NaN in the running sum, so checking here misses none
        first, last = window.first_non_finite(step)
        raise NonFiniteError(divergence_message(parts, state, f"the training loss became {loss}", first, last, epoch))
    state.window = PrintWindow()
    state.trained.last_loss = loss
    wall = time.strftime("%H:%M") if cfg.print_wall_time else None
    parts.log(format_train_line(step + 1, nbatches, epoch, measured_ms if cfg.print_time else -1.0, loss, wall))
    _scalar(parts.writer, "Train/Loss", loss, global_step)
    _scalar(parts.writer, "Train/LR", window.lr, global_step)
    if parts.metrics is not None and parts.info.is_main:
        parts.metrics.write(global_step, epoch, loss=loss, lr=window.lr, ms_per_it=measured_ms,
                            samples_per_s=samples_per_s)
    return loss


def _test_and_save(parts: RunParts, cfg: TrainConfig, state: TrainState, loss: float, step: int,
                   epoch: int) -> None:
    """Test after ``step``; write ``--save-model`` when due; stop once an MLPerf threshold is passed."""
    nbatches = parts.nbatches
    global_step = nbatches * epoch + step + 1
    parts.log(format_test_header(step + 1, nbatches, epoch))
    parts.mlperf.start("eval_start", epoch_num=(step + 1) / nbatches + epoch + 1)
    metrics = evaluate(parts, cfg, state, global_step, epoch)
    parts.mlperf.end("eval_stop", epoch_num=(step + 1) / nbatches + epoch + 1)
    _write_test_record(parts, metrics, global_step, epoch)
    if parts.save_model and _saves_at(cfg, state, metrics):
        parts.log(f"Saving model to {parts.save_model}")
        save_position(parts, cfg, state, Position(
            nepochs=cfg.nepochs, nbatches=nbatches, nbatches_test=parts.nbatches_test, epoch=epoch, step=step + 1,
            train_loss=loss, test_acc=metrics["accuracy"], test_auc=metrics.get("roc_auc")))
    _check_thresholds(parts, cfg, state)


def _saves_at(cfg: TrainConfig, state: TrainState, metrics: Dict[str, float]) -> bool:
    """Whether this test writes ``--save-model``. The reference compares every test with the best it
    started from, never with the best so far: the accuracy with 0 (or with a loaded checkpoint's), the
    AUC under ``--mlperf-logging`` with 0; so it writes at almost every test. That is the default, so
    a later ``--load-model`` loads the reference's state; ``fix_reference_bugs`` writes only when a
    test improves on the best so far."""
    if cfg.fix_reference_bugs:
        return bool(metrics["is_best"])
    if cfg.mlperf_logging:
        return metrics["roc_auc"] > 0.0
    return metrics["accuracy"] > state.progress.resume.best_acc


def save_position(parts: RunParts, cfg: TrainConfig, state: TrainState, at: Position) -> None:
    """Write ``--save-model`` at ``at`` (every rank takes part: tables are gathered on rank 0)."""
    try:
        payload = checkpoint_payload(parts.model, parts.optimizer, cfg.optimizer, parts.scheduler,
                                     parts.num_tables, parts.info, at)
        if parts.info.is_main:
            save_checkpoint(parts.save_model, payload)
    except Interrupted as exc:
        raise exc.during(f"saving the checkpoint {parts.save_model}")
    state.saved = LastSave(parts.save_model, f"iteration {at.step}/{at.nbatches} of epoch {at.epoch}")


def _write_periodic(parts: RunParts, cfg: TrainConfig, state: TrainState, step: int, epoch: int) -> None:
    """``--checkpoint-every``: this step's checkpoint into the chain (a base or an increment)."""
    at = Position(nepochs=cfg.nepochs, nbatches=parts.nbatches, nbatches_test=parts.nbatches_test, epoch=epoch,
                  step=step + 1, train_loss=state.trained.last_loss, test_acc=state.best.accuracy,
                  test_auc=state.best.auc if cfg.mlperf_logging else None)
    try:
        parts.checkpoints.save(lambda: checkpoint_payload(parts.model, parts.optimizer, cfg.optimizer, parts.scheduler,
                                                          parts.num_tables, parts.info, at),
                               f"iteration {at.step}/{at.nbatches} of epoch {epoch}")
    except Interrupted as exc:
        raise exc.during("writing a periodic checkpoint")


def kept_checkpoint(save_model: str, state: TrainState) -> str:
    """What a run stopped by a signal leaves of its model: the last checkpoint it wrote, and
    where training stood then (a checkpoint being written when the signal came is dropped)."""
    if not save_model:
        return "no checkpoint (no --save-model)"
    if state.saved.where is None:
        return f"no checkpoint written yet ({save_model} untouched)"
    return f"the checkpoint {save_model} of {state.saved.where}"


def save_final(parts: RunParts, cfg: TrainConfig, state: TrainState, epoch: int) -> None:
    """``--save-model`` without any test: the model at the end of the run (the reference saves only
    at tests, so such a run wrote nothing)."""
    parts.log.note(f"Saving the final model to {parts.save_model} (no test ran to choose a best one)")
    save_position(parts, cfg, state, Position(
        nepochs=cfg.nepochs, nbatches=parts.nbatches, nbatches_test=parts.nbatches_test, epoch=epoch,
        step=parts.nbatches, train_loss=state.trained.last_loss, test_acc=0.0))


def divergence_message(parts: RunParts, state: TrainState, what: str, first: int, last: int, epoch: int) -> str:
    """``what`` became NaN or infinite in steps ``first``..``last`` (1-based) of ``epoch``: where,
    and what is kept."""
    nb = parts.nbatches
    where = (f"at it {last}/{nb} of epoch {epoch}" if first >= last
             else f"within its {first}-{last}/{nb} of epoch {epoch}")
    saved_to = state.saved.path
    kept = (f"the checkpoint {saved_to} is kept" if saved_to
            else f"the checkpoint {parts.save_model} (from before this run) is kept"
            if parts.save_model and os.path.exists(parts.save_model)
            else f"nothing was saved to {parts.save_model}" if parts.save_model else "no checkpoint was written")
    return f"{what} {where}: training stopped; {kept}"


def _check_thresholds(parts: RunParts, cfg: TrainConfig, state: TrainState) -> None:
    """Stop the whole run once a test passes an MLPerf threshold (the reference's thresholds never
    fired, and its early stop would only have ended the epoch)."""
    if cfg.mlperf_acc_threshold > 0 and state.best.accuracy > cfg.mlperf_acc_threshold:
        parts.log(f"MLPerf testing accuracy threshold {cfg.mlperf_acc_threshold:f} reached, stop training")
        state.progress.stop = True
    if cfg.mlperf_auc_threshold > 0 and state.best.auc > cfg.mlperf_auc_threshold:
        parts.log(f"MLPerf testing auc threshold {cfg.mlperf_auc_threshold:f} reached, stop training")
        parts.mlperf.end("run_stop", status="success")
        state.progress.stop = True


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _test_batches(parts: RunParts, cfg: TrainConfig) -> Iterator[Batch]:
    """The test loader's batches; the first ``nbatches`` only when ``--num-batches`` is set, as the
    reference does (it limits testing by the training batch count, and fetches one batch more before it
    stops), unless fixing that."""
    limit = parts.nbatches if cfg.num_batches > 0 and not cfg.fix_reference_bugs else None
    for i, batch in enumerate(parts.test_loader):
        if limit is not None and i >= limit:
            return
        yield batch


def evaluate(parts: RunParts, cfg: TrainConfig, state: TrainState, global_step: int,
             epoch: int = 0) -> Dict[str, float]:
    """One pass over the test batches, after ``global_step`` steps in all; prints its line, updates
    ``state.best`` and returns the metrics plus ``is_best``."""
    try:
        correct, samples, scores, targets = _test_pass(parts, cfg)
        if cfg.mlperf_logging:
            return _mlperf_metrics(parts, scores, targets, state, global_step, epoch)
        return _accuracy_metrics(parts, correct, samples, state, global_step, epoch)
    except Interrupted as exc:
        raise exc.during("testing")


def _test_pass(parts: RunParts, cfg: TrainConfig):
    """The model's results over the test batches: (correct, samples) counts, or with
    ``--mlperf-logging`` the (scores, targets) arrays."""
    correct, samples, scores, targets = 0, 0, [], []
    parts.model.eval()
    with torch.no_grad(), _bar(parts, cfg, parts.nbatches_test, "test") as bar:
        for batch in _test_batches(parts, cfg):
            bar.update()
            if parts.info.world_size > 1 and batch.labels.shape[0] % parts.info.world_size:
                continue  # as in training: every rank needs rows of the batch
            batch = to_device(batch, parts.device)
            probs = predict(parts, batch, cfg.mixed_precision)
            labels = local_rows(batch.labels, parts.info)
            with record_function("DLRM accuracy compute"):
                if cfg.mlperf_logging:
                    scores.append(probs.detach().cpu().numpy())
                    targets.append(labels.detach().cpu().numpy())
                else:  # host synchronisation: the count is a Python int (the reference's too)
                    correct += int((torch.round(probs) == labels).sum().item())
                    samples += labels.shape[0]
    parts.model.train()
    return correct, samples, scores, targets


def evaluate_once(parts: RunParts, cfg: TrainConfig, state: TrainState) -> None:
    """``--inference-only``: one pass over the test batches, recorded like a test."""
    metrics = evaluate(parts, cfg, state, global_step=0)
    _write_test_record(parts, metrics, 0, 0)


def _write_test_record(parts: RunParts, metrics: Dict[str, float], global_step: int, epoch: int) -> None:
    """The metrics file's record of one test (main rank)."""
    if parts.metrics is not None and parts.info.is_main:
        parts.metrics.write(global_step, epoch, accuracy=metrics["accuracy"], auc=metrics.get("roc_auc"))


def _accuracy_metrics(parts: RunParts, correct: int, samples: int, state: TrainState, global_step: int,
                      epoch: int) -> Dict[str, float]:
    """The accuracy over all ranks' test rows, printed with the best so far."""
    correct, samples = (int(v) for v in all_reduce_sum([correct, samples], parts.info))
    acc = correct / max(samples, 1)
    is_best = state.best.update(acc, None, global_step, epoch)
    _scalar(parts.writer, "Test/Acc", acc, global_step)
    parts.log(format_accuracy_line(acc, state.best.accuracy))
    return {"accuracy": acc, "is_best": is_best}


def _mlperf_metrics(parts: RunParts, scores: list, targets: list, state: TrainState, global_step: int,
                    epoch: int) -> Dict[str, float]:
    """scikit-learn's metrics over all ranks' test rows, printed with the best so far."""
    scores = [x for part in gather_objects(scores, parts.info) for x in part]
    targets = [x for part in gather_objects(targets, parts.info) for x in part]
    if not all(np.isfinite(x).all() for x in scores):  # scikit-learn would fail in a traceback
        at_epoch, step = divmod(max(global_step - 1, 0), parts.nbatches)
        what = "the test predictions became nan"
        raise NonFiniteError(divergence_message(parts, state, what, step + 1, step + 1, at_epoch))
    metrics = sklearn_metrics(np.concatenate(scores).ravel(), np.concatenate(targets).ravel())
    is_best = state.best.update(metrics["accuracy"], metrics["roc_auc"], global_step, epoch)
    parts.log(format_mlperf_metrics_line(metrics, state.best.auc, state.best.accuracy))
    for name, value in metrics.items():
        _scalar(parts.writer, f"mlperf-metrics-test/{name}", value, global_step)
    return {**metrics, "is_best": is_best}


def sklearn_metrics(scores: np.ndarray, targets: np.ndarray) -> Dict[str, float]:
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
