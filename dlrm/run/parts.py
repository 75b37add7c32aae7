"""What the training loops are given and what they carry: :class:`RunParts`, built once and
frozen, and :class:`TrainState`, a few small records that change from step to step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Protocol, Tuple

import torch
import torch.nn as nn

from dlrm.common import Batch
from dlrm.distributed import DistInfo, all_reduce_sum
from dlrm.outputs.metrics import BestResult, MetricsFile
from dlrm.outputs.mlperf_logger import MLPerfLogger
from dlrm.run.checkpoint import Resume
from dlrm.run.log_lines import Logger


class ScalarWriter(Protocol):
    """Where the run's scalars go besides the log (TensorBoard's ``SummaryWriter``)."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: Optional[int] = None) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RunParts:
    """Everything the loops need, built once by the entry script. ``info`` is the one place that
    says where this process stands in a multi-process run.

    Attributes:
        optimizer, scheduler: None when the run only evaluates (``--inference-only``).
        train_loader, test_loader: iterables of :class:`Batch`; None where a caller runs steps by hand.
        nbatches, nbatches_test: the batches an epoch trains on and a test pass reads.
        writer: TensorBoard's writer on the main rank, when installed; else None.
        save_model: the ``--save-model`` path ("" for none).
        num_tables: T, for gathering the tables' optimizer state into a checkpoint.
        metrics: the ``--metrics-file`` on the main rank; else None.
        checkpoints: ``--checkpoint-every``'s writer; else None.
    """

    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: Optional[torch.optim.Optimizer]
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler]
    train_loader: Optional[Iterable[Batch]]
    test_loader: Optional[Iterable[Batch]]
    nbatches: int
    nbatches_test: int
    device: torch.device
    log: Logger
    writer: Optional[ScalarWriter] = None
    mlperf: MLPerfLogger = field(default_factory=MLPerfLogger)
    save_model: str = ""
    info: DistInfo = DistInfo()
    num_tables: int = 0
    metrics: Optional[MetricsFile] = None
    checkpoints: Optional[object] = None  # --checkpoint-every: a dlrm.checkpoints.periodic.PeriodicCheckpoints


LOSS_WINDOW = 4096
"""Steps whose losses are kept (device tensors, never read back unless the printed mean is NaN or
infinite) to name the first non-finite one exactly; past it the message names a range."""


@dataclass
class PrintWindow:
    """The steps since the last printed training line: their losses, time and rows.

    Attributes:
        loss_sum: the sum of each step's loss times its rows on this rank, still on the device.
        losses: (step, loss on the device) of the window's first ``LOSS_WINDOW`` steps.
        lr: the learning rate the latest step used.
    """

    loss_sum: Optional[torch.Tensor] = None
    seconds: float = 0.0
    steps: int = 0
    rows: int = 0
    losses: List[Tuple[int, torch.Tensor]] = field(default_factory=list)
    lr: Optional[float] = None

    def add(self, step: int, loss: torch.Tensor, rows: int, seconds: float, lr: float) -> None:
        """Count one step: its loss (still on the device), this rank's rows, its time and rate."""
        if len(self.losses) < LOSS_WINDOW:  # read back only if the printed mean is not finite
            self.losses.append((step, loss))
        self.loss_sum = loss * rows if self.loss_sum is None else self.loss_sum + loss * rows
        self.seconds += seconds
        self.steps += 1
        self.rows += rows
        self.lr = lr

    def mean_loss(self, info: DistInfo) -> float:
        """The window's mean loss per row; over all ranks' rows in a multi-process run."""
        if not self.rows:
            return 0.0
        if info.world_size == 1:  # float32 throughout, as the reference accumulates it
            return float((self.loss_sum / self.rows).item())
        total, rows = all_reduce_sum([float(self.loss_sum.item()), self.rows], info)
        return total / rows

    def first_non_finite(self, step: int) -> Tuple[int, int]:
        """(first, last) 1-based steps where the loss turned non-finite, up to ``step`` (0-based): one
        step when this process kept it; else a range (past LOSS_WINDOW steps, or another rank's rows)."""
        for kept_step, loss in self.losses:
            if not math.isfinite(float(loss)):
                return kept_step + 1, kept_step + 1
        if not self.losses:
            return step + 1, step + 1
        return (self.losses[-1][0] + 2 if len(self.losses) >= LOSS_WINDOW else self.losses[0][0] + 1), step + 1


@dataclass
class BestSoFar:
    """The best test results so far (starting from a loaded checkpoint's), and where this run's best
    was reached."""

    accuracy: float = 0.0
    auc: float = 0.0
    result: Optional[BestResult] = None

    def update(self, accuracy: float, auc: Optional[float], global_step: int, epoch: int) -> bool:
        """Take one test's results; returns whether it beats the best before it (by AUC when given).

        ``result`` is set at this run's first test, then moves only to a test that is a new best
        and better than ``result``.
        """
        is_best = auc > self.auc if auc is not None else accuracy > self.accuracy
        if auc is not None:
            self.auc = max(self.auc, auc)
        self.accuracy = max(self.accuracy, accuracy)
        target, value = ("auc", auc) if auc is not None else ("accuracy", accuracy)
        if self.result is None or (is_best and value > self.result.value):
            self.result = BestResult(target, float(value), global_step, epoch)
        return is_best


@dataclass
class Trained:
    """What the run has trained so far: rows (all ranks'), seconds in steps, the last printed loss."""

    samples: int = 0
    seconds: float = 0.0
    last_loss: float = 0.0


@dataclass(frozen=True)
class LastSave:
    """The last checkpoint this run wrote, and where training stood then (None: none yet)."""

    path: Optional[str] = None
    where: Optional[str] = None


@dataclass
class Progress:
    """Where training stands: the checkpoint it resumed from, the step under way in its epoch
    (from 0; the log counts from 1) and whether an MLPerf threshold stopped it."""

    resume: Resume = Resume()
    step: int = 0
    stop: bool = False


@dataclass
class TrainState:
    """What the loops carry between steps and tests, in small records; ``first_batch`` is the
    sample for the compute graph and ONNX export."""

    progress: Progress = field(default_factory=Progress)
    window: PrintWindow = field(default_factory=PrintWindow)
    best: BestSoFar = field(default_factory=BestSoFar)
    trained: Trained = field(default_factory=Trained)
    saved: LastSave = LastSave()
    first_batch: Optional[Batch] = None

    @classmethod
    def resuming(cls, resume: Resume) -> "TrainState":
        """The state of a run that continues from a loaded checkpoint."""
        return cls(progress=Progress(resume=resume), best=BestSoFar(resume.best_acc, resume.best_auc))

    def count_step(self, step: int, loss: torch.Tensor, rows: int, seconds: float, lr: float,
                   world_size: int) -> None:
        """Add one step (``rows`` on this rank) to the print window and the run's totals."""
        self.window.add(step, loss, rows, seconds, lr)
        self.trained.samples += rows * world_size
        self.trained.seconds += seconds
