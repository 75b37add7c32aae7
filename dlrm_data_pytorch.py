"""Input data for the DLRM benchmark, and the reference's trace-profiling tool.

    python dlrm_data_pytorch.py --trace-file=./input/trace.log --dist-file=./input/dist.log \\
        --synthetic-file=./input/trace_synthetic.log

The random and synthetic batches live in :mod:`dlrm.data.random` (what they draw:
:mod:`dlrm.data.config`), the trace tool in :mod:`dlrm.data.synthetic_trace` and the Criteo loaders in
:mod:`dlrm.data.criteo`. Their names, and the reference's data functions (for code that imports this
module as ``dp``), are re-exported here.
"""
from __future__ import annotations

from typing import Optional, Sequence

from dlrm.data.config import RandomDataConfig, check_random_config as validate_random_config  # noqa: F401
from dlrm.data.random import (BatchLoader, RandomDataset, generate_random_batch,  # noqa: F401
                              make_random_data_and_loaders, worker_numpy_seed)

_REFERENCE_API = ("make_random_data_and_loader", "make_criteo_data_and_loaders", "collate_wrapper_random_offset",
                  "collate_wrapper_criteo_offset")
"""The reference's data functions, for code that imports this module as ``dp`` (see ``dlrm.reference_api``)."""


def __getattr__(name: str):
    """The reference's data functions, imported from ``dlrm.reference_api`` on first use (it imports
    the model, which the trace tool does not need)."""
    if name in _REFERENCE_API:
        from dlrm import reference_api

        return getattr(reference_api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The reference's trace-profiling tool (:func:`dlrm.data.synthetic_trace.trace_main`)."""
    from dlrm.data.synthetic_trace import trace_main

    return trace_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
