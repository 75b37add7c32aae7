"""Training and evaluation: the train step, the epoch and evaluation loops, metrics, the logger
and the reference's log lines.

The loops take explicit parts (:class:`RunParts`) and the smallest config they need
(:class:`TrainConfig`); nothing here reads the command line. Every printed line comes from a pure
formatter (``format_*``) and goes through one rank-aware :class:`Logger`.

Dimension vocabulary: B batch (B_local: this rank's rows of it), T tables, M dense features.
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, TextIO

import numpy as np
import torch
import torch.nn as nn
from torch.profiler import record_function

from dlrm.common import Batch, ConfigError, Interrupted, NonFiniteError, check_at_least_one, check_number
from dlrm.distributed import DistInfo, all_reduce_sum, average_gradients, gather_objects, shard
from dlrm.io import interrupts
from dlrm.model.dlrm import ModelConfig, check_loss_weights, table_dims
from dlrm.optim.lr_schedule import check_schedule
from dlrm.outputs.metrics import BestResult, MetricsFile, progress_bar
from dlrm.outputs.mlperf_logger import MLPerfLogger
from dlrm.run.checkpoint import Position, Resume, checkpoint_payload, save_checkpoint

OPTIMIZERS = ("sgd", "adagrad", "rwsadagrad")

# ---------------------------------------------------------------------------------------------
# Output: one rank-aware printer and pure formatters of the reference's lines
# ---------------------------------------------------------------------------------------------


class Logger:
    """Prints on the main rank only, flushing every line.

    Standard output carries the reference's lines only; what this version adds (warnings, notes,
    the summary) goes to standard error, so a log of stdout compares line for line with the
    reference's. While a progress bar is shown (:meth:`above`), lines print above it, unchanged.

    Args:
        info: where this process stands (only rank 0 prints).
        stream: where lines go (default: ``sys.stdout`` at the time of printing).
        err_stream: where warnings and notes go (default: ``sys.stderr`` at the time of printing).
    """

    def __init__(self, info: DistInfo = DistInfo(), stream: Optional[TextIO] = None,
                 err_stream: Optional[TextIO] = None):
        self.enabled = info.is_main
        self.stream = stream
        self.err_stream = err_stream
        self._warned: set = set()
        self._emit: Callable[[str], None] = self._print

    def __call__(self, text: object = "") -> None:
        if self.enabled:
            self._emit(str(text))

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def note(self, text: str) -> None:
        """Print ``text`` on stderr (not one of the reference's lines)."""
        if self.enabled:
            print(text, file=self.err_stream or sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        """Print ``text`` on stderr the first time it is given (repeats are dropped)."""
        if text not in self._warned:
            self._warned.add(text)
            self.note(text)

    @contextmanager
    def above(self, bar) -> Iterator[None]:
        """While the block runs, print lines above ``bar`` (a ``run_metrics.ProgressBar``)."""
        self._emit = bar.wrap(self._print)
        try:
            yield
        finally:
            self._emit = self._print


def format_train_line(step: int, nbatches: int, epoch: int, ms_per_it: float, loss: float,
                      wall_time: Optional[str] = None, inference: bool = False) -> str:
    """``Finished training it 1/3 of epoch 0, -1.00 ms/it, loss 0.025266`` (``-1.00`` when the
    time is not measured, as in the reference)."""
    mode = "inference" if inference else "training"
    line = f"Finished {mode} it {step}/{nbatches} of epoch {epoch}, {ms_per_it:.2f} ms/it, loss {loss:.6f}"
    return line + (f" ({wall_time})" if wall_time else "")


def format_test_header(step: int, nbatches: int, epoch: int) -> str:
    return f"Testing at - {step}/{nbatches} of epoch {epoch},"


def format_accuracy_line(acc: float, best_acc: float) -> str:
    """`` accuracy 50.000 %, best 50.000 %`` (with the reference's leading space)."""
    return f" accuracy {acc * 100:3.3f} %, best {best_acc * 100:3.3f} %"


def format_mlperf_metrics_line(m: Dict[str, float], best_auc: float, best_acc: float) -> str:
    """The scikit-learn metrics line of ``--mlperf-logging``."""
    return (f"recall {m['recall']:.4f}, precision {m['precision']:.4f}, f1 {m['f1']:.4f}, "
            f"ap {m['ap']:.4f}, auc {m['roc_auc']:.4f}, best auc {best_auc:.4f}, "
            f"accuracy {m['accuracy'] * 100:3.3f} %, best accuracy {best_acc * 100:3.3f} %")


def format_arch(cfg: ModelConfig, dense_dim: int) -> List[str]:
    """The ``--debug-mode`` architecture block."""
    top, bot = np.array(cfg.top_mlp), np.array(cfg.bottom_mlp)
    dims = cfg.embedding_dim if not cfg.md_flag else table_dims(cfg)
    return [
        "model arch:",
        f"mlp top arch {top.size - 1} layers, with input to output dimensions:", str(top),
        "# of interactions", str(cfg.top_mlp[0]),
        f"mlp bot arch {bot.size - 1} layers, with input to output dimensions:", str(bot),
        "# of features (sparse and dense)", str(cfg.num_tables + 1),
        "dense feature size", str(dense_dim),
        "sparse feature size", str(dims),
        f"# of embeddings (= # of sparse features) {cfg.num_tables}, with dimensions {dims}x:",
        str(np.array(cfg.table_sizes)),
    ]


def format_batch(j: int, batch: Batch) -> List[str]:
    """The ``--debug-mode`` print of one batch: dense, bag lengths (T, B) int32, the per-table
    index tensors, and the targets."""
    counts = [len(batch.indices[t]) for t in range(batch.offsets.shape[0])]
    ends = torch.cat([batch.offsets[:, 1:], torch.tensor(counts, dtype=torch.long).view(-1, 1)], dim=1)
    lengths = (ends - batch.offsets).to(torch.int32)
    indices = [batch.indices[t] for t in range(len(counts))]
    return [f"mini-batch: {j}", str(batch.dense_x), str(lengths), str(indices), str(batch.labels)]


def format_parameters(model: nn.Module, precision: int) -> List[str]:
    """Every parameter as a NumPy array, in ``parameters()`` order (``--debug-mode``)."""
    with np.printoptions(precision=precision):
        return [str(p.detach().cpu().numpy()) for p in model.parameters()]


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


def make_optimizer(name: str, params: list, lr: float, fix_reference_bugs: bool = False) -> torch.optim.Optimizer:
    """sgd, adagrad or the row-wise sparse adagrad (which, unless ``fix_reference_bugs``, drops the
    accumulators of a loaded checkpoint at its first step, as the reference's does)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name == "rwsadagrad":
        from dlrm.optim.rwsadagrad import RWSAdagrad

        return RWSAdagrad(params, lr=lr, reference_reload=not fix_reference_bugs)
    raise ConfigError(f"--optimizer={name} is not supported (use {', '.join(OPTIMIZERS)})")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    from dlrm.optim.lr_schedule import LRPolicyScheduler

    return LRPolicyScheduler(optimizer, cfg.lr_num_warmup_steps, cfg.lr_decay_start_step, cfg.lr_num_decay_steps,
                             reference_plateau=not cfg.fix_reference_bugs)


# ---------------------------------------------------------------------------------------------
# Run parts and state
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """What the loops carry between batches and tests."""

    best_acc: float = 0.0
    best_auc: float = 0.0
    resume: Resume = Resume()
    stop: bool = False
    total_time: float = 0.0
    total_iter: int = 0
    total_samples: int = 0
    total_loss: Optional[torch.Tensor] = None
    first_batch: Optional[Batch] = None
    last_lr: Optional[float] = None
    trained_samples: int = 0
    trained_time: float = 0.0
    best: Optional[BestResult] = None
    saved_to: Optional[str] = None
    saved_at: Optional[str] = None
    iteration: int = 1  # the training iteration under way, counted from 1 as the log does
    last_loss: float = 0.0
    step_losses: List[tuple] = field(default_factory=list)  # (j, loss on the device) since the last print


@dataclass
class RunParts:
    """Everything the loops need, built once by the entry script. ``info`` is the one place that
    says where this process stands in a multi-process run."""

    model: nn.Module
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
    num_tables: int = 0
    metrics: Optional[MetricsFile] = None


def to_device(batch: Batch, device: torch.device) -> Batch:
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


def predict(parts: RunParts, batch: Batch, mixed_precision: str) -> torch.Tensor:
    """The model's (B_local, 1) predictions for this rank's rows, under bf16 autocast if asked."""
    dense_x = local_rows(batch.dense_x, parts.info)
    autocast = (torch.autocast(dense_x.device.type, dtype=torch.bfloat16) if mixed_precision == "bf16"
                else nullcontext())
    with autocast:
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


def _scalar(writer, tag: str, value: float, step: int) -> None:
    if writer is not None:
        with interrupts.held():  # a signal inside TensorBoard's queue would leave its thread unstoppable
            writer.add_scalar(tag, value, step)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _test_batches(parts: RunParts, cfg: TrainConfig):
    """The test loader's batches; the first ``nbatches`` only when ``--num-batches`` is set, as the
    reference does (it limits testing by the training batch count, and fetches one batch more before it
    stops), unless fixing that."""
    limit = parts.nbatches if cfg.num_batches > 0 and not cfg.fix_reference_bugs else None
    for i, batch in enumerate(parts.test_loader):
        if limit is not None and i >= limit:
            return
        yield batch


def evaluate(parts: RunParts, cfg: TrainConfig, state: TrainState, log_iter: int) -> Dict[str, float]:
    """One pass over the test batches. Updates ``state.best_acc``/``best_auc`` (the best so far, which
    the reference never kept) and returns the metrics plus ``is_best``."""
    try:
        correct, samples, scores, targets = _test_pass(parts, cfg)
        if cfg.mlperf_logging:
            return _mlperf_metrics(parts, scores, targets, state, log_iter)
        return _accuracy_metrics(parts, correct, samples, state, log_iter)
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
    metrics = evaluate(parts, cfg, state, log_iter=0)
    _record_test(parts, cfg, state, {**metrics, "is_best": True}, 0, 0)


def _accuracy_metrics(parts: RunParts, correct: int, samples: int, state: TrainState,
                      log_iter: int) -> Dict[str, float]:
    correct, samples = (int(v) for v in all_reduce_sum([correct, samples], parts.info))
    acc = correct / max(samples, 1)
    is_best = acc > state.best_acc
    state.best_acc = max(state.best_acc, acc)
    _scalar(parts.writer, "Test/Acc", acc, log_iter)
    parts.log(format_accuracy_line(acc, state.best_acc))
    return {"accuracy": acc, "is_best": is_best}


def _mlperf_metrics(parts: RunParts, scores: list, targets: list, state: TrainState,
                    log_iter: int) -> Dict[str, float]:
    scores = [x for part in gather_objects(scores, parts.info) for x in part]
    targets = [x for part in gather_objects(targets, parts.info) for x in part]
    if not all(np.isfinite(x).all() for x in scores):  # scikit-learn would fail in a traceback
        k, j = divmod(max(log_iter - 1, 0), parts.nbatches)
        raise NonFiniteError(divergence_message(parts, state, "the test predictions became nan", j + 1, j + 1, k))
    metrics = sklearn_metrics(np.concatenate(scores).ravel(), np.concatenate(targets).ravel())
    is_best = metrics["roc_auc"] > state.best_auc
    state.best_auc = max(state.best_auc, metrics["roc_auc"])
    state.best_acc = max(state.best_acc, metrics["accuracy"])
    parts.log(format_mlperf_metrics_line(metrics, state.best_auc, state.best_acc))
    for name, value in metrics.items():
        _scalar(parts.writer, f"mlperf-metrics-test/{name}", value, log_iter)
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


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _dense_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The data-parallel parameters (everything but the sharded tables and their learned pooling
    weights, whose owner computes their whole gradient)."""
    return [p for name, p in model.named_parameters() if not name.startswith(("emb_l.", "v_W_l."))]


def train_step(parts: RunParts, cfg: TrainConfig, batch: Batch, j: int) -> torch.Tensor:
    """Forward, loss, backward and (every ``grad_accum_iter`` batches under ``--mlperf-logging``) an
    optimizer step and a schedule step. Returns the loss, still on the device.

    With accumulation the reference zeroes the gradients right before the stepping batch's
    backward, so each step uses that batch's gradients alone; that is the default. With
    ``fix_reference_bugs`` the gradients of ``grad_accum_iter`` batches really accumulate (each
    loss scaled by 1/N) and are zeroed after the step.
    """
    accum = cfg.grad_accum_iter if cfg.mlperf_logging else 1
    stepping = (j + 1) % accum == 0
    with record_function("DLRM forward"):
        probs = predict(parts, batch, cfg.mixed_precision)
    with record_function("DLRM loss compute"):
        loss = parts.loss_fn(probs, local_rows(batch.labels, parts.info))
    reference_accum = accum > 1 and not cfg.fix_reference_bugs
    with record_function("DLRM backward"):
        if reference_accum and stepping:
            parts.optimizer.zero_grad(set_to_none=True)
        (loss / accum if accum > 1 and not reference_accum else loss).backward()
        if parts.info.world_size > 1:
            average_gradients(_dense_parameters(parts.model), parts.info)
    if stepping:
        parts.optimizer.step()
        parts.scheduler.step()
        if not reference_accum:
            parts.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _should_skip(state: TrainState, cfg: TrainConfig, j: int, k: int) -> bool:
    """Batches already trained before the checkpoint this run resumed from. The reference skips
    the saved batch count in every epoch from the saved one on (it hangs when that epoch is not the
    first); we do so when resuming from the first epoch, and otherwise, or with
    ``fix_reference_bugs``, only in the saved epoch."""
    resume = state.resume
    if j >= resume.batch or k < resume.epoch:
        return False
    return k == resume.epoch or (resume.epoch == 0 and not cfg.fix_reference_bugs)


def train_one_epoch(parts: RunParts, cfg: TrainConfig, state: TrainState, k: int) -> None:
    """One pass over the training loader. Losses are accumulated on the device; only the lines
    that print read them back."""
    with _bar(parts, cfg, parts.nbatches, f"epoch {k}") as bar:
        for j, batch in enumerate(parts.train_loader):
            if j >= parts.nbatches:
                break
            state.iteration = j + 1
            bar.update()
            if state.first_batch is None:
                state.first_batch = batch
            if _should_skip(state, cfg, j, k):
                continue
            if parts.info.world_size > 1 and batch.labels.shape[0] % parts.info.world_size:
                parts.log(f"Warning: Skiping the batch {j} with size {batch.labels.shape[0]}")
                continue
            _checked_step(parts, cfg, state, to_device(batch, parts.device), j, k)
            _report_and_test(parts, cfg, state, j, k)
            if state.stop:
                return


def _checked_step(parts: RunParts, cfg: TrainConfig, state: TrainState, batch: Batch, j: int, k: int) -> None:
    """:func:`_timed_step`, with BCE's refusal of NaN predictions (a traceback in the reference) as
    one line naming the iteration."""
    try:
        _timed_step(parts, cfg, state, batch, j)
    except RuntimeError as exc:
        if "should be between 0 and 1" not in str(exc):
            raise
        what = "the predictions became nan"
        raise NonFiniteError(divergence_message(parts, state, what, j + 1, j + 1, k)) from None


def _timed_step(parts: RunParts, cfg: TrainConfig, state: TrainState, batch: Batch, j: int) -> None:
    """One training step, its loss and time added to the running totals."""
    state.last_lr = parts.optimizer.param_groups[0]["lr"]  # the rate this step uses
    t1 = _sync(parts.device)
    loss = train_step(parts, cfg, batch, j)
    t2 = _sync(parts.device)
    if len(state.step_losses) < LOSS_WINDOW:  # read back only if the printed mean is not finite
        state.step_losses.append((j, loss))
    n = local_rows(batch.labels, parts.info).shape[0]
    state.total_loss = loss * n if state.total_loss is None else state.total_loss + loss * n
    state.total_time += t2 - t1
    state.total_iter += 1
    state.total_samples += n
    state.trained_time += t2 - t1
    state.trained_samples += n * parts.info.world_size


def _report_and_test(parts: RunParts, cfg: TrainConfig, state: TrainState, j: int, k: int) -> None:
    """Print the training line and, when due, test, save and check the MLPerf thresholds."""
    nb = parts.nbatches
    should_print = (j + 1) % cfg.print_freq == 0 or j + 1 == nb
    should_test = cfg.test_freq > 0 and ((j + 1) % cfg.test_freq == 0 or j + 1 == nb)
    if not (should_print or should_test):
        return
    log_iter = nb * k + j + 1
    measured_ms = 1000.0 * state.total_time / max(state.total_iter, 1)
    samples_per_s = state.total_samples * parts.info.world_size / state.total_time if state.total_time else None
    loss = _mean_loss(state, parts.info)  # host synchronisation: this line prints
    if not math.isfinite(loss):  # NaN stays NaN in the running sum, so checking here misses none
        first, last = _first_non_finite(state, j)
        raise NonFiniteError(divergence_message(parts, state, f"the training loss became {loss}", first, last, k))
    state.step_losses.clear()
    state.last_loss = loss
    state.total_time, state.total_iter, state.total_samples, state.total_loss = 0.0, 0, 0, None
    wall = time.strftime("%H:%M") if cfg.print_wall_time else None
    parts.log(format_train_line(j + 1, nb, k, measured_ms if cfg.print_time else -1.0, loss, wall))
    _scalar(parts.writer, "Train/Loss", loss, log_iter)
    _scalar(parts.writer, "Train/LR", state.last_lr, log_iter)
    if parts.metrics is not None and parts.info.is_main:
        parts.metrics.write(log_iter, k, loss=loss, lr=state.last_lr, ms_per_it=measured_ms,
                            samples_per_s=samples_per_s)
    if should_test:
        _test_and_save(parts, cfg, state, loss, j, k, log_iter)


def _test_and_save(parts: RunParts, cfg: TrainConfig, state: TrainState, loss: float, j: int, k: int,
                   log_iter: int) -> None:
    nb = parts.nbatches
    parts.log(format_test_header(j + 1, nb, k))
    parts.mlperf.start("eval_start", epoch_num=(j + 1) / nb + k + 1)
    metrics = evaluate(parts, cfg, state, log_iter)
    parts.mlperf.end("eval_stop", epoch_num=(j + 1) / nb + k + 1)
    _record_test(parts, cfg, state, metrics, log_iter, k)
    if parts.save_model and _saves_at(cfg, state, metrics):
        parts.log(f"Saving model to {parts.save_model}")
        save_position(parts, cfg, state, Position(
            nepochs=cfg.nepochs, nbatches=nb, nbatches_test=parts.nbatches_test, epoch=k, iter=j + 1,
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
    return metrics["accuracy"] > state.resume.best_acc


def _record_test(parts: RunParts, cfg: TrainConfig, state: TrainState, metrics: Dict[str, float], log_iter: int,
                 k: int) -> None:
    """The metrics file's test record, and where the best result so far was reached."""
    auc = metrics.get("roc_auc")
    if parts.metrics is not None and parts.info.is_main:
        parts.metrics.write(log_iter, k, accuracy=metrics["accuracy"], auc=auc)
    if metrics["is_best"] or state.best is None:
        target, value = ("auc", auc) if cfg.mlperf_logging else ("accuracy", metrics["accuracy"])
        if state.best is None or value > state.best.value:
            state.best = BestResult(target, float(value), log_iter, k)


def save_position(parts: RunParts, cfg: TrainConfig, state: TrainState, at: Position) -> None:
    """Write ``--save-model`` at ``at`` (every rank takes part: tables are gathered on rank 0)."""
    try:
        payload = checkpoint_payload(parts.model, parts.optimizer, cfg.optimizer, parts.scheduler,
                                     parts.num_tables, parts.info, at)
        if parts.info.is_main:
            save_checkpoint(parts.save_model, payload)
    except Interrupted as exc:
        raise exc.during(f"saving the checkpoint {parts.save_model}")
    state.saved_to = parts.save_model
    state.saved_at = f"iteration {at.iter}/{at.nbatches} of epoch {at.epoch}"


def kept_checkpoint(save_model: str, state: TrainState) -> str:
    """What a run stopped by a signal leaves of its model: the last checkpoint it wrote, and
    where training stood then (a checkpoint being written when the signal came is dropped)."""
    if not save_model:
        return "no checkpoint (no --save-model)"
    if state.saved_at is None:
        return f"no checkpoint written yet ({save_model} untouched)"
    return f"the checkpoint {save_model} of {state.saved_at}"


def save_final(parts: RunParts, cfg: TrainConfig, state: TrainState, epoch: int) -> None:
    """``--save-model`` without any test: the model at the end of the run (the reference saves only
    at tests, so such a run wrote nothing)."""
    parts.log.note(f"Saving the final model to {parts.save_model} (no test ran to choose a best one)")
    save_position(parts, cfg, state, Position(
        nepochs=cfg.nepochs, nbatches=parts.nbatches, nbatches_test=parts.nbatches_test, epoch=epoch,
        iter=parts.nbatches, train_loss=state.last_loss, test_acc=0.0))


def _mean_loss(state: TrainState, info: DistInfo) -> float:
    """The mean training loss since the last print; over all ranks' rows in a multi-process run."""
    if not state.total_samples:
        return 0.0
    if info.world_size == 1:  # float32 throughout, as the reference accumulates it
        return float((state.total_loss / state.total_samples).item())
    total, samples = all_reduce_sum([float(state.total_loss.item()), state.total_samples], info)
    return total / samples


LOSS_WINDOW = 4096
"""Steps whose losses are kept (device tensors, never read back unless the printed mean is NaN or
infinite) to name the first non-finite one exactly; past it the message names a range."""


def _first_non_finite(state: TrainState, j: int) -> tuple:
    """(first, last) 1-based iterations where the loss turned non-finite, among the steps since the
    last printed line: one step when this process kept it; else a range (past LOSS_WINDOW steps,
    or another rank's rows)."""
    steps = state.step_losses
    for step, loss in steps:
        if not math.isfinite(float(loss)):
            return step + 1, step + 1
    if not steps:
        return j + 1, j + 1
    return (steps[-1][0] + 2 if len(steps) >= LOSS_WINDOW else steps[0][0] + 1), j + 1


def divergence_message(parts: RunParts, state: TrainState, what: str, first: int, last: int, k: int) -> str:
    """``what`` became NaN or infinite in iterations ``first``..``last`` (1-based) of epoch ``k``:
    where, and what is kept."""
    nb = parts.nbatches
    where = f"at it {last}/{nb} of epoch {k}" if first >= last else f"within its {first}-{last}/{nb} of epoch {k}"
    kept = (f"the checkpoint {state.saved_to} is kept" if state.saved_to
            else f"the checkpoint {parts.save_model} (from before this run) is kept"
            if parts.save_model and os.path.exists(parts.save_model)
            else f"nothing was saved to {parts.save_model}" if parts.save_model else "no checkpoint was written")
    return f"{what} {where}: training stopped; {kept}"


def _check_thresholds(parts: RunParts, cfg: TrainConfig, state: TrainState) -> None:
    """Stop the whole run once a test passes an MLPerf threshold (the reference's thresholds never
    fired, and its early stop would only have ended the epoch)."""
    if cfg.mlperf_acc_threshold > 0 and state.best_acc > cfg.mlperf_acc_threshold:
        parts.log(f"MLPerf testing accuracy threshold {cfg.mlperf_acc_threshold:f} reached, stop training")
        state.stop = True
    if cfg.mlperf_auc_threshold > 0 and state.best_auc > cfg.mlperf_auc_threshold:
        parts.log(f"MLPerf testing auc threshold {cfg.mlperf_auc_threshold:f} reached, stop training")
        parts.mlperf.end("run_stop", status="success")
        state.stop = True


def train(parts: RunParts, cfg: TrainConfig, state: TrainState) -> None:
    """Every epoch from the resumed one on, until done or an MLPerf threshold stops the run; then,
    with ``--save-model`` and no test, the final model."""
    _train_epochs(parts, cfg, state)
    if parts.save_model and state.best is None and state.trained_samples:
        save_final(parts, cfg, state, cfg.nepochs - 1)


def _train_epochs(parts: RunParts, cfg: TrainConfig, state: TrainState) -> None:
    for k in range(state.resume.epoch, cfg.nepochs):
        parts.mlperf.start("block_start", first_epoch_num=k + 1, epoch_count=1)
        parts.mlperf.start("epoch_start", epoch_num=k + 1)
        try:
            train_one_epoch(parts, cfg, state, k)
        except Interrupted as exc:
            raise exc.during("training").at(f"iteration {state.iteration}/{parts.nbatches} of epoch {k}")
        parts.mlperf.end("epoch_stop", epoch_num=k + 1)
        parts.mlperf.end("block_stop", first_epoch_num=k + 1)
        if state.stop:
            return
    if cfg.mlperf_auc_threshold > 0:
        parts.mlperf.end("run_stop", status="aborted")
