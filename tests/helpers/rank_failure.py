"""Runs ``dlrm_s_pytorch.main`` with one rank failing mid-run (for the multi-process tests).

The rank given by ``DLRM_TEST_FAILING_RANK`` raises a DataError before its third training step, as a
rank-local problem (a bad file on one machine) would; the other ranks are then inside a collective.
"""
import os
import sys

import dlrm_s_pytorch
from dlrm.common import DataError
from dlrm.run import train as dlrm_train

FAILING = int(os.environ["DLRM_TEST_FAILING_RANK"])
real_step = dlrm_train.train_step


def failing_step(parts, cfg, batch, step):
    if parts.info.rank == FAILING and step == 2:
        raise DataError("a rank-local problem (injected by the test)")
    return real_step(parts, cfg, batch, step)


if __name__ == "__main__":
    dlrm_train.train_step = failing_step
    raise SystemExit(dlrm_s_pytorch.main(sys.argv[1:]))
