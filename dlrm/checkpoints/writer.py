"""One write at a time beside training: the asynchronous checkpoint writer's thread."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional, Tuple


class BackgroundWriter:
    """Runs one job at a time on its own thread: :meth:`submit` starts a job once the one before
    has finished, :meth:`finish` waits for the job in flight and gives its result.

    The thread is a daemon: a process stopped while a job runs does not wait for it (checkpoint
    files are written under temporary names, so a cut write leaves nothing under a real name).
    """

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._outcome: Tuple[Any, Optional[BaseException], float] = (None, None, 0.0)

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def submit(self, job: Callable[[], Any]) -> None:
        """Start ``job`` on the writer's thread (the caller has finished the job before)."""
        if self._thread is not None:
            raise RuntimeError("a write is in flight: finish it first")

        def run():
            started = time.perf_counter()
            try:
                self._outcome = (job(), None, time.perf_counter() - started)
            except BaseException as exc:  # handed to the training thread by finish()
                self._outcome = (None, exc, time.perf_counter() - started)

        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def finish(self) -> Tuple[Any, float]:
        """Wait for the job in flight; its result and the seconds it ran. Raises what it raised."""
        if self._thread is None:
            return None, 0.0
        self._thread.join()
        self._thread = None
        result, error, seconds = self._outcome
        self._outcome = (None, None, 0.0)
        if error is not None:
            raise error
        return result, seconds
