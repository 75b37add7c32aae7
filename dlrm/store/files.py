"""A run's table files on disk: one directory of its own, one preallocated float32 file per table
(and per table's optimizer state), read and written by rows.

The directory is a working copy, not a checkpoint. Every run makes a new one under
``--embedding-store-dir`` (``dlrm-store-<host>-<pid>-<ns>``, with a ``WORKING-COPY`` note saying
so), never opens one it did not make, and removes it when it closes unless asked to keep it. A
directory left by a run that died (its process is gone on this host) is removed at the next
start, with a warning. Files are preallocated (``posix_fallocate``), so a disk too small to hold
them is refused at once, not by a signal at the first write into a hole.
"""
from __future__ import annotations

import errno
import mmap
import os
import shutil
import socket
import time
from typing import Callable, Optional

import numpy as np
import torch

from dlrm.common import DLRMError

NOTE_NAME = "WORKING-COPY"
PREFIX = "dlrm-store-"


class StoreError(DLRMError, OSError):
    """The store directory or its files cannot be made, read or written (the message names the path)."""


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "not writable" if exc.errno != errno.EROFS else "a read-only file system"
    return exc.strerror or str(exc)


class StoreDir:
    """This run's own directory under ``parent``: created now, removed by :meth:`close` unless ``keep``.

    Raises:
        StoreError: ``parent`` cannot be created or written (one line naming it and why).
    """

    def __init__(self, parent: str, keep: bool = False, warn: Callable[[str], None] = lambda line: None):
        self.keep = keep
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"--embedding-store-dir={parent}: cannot create it: {_describe(exc)}") from None
        if not os.path.isdir(parent):
            raise StoreError(f"--embedding-store-dir={parent}: not a directory")
        _remove_stale(parent, warn)
        host = socket.gethostname().split(".")[0] or "host"
        self.path = os.path.join(parent, f"{PREFIX}{host}-{os.getpid()}-{time.time_ns()}")
        try:
            os.mkdir(self.path, 0o700)
            with open(os.path.join(self.path, NOTE_NAME), "w") as note:
                note.write(f"Embedding tables of the dlrm process {os.getpid()} on {host}, started "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}: a working copy, not a checkpoint. It is "
                           "removed when that run ends; if the run died, the next run removes it.\n")
        except OSError as exc:
            raise StoreError(f"--embedding-store-dir={parent}: cannot write there: {_describe(exc)}") from None

    def file(self, name: str, rows: int, width: int) -> "RowFile":
        return RowFile(os.path.join(self.path, name), rows, width)

    def close(self) -> None:
        """Remove the directory (unless kept)."""
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


def _remove_stale(parent: str, warn: Callable[[str], None]) -> None:
    """Remove the store directories under ``parent`` of runs on this host whose process is gone."""
    host = socket.gethostname().split(".")[0] or "host"
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not name.startswith(f"{PREFIX}{host}-") or not os.path.isfile(os.path.join(path, NOTE_NAME)):
            continue
        try:
            pid = int(name[len(PREFIX) + len(host) + 1:].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            warn(f"warning: removed {path}, the table store of a run that ended without closing it "
                 "(a working copy, never reused)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


LET_GO_PAGES = 4096
"""Pages of one file (16 MiB) that reads and writes may leave mapped before they are let go."""


class RowFile:
    """A (rows, width) float32 file, preallocated, read and written by row numbers.

    The file is mapped for random access (``MADV_RANDOM``: a row read does not read the blocks around
    it from the disk); once reads and writes have touched about LET_GO_PAGES pages, the mapped
    pages are let go (``MADV_DONTNEED``), so the rows read stay in the page cache, not in this
    process's resident memory (at most LET_GO_PAGES pages of each file are mapped at a time; a
    ``madvise`` over the whole mapping after every read cost more than the read).
    """

    def __init__(self, path: str, rows: int, width: int):
        self.path, self.rows, self.width = path, rows, width
        self.bytes_read = self.bytes_written = 0
        self.touched = 0  # pages (at most) mapped since the last let-go
        size = rows * width * 4
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if size:
                    os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StoreError(f"{path}: cannot make a {size / 2**30:.3g} GiB table file: {_describe(exc)}") from None
        self.array = np.memmap(path, dtype=np.float32, mode="r+", shape=(rows, width)) if size else \
            np.zeros((rows, width), dtype=np.float32)
        handle = getattr(self.array, "_mmap", None)
        if handle is not None and hasattr(mmap, "MADV_RANDOM"):
            handle.madvise(mmap.MADV_RANDOM)  # rows are read at random: no read-ahead of whole blocks

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """The rows ``rows`` (sorted row numbers), (len(rows), width), as a new tensor."""
        values = torch.from_numpy(self.array[rows])
        self.bytes_read += values.numel() * 4
        self._touch(len(rows))
        return values

    def write(self, rows: np.ndarray, values: torch.Tensor) -> None:
        """Write ``values`` (len(rows), width) into the rows ``rows``."""
        if len(rows):
            self.array[rows] = values.numpy()
            self.bytes_written += values.numel() * 4
            self._touch(len(rows))

    def fill(self, make_chunk: Callable[[int, int], torch.Tensor], chunk_rows: int) -> None:
        """Write the whole file in order, chunk by chunk: ``make_chunk(start, stop)`` gives the
        rows [start, stop)."""
        for start in range(0, self.rows, max(chunk_rows, 1)):
            stop = min(start + chunk_rows, self.rows)
            self.array[start:stop] = make_chunk(start, stop).numpy()
            self._let_go()

    def whole(self) -> torch.Tensor:
        """The whole file as a (rows, width) tensor over the mapping (no copy; reads page it in)."""
        return torch.from_numpy(self.array) if self.rows * self.width else torch.zeros(self.rows, self.width)

    def flush(self) -> None:
        if isinstance(self.array, np.memmap):
            self.array.flush()

    def _touch(self, rows: int) -> None:
        """Count the pages ``rows`` row accesses may have mapped; let them go past LET_GO_PAGES."""
        self.touched += rows * (1 + self.width * 4 // 4096)
        if self.touched >= LET_GO_PAGES:
            self._let_go()

    def _let_go(self) -> None:
        handle: Optional[mmap.mmap] = getattr(self.array, "_mmap", None)
        if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
            handle.madvise(mmap.MADV_DONTNEED)
        self.touched = 0


def free_bytes(path: str) -> int:
    """Bytes an unprivileged process may still write on the file system of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
