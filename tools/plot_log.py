"""Training curves from the logs that ``dlrm_s_pytorch.py`` prints.

    python -m tools.plot_log run1.log run2.log -o curves.png --title "lr 0.1 vs 0.01"

The figure has one panel for the training loss and one for test accuracy, plus one for test AUC when
a log has it (``--mlperf-logging``); the x axis of each is the global iteration, ``N * epoch + j`` for
``it j/N of epoch epoch``. Several logs are overlaid, one colour each, labelled with the file name.

The log lines read (anything else in the file is skipped, so torchrun prefixes such as ``[rank0]:``,
warnings and MLPerf ``:::MLLOG`` lines do no harm)::

    Finished training it 2/20 of epoch 0, -1.00 ms/it, loss 0.102880 (12:34)
    Testing at - 5/20 of epoch 0,
     accuracy 45.000 %, best 45.000 %

or, with ``--mlperf-logging``, in place of the accuracy line (one line in the log)::

    recall 0.0000, precision 0.0000, f1 0.0000, ap 0.5805, auc 0.4495, best auc 0.4495,
    accuracy 45.000 %, best accuracy 45.000 %

A metrics line belongs to the ``Testing at`` line before it. Parsing (:func:`parse_log_lines`,
:func:`read_log`) is pure and separate from drawing (:func:`build_figure`).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from dlrm.io.atomic import atomic_path

_NUM = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf)"
_POSITION = r"it (\d+)/(\d+) of epoch (\d+)"
_TRAIN = re.compile(rf"Finished training {_POSITION}, {_NUM} ms/it, loss {_NUM}")
_TEST_HEADER = re.compile(r"Testing at - (\d+)/(\d+) of epoch (\d+),")
_ACCURACY = re.compile(rf"\baccuracy {_NUM} %, best {_NUM} %")
_MLPERF = re.compile(rf"recall {_NUM}, precision {_NUM}, f1 {_NUM}, ap {_NUM}, auc {_NUM}, best auc {_NUM}, "
                     rf"accuracy {_NUM} %, best accuracy {_NUM} %")


class LogError(ValueError):
    """A log that cannot be plotted: missing, unreadable, or without training lines."""


@dataclass(frozen=True)
class TrainPoint:
    """One ``Finished training`` line. ``ms_per_it`` is None where the run printed -1.00 (no
    ``--print-time``)."""

    iteration: int
    epoch: int
    loss: float
    ms_per_it: Optional[float]


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation: ``accuracy`` in percent as printed; ``auc`` only with ``--mlperf-logging``."""

    iteration: int
    epoch: int
    accuracy: float
    auc: Optional[float] = None


@dataclass(frozen=True)
class RunLog:
    """The curves of one log file; ``name`` labels it in the figure."""

    name: str
    train: Tuple[TrainPoint, ...]
    test: Tuple[EvalPoint, ...]


def global_iteration(step: int, nbatches: int, epoch: int) -> int:
    """Count ``it step/nbatches of epoch epoch`` from the start of the run."""
    return nbatches * epoch + step


def parse_log_lines(lines: Iterable[str], name: str = "") -> RunLog:
    """The training and test points of a log, in the order printed; other lines are ignored."""
    train: List[TrainPoint] = []
    test: List[EvalPoint] = []
    pending: Optional[Tuple[int, int]] = None  # (iteration, epoch) of a header still waiting for metrics
    for line in lines:
        m = _TRAIN.search(line)
        if m:
            step, nbatches, epoch, ms, loss = m.groups()
            ms_per_it = float(ms) if float(ms) >= 0 else None
            train.append(TrainPoint(global_iteration(int(step), int(nbatches), int(epoch)), int(epoch),
                                    float(loss), ms_per_it))
            continue
        m = _TEST_HEADER.search(line)
        if m:
            step, nbatches, epoch = (int(g) for g in m.groups())
            pending = (global_iteration(step, nbatches, epoch), epoch)
            line = line[m.end():]  # the metrics may follow on the same line
        point = _test_metrics(line, pending)
        if point is not None:
            test.append(point)
            pending = None
    return RunLog(name, tuple(train), tuple(test))


