"""Runs ``dlrm_s_pytorch.main`` as one rank of a run whose ranks were started differently (for the
rank-agreement tests, under torchrun).

Rank r appends the flags in ``DLRM_TEST_RANK<r>_ARGS`` (split on spaces) to the command line's, as
when the ranks of one run are started with different command lines. The rank named by
``DLRM_TEST_FAIL_AFTER_RUN`` raises a DataError once training is over, while the other ranks go on
to the final shutdown barrier.
"""
import os
import sys

import dlrm_s_pytorch
from dlrm.common import DataError
from dlrm.run import benchmark

RANK = int(os.environ.get("RANK", "0"))
real_finish = benchmark.finish


def failing_finish(*args, **kwargs):
    if str(RANK) == os.environ.get("DLRM_TEST_FAIL_AFTER_RUN"):
        raise DataError("a problem after the run (injected by the test)")
    return real_finish(*args, **kwargs)


if __name__ == "__main__":
    benchmark.finish = failing_finish
    extra = os.environ.get(f"DLRM_TEST_RANK{RANK}_ARGS", "").split()
    raise SystemExit(dlrm_s_pytorch.main(sys.argv[1:] + extra))
