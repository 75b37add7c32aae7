"""Small pieces shared by every part of the benchmark: the error types, the batch type and the
boolean-flag converter.

Dimension vocabulary used in docstrings across the project:
    B  samples in a mini-batch          T  embedding tables (sparse features)
    D  embedding dimension              N_t  indices of table t in a batch
    M  dense features (bottom-MLP input width)
"""
from __future__ import annotations

import math
import re
import signal
import stat
from typing import List, Mapping, NamedTuple, Optional, Union

import torch


class DLRMError(Exception):
    """Base class of the errors that ``main()`` reports as one line and a non-zero exit."""


class ConfigError(DLRMError, ValueError):
    """A flag value, or a combination of flags, that cannot work. The message names the flag."""


class FlagError(ConfigError):
    """A config value that cannot work, its fields named in braces: ``"{batch_size} must be at
    least 1, got 0"``. A command line names each field by its option (``--mini-batch-size``, see
    :func:`dlrm.cli.run_command`); elsewhere the field's name stands."""

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.message({}))

    def message(self, names: Mapping[str, str]) -> str:
        """The text, each ``{field}`` replaced by ``names[field]`` (by the field's name if absent)."""
        return re.sub(r"\{([a-z_][a-z0-9_]*)\}", lambda m: names.get(m.group(1), m.group(1)), self.template)


def check_number(field: str, value: float, lowest: Optional[float] = None) -> None:
    """Raise FlagError naming ``field`` when ``value`` is NaN or infinite, or below ``lowest`` (when
    given: the lowest a field that cannot be negative may take)."""
    if not math.isfinite(value):
        raise FlagError(f"{{{field}}} must be a finite number, got {value}")
    if lowest is not None and value < lowest:
        raise FlagError(f"{{{field}}} must not be negative, got {value:g}")


def check_at_least_one(values: Mapping[str, int]) -> None:
    """Raise FlagError naming the first field of ``values`` (field -> count) that is below 1."""
    for field, value in values.items():
        if value < 1:
            raise FlagError(f"{{{field}}} must be at least 1, got {value}")


class DataError(DLRMError, ValueError):
    """Input data that is missing, malformed or inconsistent. The message names the file (and line)."""


class WriteError(DataError, OSError):
    """A file that could not be written (a full disk, a read-only or vanished directory). The
    message names it. Raised by :func:`atomic_io.writing`; an ``OSError`` too, as what it reports."""


def first_line(exc: BaseException) -> str:
    """What an exception says, in one line: an ``OSError``'s ``strerror``, else the first line of
    its text, else its type's name."""
    text = getattr(exc, "strerror", None) or str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_NON_REGULAR_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                      (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                      (stat.S_ISSOCK, "a socket"))


def non_regular_kind(mode: int) -> Optional[str]:
    """What a file of ``st_mode`` ``mode`` is when it is not a regular file ("a directory", "a
    named pipe (FIFO)", ...); None for a regular file. (Opening a FIFO to read it would wait for
    a writer, so input files are checked before they are opened.)"""
    if stat.S_ISREG(mode):
        return None
    for test, kind in _NON_REGULAR_KINDS:
        if test(mode):
            return kind
    return "not a regular file"


class Interrupted(KeyboardInterrupt):
    """A signal (SIGTERM, SIGINT, SIGHUP) that stops the run, raised by ``interrupts.signals_raised``.

    A ``KeyboardInterrupt``, so no ``except Exception`` swallows it and clean-up written for
    Ctrl-C runs for every signal. The parts it passes through say where the run stood: the
    innermost sets :attr:`activity` (``during``), the training loop :attr:`position` (``at``),
    the run what its last checkpoint holds (``keeping``); :meth:`describe` makes one line of it.

    Attributes:
        signum: the signal's number; the exit code is 128 + signum.
        activity: what was running ("training", "testing", "saving the checkpoint m.pt", ...).
        position: where training stood ("iteration 7/100 of epoch 0").
        kept: what the interrupted run leaves for the next one.
        rank: this process's rank, in a multi-process run.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)
        self.activity: Optional[str] = None
        self.position: Optional[str] = None
        self.kept: Optional[str] = None
        self.rank: Optional[int] = None  # set in a multi-process run

    def during(self, activity: str) -> "Interrupted":
        if self.activity is None:
            self.activity = activity
        return self

    def at(self, position: str) -> "Interrupted":
        if self.position is None:
            self.position = position
        return self

    def keeping(self, kept: str) -> "Interrupted":
        if self.kept is None:
            self.kept = kept
        return self

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def describe(self) -> str:
        """``interrupted by SIGTERM while testing (iteration 4/8 of epoch 0); kept: ...``."""
        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        text = f"rank {self.rank}: " if self.rank is not None else ""
        text += f"interrupted by {name} while {self.activity or 'starting'}"
        if self.position:
            text += f" ({self.position})"
        return text + f"; kept: {self.kept or 'nothing written yet'}"


class CheckpointError(DLRMError, ValueError):
    """A checkpoint file that is missing, corrupt or holds something other than a DLRM checkpoint."""


class NonFiniteError(DLRMError, ArithmeticError):
    """A training loss or weights that became NaN or infinite. The message names where."""


class Batch(NamedTuple):
    """One mini-batch, as every loader yields it and the model takes it.

    Attributes:
        dense_x: (B, M) float32 dense features.
        offsets: (T, B) int64; ``offsets[t, b]`` is where bag b of table t starts in that table's
            indices (the reference's ``lS_o``).
        indices: either a (T, N) int64 tensor when every table has the same number of indices
            (Criteo: one index per bag), or a list of T 1-D int64 tensors of lengths N_t
            (random data; the reference's ``lS_i``).
        labels: (B, 1) float32 targets.
    """

    dense_x: torch.Tensor
    offsets: torch.Tensor
    indices: Union[torch.Tensor, List[torch.Tensor]]
    labels: torch.Tensor


_TRUE = {"true", "1", "yes", "y", "on", "t"}
_FALSE = {"false", "0", "no", "n", "off", "f"}


def parse_bool(text: str) -> bool:
    """Read a boolean flag value: true/false, 1/0, yes/no, on/off (any case).

    The reference used ``type=bool``, which reads "False" as true; this does not.
    Raises ValueError (which argparse turns into a usage error) for anything else.
    """
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"invalid boolean value {text!r} (use true/false, 1/0 or yes/no)")