def _test_metrics(line: str, pending: Optional[Tuple[int, int]]) -> Optional[EvalPoint]:
    """The metrics on ``line`` as a point at ``pending``, or None (no metrics, or no header before)."""
    if pending is None:
        return None
    m = _MLPERF.search(line)
    if m:
        return EvalPoint(pending[0], pending[1], accuracy=float(m.group(7)), auc=float(m.group(5)))
    m = _ACCURACY.search(line)
    if m:
        return EvalPoint(pending[0], pending[1], accuracy=float(m.group(1)))
    return None


def read_log(path: str, name: Optional[str] = None) -> RunLog:
    """Parse the log at ``path``; raises LogError when it is missing or has no training lines."""
    try:
        # newline=None splits on '\r' as well, so progress-bar redraws end up on lines of their own
        with open(path, encoding="utf-8", errors="replace", newline=None) as f:
            run = parse_log_lines(f, name if name is not None else os.path.basename(path))
    except FileNotFoundError:
        raise LogError(f"{path}: no such file") from None
    except OSError as exc:
        raise LogError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not run.train:
        raise LogError(f"{path}: no training lines ('Finished training it j/N of epoch k, ...') in it")
    return run


def run_labels(paths: Sequence[str]) -> List[str]:
    """File names as labels; the paths as given where two logs share a file name."""
    names = [os.path.basename(p) for p in paths]
    return [p if names.count(n) > 1 else n for p, n in zip(paths, names)]


def build_figure(runs: Sequence[RunLog], title: Optional[str] = None):
    """A matplotlib Figure (Agg canvas, no pyplot state): loss, accuracy and, when any run has it, AUC
    against global iteration, one line per run and panel, each labelled with the run's name."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with_auc = any(p.auc is not None for run in runs for p in run.test)
    panels = 3 if with_auc else 2
    fig = Figure(figsize=(7, 2.6 * panels), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True)
    loss_ax, acc_ax = axes[0], axes[1]
    loss_ax.set_ylabel("training loss")
    acc_ax.set_ylabel("test accuracy (%)")
    for k, run in enumerate(runs):
        colour = f"C{k % 10}"
        loss_ax.plot([p.iteration for p in run.train], [p.loss for p in run.train], color=colour,
                     marker="o" if len(run.train) == 1 else None, markersize=3, label=run.name)
        if run.test:
            acc_ax.plot([p.iteration for p in run.test], [p.accuracy for p in run.test], color=colour,
                        marker="o", markersize=3, label=run.name)
        auc = [p for p in run.test if p.auc is not None]
        if auc:  # runs without --mlperf-logging stay out of the AUC panel and its legend
            axes[2].plot([p.iteration for p in auc], [p.auc for p in auc], color=colour, marker="o",
                         markersize=3, label=run.name)
    if with_auc:
        axes[2].set_ylabel("test AUC")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "nothing to plot", transform=ax.transAxes, ha="center", color="grey")
    axes[-1].set_xlabel("iteration (N × epoch + j)")
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig, path: str) -> None:
    """Write ``fig`` to ``path`` atomically; the format follows the extension (PNG when there is none)."""
    ext = os.path.splitext(path)[1]
    with atomic_path(path, suffix=ext) as tmp:
        fig.savefig(tmp, format=ext[1:].lower() or "png", dpi=120)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Plot training loss and test accuracy/AUC from dlrm logs.")
    p.add_argument("logs", nargs="+", metavar="LOG", help="log files printed by dlrm_s_pytorch.py")
    p.add_argument("-o", "--output", default="curves.png", help="image to write (default: curves.png)")
    p.add_argument("--title", default=None, help="figure title (default: none)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = [read_log(path, label) for path, label in zip(args.logs, run_labels(args.logs))]
        save_figure(build_figure(runs, args.title), args.output)
    except LogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {args.output}: cannot write it ({exc.strerror or exc})", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
