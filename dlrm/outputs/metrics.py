"""What a run reports besides the reference's log lines: a metrics file, a summary line, a progress bar.

* :class:`MetricsFile` writes one JSON object per line (JSON Lines) as the run goes, for plotting or
  comparing runs without parsing the log.
* :func:`format_summary` is the one ``summary:`` line printed at the end of a run.
* :func:`progress_bar` shows a tqdm bar on a terminal, and :meth:`ProgressBar.wrap` keeps the run's
  log lines intact above it.

None of these changes the reference's log lines; all are for the main rank only (the caller decides).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from tqdm import tqdm

from dlrm.common import ConfigError
from dlrm.io import interrupts
from dlrm.io.atomic import writing

METRICS_FIELDS = ("iteration", "epoch", "loss", "lr", "ms_per_it", "samples_per_s", "accuracy", "auc")


class MetricsFile:
    """A JSON Lines file of training and test metrics, one record per call of :meth:`write`.

    Every line has all of :data:`METRICS_FIELDS`, in that order; a value that was not measured, or
    that is NaN or infinite, is ``null`` (so every line is strict JSON). A training record and a test
    record (each one line in the file)::

        {"iteration": 2, "epoch": 0, "loss": 0.10288, "lr": 0.01, "ms_per_it": 3.5,
         "samples_per_s": 571.4, "accuracy": null, "auc": null}
        {"iteration": 5, "epoch": 0, "loss": null, "lr": null, "ms_per_it": null,
         "samples_per_s": null, "accuracy": 0.45, "auc": 0.4495}

    ``iteration`` is the global iteration (``N * epoch + j`` for ``it j/N of epoch epoch``), the x
    axis of ``tools/plot_log.py``. ``accuracy`` and ``auc`` are fractions in [0, 1] (the log prints
    accuracy in percent).

    The file is opened once, at construction, and each line is written whole as it comes (no
    buffer), so it can be followed (``tail -f``) and survives a crash up to the last record. A
    line that cannot be written whole (a full disk, a file-size limit) is cut off again, so the
    file never ends in half a line; the error is a one-line ``WriteError``, and closing afterwards
    raises nothing more. It is not written atomically: it is a stream, not a document. Construct
    it at start-up: a path that cannot be written raises ConfigError there, before any training.

    Args:
        path (str): the file; replaced if it exists, unless ``append``.
        append (bool, optional): add to an existing file (a resumed run). Default: ``False``
    """

    def __init__(self, path: str, append: bool = False):
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        try:
            self._fd = os.open(path, flags, 0o666)
        except OSError as exc:
            raise ConfigError(f"metrics file {path}: cannot create it ({exc.strerror or exc})") from None
        self._end = _end_of(self._fd)  # where the next line starts (None: not seekable, a pipe)

    def write(self, iteration: int, epoch: int, *, loss: Optional[float] = None, lr: Optional[float] = None,
              ms_per_it: Optional[float] = None, samples_per_s: Optional[float] = None,
              accuracy: Optional[float] = None, auc: Optional[float] = None) -> None:
        """Append one record, as one whole line."""
        if self._fd < 0:
            raise ValueError(f"metrics file {self.path}: write after close")
        values = (loss, lr, ms_per_it, samples_per_s, accuracy, auc)
        record = {"iteration": int(iteration), "epoch": int(epoch)}
        record.update(zip(METRICS_FIELDS[2:], (_finite_or_none(v) for v in values)))
        line = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
        with writing(self.path, label=f"metrics file {self.path}"):
            self._write_line(line)

    def _write_line(self, line: bytes) -> None:
        """Write ``line`` whole, or cut off what was written of it and raise the OSError."""
        done = 0
        try:
            while done < len(line):
                done += os.write(self._fd, line[done:])
        except OSError:
            if done and self._end is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._end)
                    os.lseek(self._fd, self._end, os.SEEK_SET)
            raise
        if self._end is not None:
            self._end += len(line)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with writing(self.path, label=f"metrics file {self.path}"):
                os.close(fd)

    def __enter__(self) -> "MetricsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _end_of(fd: int) -> Optional[int]:
    """The size of the open file ``fd``, or None for one that has none (a pipe, a terminal)."""
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError:
        return None


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class BestResult:
    """The best test result of a run and where it was reached.

    Attributes:
        metric (str): ``"accuracy"`` or ``"auc"`` (the run's target: AUC with ``--mlperf-logging``).
        value (float): a fraction in [0, 1] for both.
        iteration (int): global iteration, ``N * epoch + j``.
        epoch (int): the epoch, counted from 0 as in the log.
    """

    metric: str
    value: float
    iteration: int
    epoch: int


def format_summary(wall_time_s: float, train_samples: int, train_time_s: float,
                   best: Optional[BestResult] = None, checkpoint: Optional[str] = None,
                   store: Optional[str] = None) -> str:
    """The end-of-run line: one line starting with ``summary:``, four fields separated by ``, ``
    (wall time, training speed, best test result, checkpoint), e.g. (one line each)::

        summary: wall time 3723.4 s (1:02:03), training 12345.6 samples/s,
            best auc 0.8025 at iteration 12000 (epoch 0), checkpoint model.pt
        summary: wall time 2.1 s, training 1234.5 samples/s, no test, no checkpoint

    Args:
        wall_time_s (float): seconds from start to end of the run.
        train_samples (int): samples trained on (all epochs).
        train_time_s (float): seconds spent in training steps (test time excluded); samples/s is
            ``n/a`` when it is not positive.
        best (BestResult, optional): the best test result; ``no test`` when None. Default: ``None``
        checkpoint (str, optional): where the model was saved; ``no checkpoint`` when None.
            Default: ``None``
        store (str, optional): with tables in files, a fifth field: the cache's hit rate, the share
            of the other rows read ahead, and the bytes read and written (``table store: 93.1 % of
            rows from the cache, 97.0 % of the rest read ahead, read 1.2 GiB, wrote 409.6 MiB``).
    """
    wall = f"wall time {wall_time_s:.1f} s"
    if wall_time_s >= 60:
        minutes, seconds = divmod(int(wall_time_s), 60)
        wall += f" ({minutes // 60}:{minutes % 60:02d}:{seconds:02d})"
    speed = (f"training {train_samples / train_time_s:.1f} samples/s" if train_time_s > 0
             else "training n/a samples/s")
    saved = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint"
    return ", ".join(["summary: " + wall, speed, _format_best(best), saved] + ([store] if store else []))


def _format_best(best: Optional[BestResult]) -> str:
    if best is None:
        return "no test"
    if best.metric == "accuracy":
        value = f"{best.value * 100:.3f} %"  # as the log prints accuracy
    elif best.metric == "auc":
        value = f"{best.value:.4f}"
    else:
        raise ValueError(f"best metric {best.metric!r}: expected 'accuracy' or 'auc'")
    return f"best {best.metric} {value} at iteration {best.iteration} (epoch {best.epoch})"


class ProgressBar:
    """A tqdm bar on standard error, or nothing (``enabled`` False): the same calls either way.

    Use :meth:`wrap` on the run's printer while the bar is shown, so log lines print above the bar
    instead of through it; they stay byte-identical to what the printer writes without a bar.
    """

    def __init__(self, total: int, desc: str, enabled: bool):
        self._bar = (tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
                     if enabled else None)

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def wrap(self, log: Callable[..., None]) -> Callable[..., None]:
        """Wrap ``log`` so that its lines do not break the progress bar.

        That is ``log`` itself when the bar is off; otherwise ``log`` run inside tqdm's external write
        mode (what ``tqdm.write`` does: clear the bar, print, redraw), so the printer's own filtering
        (main rank only) and stream are kept and its bytes are unchanged."""
        if self._bar is None:
            return log

        def log_above_bar(*args, **kwargs) -> None:
            with interrupts.held(), tqdm.external_write_mode(file=sys.stdout):  # no signal inside tqdm's lock
                log(*args, **kwargs)

        return log_above_bar

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, desc: str, enabled: Optional[bool] = None) -> ProgressBar:
    """A :class:`ProgressBar` of ``total`` steps labelled ``desc``.

    Args:
        enabled (bool, optional): ``None`` shows the bar only when standard error, where it is
            drawn, is a terminal (a log captured to a file, CI, or a batch job gets none: no
            carriage-return redraws in it); ``True`` forces it on, ``False`` off. Default: ``None``
    """
    if enabled is None:
        enabled = stderr_is_terminal()
    return ProgressBar(total, desc, enabled)


def stderr_is_terminal() -> bool:
    """Whether standard error is a terminal: where progress bars are drawn, and only there (in a
    captured log a bar's redraws would make one long line of everything)."""
    return _is_terminal(sys.stderr)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
