"""The reference's printed lines: one rank-aware printer and the pure formatters of each line.

Standard output carries the reference's lines only, each built by a ``format_*`` function; what this
version adds (warnings, notes, the summary) goes to standard error through the same :class:`Logger`.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, TextIO

import numpy as np
import torch
import torch.nn as nn

from dlrm.common import Batch
from dlrm.distributed import DistInfo
from dlrm.model.dlrm import ModelConfig, table_dims


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


def format_train_line(step: int, nbatches: int, epoch: int, ms_per_step: float, loss: float,
                      wall_time: Optional[str] = None, inference: bool = False) -> str:
    """``Finished training it 1/3 of epoch 0, -1.00 ms/it, loss 0.025266`` (``-1.00`` when the
    time is not measured, as in the reference)."""
    mode = "inference" if inference else "training"
    line = f"Finished {mode} it {step}/{nbatches} of epoch {epoch}, {ms_per_step:.2f} ms/it, loss {loss:.6f}"
    return line + (f" ({wall_time})" if wall_time else "")


def format_test_header(step: int, nbatches: int, epoch: int) -> str:
    """``Testing at - 2/3 of epoch 0,``."""
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


def format_batch(step: int, batch: Batch) -> List[str]:
    """The ``--debug-mode`` print of one batch: dense, bag lengths (T, B) int32, the per-table
    index tensors, and the targets."""
    counts = [len(batch.indices[t]) for t in range(batch.offsets.shape[0])]
    ends = torch.cat([batch.offsets[:, 1:], torch.tensor(counts, dtype=torch.long).view(-1, 1)], dim=1)
    lengths = (ends - batch.offsets).to(torch.int32)
    indices = [batch.indices[t] for t in range(len(counts))]
    return [f"mini-batch: {step}", str(batch.dense_x), str(lengths), str(indices), str(batch.labels)]


def format_parameters(model: nn.Module, precision: int) -> List[str]:
    """Every parameter as a NumPy array, in ``parameters()`` order (``--debug-mode``)."""
    with np.printoptions(precision=precision):
        return [str(p.detach().cpu().numpy()) for p in model.parameters()]
