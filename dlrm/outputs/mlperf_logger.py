"""MLPerf events for ``--mlperf-logging``, through the optional ``mlperf-logging`` package.

Without the package, :func:`make_mlperf_logger` returns a logger that does nothing and says so in
``missing_package`` (the caller warns once), so the scikit-learn metrics line still works. The events
and their order are the reference's; the log file is ``dlrm.log`` next to the front door
``dlrm_s_pytorch.py``, where the reference writes it.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

# where the reference writes: beside its scripts, the checkout's root (two folders above this one)
DEFAULT_LOG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "dlrm.log")
MISSING_PACKAGE_WARNING = ("warning: mlperf-logging is not installed, so no MLPerf events are written "
                           "(pip install mlperf-logging)")


class MLPerfLogger:
    """Thin wrapper over ``mlperf_logging.mllog``; every method is a no-op when disabled."""

    def __init__(self, mllog=None, rank: int = 0, missing_package: bool = False):
        self._mllog = mllog
        self.missing_package = missing_package
        self._log = mllog.get_mllogger() if mllog is not None else None
        self._keys = mllog.constants if mllog is not None else None
        self.rank = rank

    @property
    def enabled(self) -> bool:
        return self._log is not None and self.rank == 0

    def _key(self, name: str) -> str:
        return getattr(self._keys, name.upper(), name)

    def event(self, key: str, value=None, **metadata) -> None:
        if self.enabled:
            self._log.event(key=self._key(key), value=value, metadata=metadata or None, stack_offset=2)

    def start(self, key: str, value=None, **metadata) -> None:
        if self.enabled:
            self._log.start(key=self._key(key), value=value, metadata=metadata or None, stack_offset=2)

    def end(self, key: str, value=None, **metadata) -> None:
        if self.enabled:
            self._log.end(key=self._key(key), value=value, metadata=metadata or None, stack_offset=2)

    def submission_info(self, batch_size: int, seed: int, lr: float, warmup: int, decay_start: int,
                        decay_steps: int) -> None:
        """The run description events, as the reference logs them."""
        self.event("submission_benchmark", "dlrm")
        for key in ("submission_org", "submission_platform", "submission_poc_name", "submission_poc_email"):
            self.event(key, "reference_implementation")
        self.event("submission_division", "closed")
        self.event("submission_status", "onprem")
        self.event("seed", seed)
        self.event("global_batch_size", batch_size)
        self.event("opt_base_learning_rate", lr)
        self.event("opt_learning_rate_warmup_steps", warmup)
        self.event("sgd_opt_base_learning_rate", lr)
        self.event("lr_decay_start_steps", decay_start)
        self.event("sgd_opt_learning_rate_decay_steps", decay_steps)
        self.event("sgd_opt_learning_rate_decay_poly_power", 2)


def make_mlperf_logger(enabled: bool, rank: int = 0, log_file: Optional[str] = None) -> MLPerfLogger:
    """An MLPerf logger when ``enabled`` and the package is installed; otherwise a no-op one (with
    ``missing_package`` set when it was asked for)."""
    if not enabled:
        return MLPerfLogger()
    try:
        from mlperf_logging import mllog
    except ImportError:
        return MLPerfLogger(missing_package=True)
    path = log_file or DEFAULT_LOG_FILE
    _route_events(mllog, path)
    return MLPerfLogger(mllog, rank)


def _route_events(mllog, path: str) -> None:
    """Send this run's events to standard output and to ``path`` only.

    ``mllog.config(filename=...)`` adds a file handler to its shared logger at every call, and that
    logger keeps the ``sys.stdout`` of the moment it was imported; a second run in one process would
    write its events to the first run's file too. This run's handlers replace the last run's instead.
    """
    logger = logging.getLogger("dlrm.mlperf")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(path)):
        handler.setLevel(logging.INFO)
        logger.addHandler(handler)
    if mllog.get_mllogger().logger is not logger:
        mllog.config(logger=logger)
