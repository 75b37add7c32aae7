"""Writing files so that no reader ever sees half of one.

Every writer in the project goes through :func:`atomic_path`: it writes under a temporary name in
the target's own directory (``<target>.<pid>-<random>.tmp``, one naming scheme for every file), and
renames it over the target with ``os.replace`` only when the write completed. A crash, a full disk or
Ctrl-C leaves the target as it was, plus at most a ``*.tmp`` file that :func:`remove_stale_temps`
clears on the next run.

    with atomic_path("model.pt") as tmp:
        torch.save(payload, tmp)

Several files that must appear together are several ``atomic_path`` blocks in one
``contextlib.ExitStack``: each is renamed only if every write succeeded.
"""
from __future__ import annotations

import glob
import os
import re
import uuid
from contextlib import contextmanager
from typing import IO, Iterable, Iterator, List, Optional, Tuple, Type

from dlrm.common import WriteError, first_line

TEMP_SUFFIX = ".tmp"


def temp_name(path: str, suffix: str = "") -> str:
    """A fresh temporary name beside ``path``: ``<path>.<pid>-<random>.tmp<suffix>``.

    ``suffix`` serves writers that insist on an extension (``np.save`` appends ``.npy`` otherwise).
    """
    return f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}{suffix}"


@contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temporary name to write ``path`` under; rename it over ``path`` when the block ends
    without an exception, remove it otherwise. The parent directory must exist."""
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO]:
    """Open ``path`` through :func:`atomic_path`, so the file appears complete or not at all."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f


class RawFile:
    """A new file written through unbuffered ``os.write`` calls, for a writer that swallows the
    ``OSError`` of a failed write: it is kept in ``error``. (``torch.save`` into a file object
    reports a full disk or a file-size limit as "unexpected pos ...".) Use through
    :func:`raw_file`."""

    def __init__(self, fd: int):
        self.fd = fd
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        """Write all of ``data`` (a bytes-like object); return its length."""
        view = memoryview(data).cast("B")
        size = len(view)
        try:
            while len(view):
                view = view[os.write(self.fd, view):]
        except OSError as err:
            self.error = self.error or err
            raise
        return size

    def flush(self) -> None:
        """Nothing is buffered."""


@contextmanager
def raw_file(path: str) -> Iterator[RawFile]:
    """Create ``path`` as a :class:`RawFile`; when the block fails after a write failed, the
    write's ``OSError`` is raised instead of what the writer made of it."""
    sink = RawFile(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
    try:
        yield sink
    except Exception:
        if sink.error is not None:
            raise sink.error from None
        raise
    finally:
        os.close(sink.fd)


@contextmanager
def writing(path: str, label: str = "", what: str = "",
            errors: Tuple[Type[BaseException], ...] = (OSError,)) -> Iterator[None]:
    """Report an ``OSError`` (or one of ``errors``) raised in the block as a one-line
    :class:`WriteError`: ``"<label or path>: cannot write[ <what>] (<reason>)"``.

    Wrap only the writes themselves, so that a failure to read an input is not reported as one
    to write ``path``.
    """
    try:
        yield
    except errors as err:
        object_ = f" {what}" if what else ""
        raise WriteError(f"{label or path}: cannot write{object_} ({first_line(err)})") from None


def remove_stale_temps(path: str) -> List[str]:
    """Remove the temporary files that an interrupted writer of ``path`` left behind; returns them.

    Only names of this module's scheme are touched (``<path>.<pid>-<hex>.tmp...``), and only those
    whose writer (the ``<pid>`` of the name) is no running process: a file that another live
    process (or this one) is writing is never removed. (A writer in another PID namespace, on a
    shared file system, is not seen: call this where one run owns the files, under a lock.)
    """
    removed = []
    prefix = glob.escape(path) + "."
    for name in glob.glob(prefix + "*-*" + TEMP_SUFFIX + "*"):
        if _writer_alive(name[len(path) + 1:].split("-", 1)[0]):
            continue
        try:
            os.remove(name)
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed


def _writer_alive(pid_text: str) -> bool:
    """Whether the process ``pid_text`` (the pid part of a temporary name) is running."""
    try:
        pid = int(pid_text)
        if pid <= 0:
            return False
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except (ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def remove_temps_of(directory: str, pids: Iterable[int]) -> List[str]:
    """Remove the temporary files in ``directory`` that the processes ``pids`` were writing (they
    must have ended: worker processes stopped mid-write); returns them. Other names are kept."""
    wanted = {str(pid) for pid in pids}
    pattern = re.compile(r"\.(\d+)-[0-9a-f]{8}" + re.escape(TEMP_SUFFIX))
    removed = []
    for name in os.listdir(directory) if wanted else ():
        found = pattern.search(name)
        if found and found.group(1) in wanted:
            try:
                os.remove(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            removed.append(os.path.join(directory, name))
    return removed
