"""Small pieces shared by every part of the benchmark: the error types, the batch type and the
boolean-flag converter.

Dimension vocabulary used in docstrings across the project:
    B  samples in a mini-batch          T  embedding tables (sparse features)
    D  embedding dimension              N_t  indices of table t in a batch
    M  dense features (bottom-MLP input width)
"""
from __future__ import annotations

import stat
from typing import List, NamedTuple, Optional, Union

import torch


class DLRMError(Exception):
    """Base class of the errors that ``main()`` reports as one line and a non-zero exit."""


class ConfigError(DLRMError, ValueError):
    """A flag value, or a combination of flags, that cannot work. The message names the flag."""


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
