"""Worker processes for ``--dataset-multiprocessing``: started with the signals blocked, stopped
with their parent, killed (and their temporary files removed) on an error or a signal.
"""
from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Callable, List, Sequence, TypeVar

from dlrm.common import DataError
from dlrm.data.criteo.config import progress_bar
from dlrm.io import interrupts
from dlrm.io.atomic import remove_temps_of

T = TypeVar("T")
R = TypeVar("R")


def process_pool(jobs: int) -> concurrent.futures.ProcessPoolExecutor:
    """Worker processes that end when this process ends, however it ends (even SIGKILL), and
    leave SIGINT, SIGTERM and SIGHUP to it."""
    workers = max(1, min(jobs, os.cpu_count() or 1))
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker, initargs=(os.getpid(),))


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _start_worker(parent: int) -> None:
    """Pool worker set-up: ignore SIGINT, SIGTERM and SIGHUP (the parent handles them and stops
    the workers; they are blocked from the worker's start, see ``run_pool``) and die with the
    parent. On Linux the kernel kills the worker when the parent dies (prctl PR_SET_PDEATHSIG);
    elsewhere a thread watches for the parent to change."""
    interrupts.ignore_in_worker()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent:  # the parent died before the request took effect
                os._exit(1)
            return
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _stop_workers(pool: concurrent.futures.ProcessPoolExecutor, directories: Sequence[str]) -> None:
    """Kill the pool's workers now (on an error or a signal): shutting down would wait for the days
    they are working on. Then remove the temporary files they were writing in ``directories``
    (named with their process ids, so no other process's file is touched). The executor has no
    public call for this; its process table is used."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.kill()
    pool.shutdown(wait=True, cancel_futures=True)
    for directory in directories:
        remove_temps_of(directory, [process.pid for process in processes])


def run_pool(worker: Callable[[T], R], jobs: List[T], directories: Sequence[str], progress: bool,
             desc: str) -> List[R]:
    """``worker(job)`` for every job in worker processes, with a progress bar of days; results in
    job order. The jobs write their files in ``directories``."""
    if not jobs:
        return []
    with interrupts.held():  # the workers (and multiprocessing's tracker) start with the signals blocked
        pool = process_pool(len(jobs))
    try:
        with progress_bar(progress, len(jobs), desc, "days") as bar:
            with interrupts.held():
                futures = [pool.submit(worker, job) for job in jobs]
            for future in concurrent.futures.as_completed(futures):
                future.result()
                bar.update(1)
    except concurrent.futures.process.BrokenProcessPool:
        _stop_workers(pool, directories)
        raise DataError("a preprocessing worker process died (out of memory?); run without "
                        "--dataset-multiprocessing to use less memory") from None
    except BaseException:
        _stop_workers(pool, directories)
        raise
    pool.shutdown()
    return [future.result() for future in futures]
