"""One preprocessing run at a time per directory: a second run waits for the first, then reuses
its files, so no run removes another's files in flight as stale.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Callable, Iterator, Optional

from dlrm.data.criteo.config import CriteoPaths, PreprocessConfig


LOCK_NAME = ".dlrm-preprocess.lock"


@contextlib.contextmanager
def preprocessing_lock(cfg: PreprocessConfig, paths: CriteoPaths,
                       log: Callable[[str], None]) -> Iterator[None]:
    """Hold the lock of every directory preprocessing writes in (the data directory, and the one
    of --processed-data-file), so that a second run waits for the first (one note) and then
    reuses what it made, instead of removing its files in flight as stale."""
    directories = {os.path.realpath(paths.d_path)}
    if cfg.processed_data_file and not cfg.memory_map:
        directories.add(os.path.realpath(os.path.dirname(os.path.abspath(cfg.processed_data_file))))
    with contextlib.ExitStack() as stack:
        for directory in sorted(directories):  # one order for every run: no deadlock
            stack.enter_context(_directory_lock(directory, log))
        yield


@contextlib.contextmanager
def _directory_lock(directory: str, log: Callable[[str], None]) -> Iterator[None]:
    """An exclusive ``flock`` on ``<directory>/.dlrm-preprocess.lock``, waited for with a note
    while another process holds it. The holder writes its pid there and removes the file when it
    is done, so nothing is left behind. Where no lock can be taken (a read-only directory, a file
    system without locks) the run goes on without one."""
    path = os.path.join(directory, LOCK_NAME)
    fd = _lock_file(path, directory, log)
    if fd is None:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # only for a waiter's note; the lock is what counts
            os.ftruncate(fd, 0)  # (a killed holder's pid may be there)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)  # while still locked: a waiter then finds its file gone, and retries
        os.close(fd)  # releases the lock


def _lock_file(path: str, directory: str, log: Callable[[str], None]) -> Optional[int]:
    """A descriptor of the lock file ``path``, locked (waiting with one note); None when there is
    none to lock. A file its holder removed while this run waited is not the lock any more: the
    run then locks the next one."""
    told = False
    while True:
        fd = _open_lock_file(path)
        if fd is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not told:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                log(f"note: another run is preprocessing in {directory}"
                    f"{f' (pid {holder})' if holder.isdigit() else ''}; waiting for it to finish")
                told = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks on this file system
            os.close(fd)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        mine, named = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)


def _open_lock_file(path: str) -> Optional[int]:
    """A descriptor of the lock file, created if need be (read-only where it cannot be written);
    None when there is none and it cannot be created."""
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            return os.open(path, flags | os.O_CLOEXEC, 0o666)
        except OSError:
            continue
    return None
