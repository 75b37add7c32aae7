"""Signals that end a run through its normal error path, and a reader that went away.

``main()`` runs inside :func:`signals_raised`: SIGTERM, SIGINT and SIGHUP then raise
:class:`~dlrm_common.Interrupted` in the main thread, wherever it is, so every ``finally`` and
``atomic_io.atomic_path`` on the way out runs (no temporary file is left, worker processes are
stopped), the parts of the run that know where it stood add that to the exception, and ``main()``
reports one line and returns 128 + the signal number, the code a shell shows for a process killed
by that signal. A signal that was ignored when the context began (SIGHUP under ``nohup``, SIGINT
of a background job) stays ignored.

:func:`held` blocks the signals for a moment, for starting worker processes: a new process starts
with them blocked, and the worker ignores them before it unblocks (its parent stops it).

:func:`quiet_broken_pipe` is what a Unix tool does when its reader goes (``... | head``): stop
writing, say nothing, exit 128 + SIGPIPE.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

from dlrm.common import Interrupted

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
BROKEN_PIPE_EXIT = 128 + signal.SIGPIPE


class _RaiseOnce:
    """A signal handler that raises :class:`Interrupted` for the first signal and ignores the ones
    that come while the run unwinds (a second Ctrl-C must not cut a clean-up short)."""

    def __init__(self):
        self.received = None

    def __call__(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
            raise Interrupted(signum)

    def quiet(self) -> None:
        """Raise for no later signal (the run is already ending with an error of its own)."""
        if self.received is None:
            self.received = 0


@contextmanager
def signals_raised(signals: Sequence[int] = HANDLED) -> Iterator[_RaiseOnce]:
    """Within the block, the first of ``signals`` to come raises :class:`Interrupted` in the main
    thread; the previous handlers come back after it. Yields the handler, whose ``quiet()`` stops
    it raising. Outside the main thread, installs nothing."""
    handler = _RaiseOnce()
    if threading.current_thread() is not threading.main_thread():
        yield handler
        return
    previous = {}
    for signum in signals:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield handler
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


@contextmanager
def held(signals: Sequence[int] = HANDLED) -> Iterator[None]:
    """Block ``signals`` within the block (processes started in it inherit the mask); one that
    arrives meanwhile is delivered when the block ends."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def ignore_in_worker(signals: Sequence[int] = HANDLED) -> None:
    """In a worker process started under :func:`held`: ignore ``signals`` for good (its parent
    handles them and stops it), then unblock them."""
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def quiet_broken_pipe() -> int:
    """After standard output's reader went away: point it at /dev/null, so that no later write or
    the flush at exit fails again, and return the exit code for it (128 + SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return BROKEN_PIPE_EXIT
