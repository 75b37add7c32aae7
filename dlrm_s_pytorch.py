"""DLRM: the Deep Learning Recommendation Model benchmark, on today's PyTorch.

A faithful re-implementation of the reference benchmark's command line, numbers and files, with
the bugs that crash it fixed, and the fixes that change numbers behind ``--fix-reference-bugs``.

    python dlrm_s_pytorch.py --mini-batch-size=2 --data-size=6        # a tiny run on random data
    python -m pytest -q                                               # the tests

This file is the front door: :func:`main` reads the flags (:mod:`dlrm.run.flags`), runs the
benchmark (:func:`dlrm.run.benchmark.run`, a table of contents of a run) and reports bad input in
one line. The code lives in the ``dlrm`` package; the model's names and the reference's model
class are re-exported here for code that imports this script.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Optional, Sequence

from dlrm.cli import run_command
from dlrm.common import DLRMError, Interrupted
# The model's names are re-exported for importers of this script (older code, notebooks).
from dlrm.distributed import announce_failure, current_info, is_collective_failure, peer_failure, shutdown_distributed
from dlrm.model.dlrm import (DLRM, LOSSES, CatInteraction, DotInteraction, ModelConfig, QuantizedTables,  # noqa: F401
                             draw_table, fit_to_data, make_loss, quantize_for_inference, skip_reference_torch_init,
                             table_bytes, top_mlp_input_width, with_per_table_layout)
from dlrm.reference_api import DLRM_Net  # noqa: F401  (the reference's model class, for code that imports it)
from dlrm.run.benchmark import run
from dlrm.run.flags import build_parser, config_from_args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; report what stops it in one line (:func:`dlrm.cli.run_command`)."""
    parser = build_parser()

    def body(signals) -> int:
        cfg = config_from_args(parser.parse_args(argv))
        try:
            run(cfg)
            shutdown_distributed()  # waits for every rank, so it can fail like any collective
        except BaseException as exc:
            signals.quiet()  # a signal now (torchrun stopping the others) must not replace this error
            raise _as_run_error(exc)
        return 0

    return run_command(body, parser)


def _as_run_error(exc: BaseException) -> BaseException:
    """In a multi-process run: a failing or interrupted rank tells the others (so they can name it)
    and leaves without waiting for them; a rank whose collective broke because another rank stopped
    says so in one line instead of a backend traceback."""
    info = current_info()
    if info.world_size > 1:
        if isinstance(exc, (DLRMError, Interrupted)):
            announce_failure(info)
        elif is_collective_failure(exc):
            exc = peer_failure(info, exc)
        if isinstance(exc, Interrupted):
            exc.rank = info.rank
    shutdown_distributed(wait=False)
    return exc


def exit_without_teardown(code: int) -> None:
    """End the process with ``code``, skipping the interpreter's teardown of torch's modules (1 to
    2 s on a 2-core machine, a tenth of a short benchmark run). By then ``run`` has closed every
    file, worker and process group it opened; atexit's handlers (logging's flush among them) and
    the streams' flushes still run. While another non-daemon thread is alive (or should Python drop
    ``atexit._run_exitfuncs``), exits normally."""
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # private: tests/test_private_apis.py
    if run_exit_handlers is None or any(t is not threading.main_thread() and not t.daemon
                                        for t in threading.enumerate()):
        raise SystemExit(code)
    run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
