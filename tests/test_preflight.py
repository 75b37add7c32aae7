"""The memory check before training (dlrm/run/preflight.py): the estimate, and tables that cannot fit
refused in seconds."""
import os
import re
import subprocess
import sys
import time

import pytest

from helpers.runs import ROOT


@pytest.mark.slow
def test_tables_that_cannot_fit_are_refused_in_seconds_and_little_memory():
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", "import resource, sys, dlrm_s_pytorch; "
                           "code = dlrm_s_pytorch.main(sys.argv[1:]); "
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)",
                           "--arch-embedding-size=2000000000-2000000000-3", "--mini-batch-size=2", "--data-size=4"],
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
    elapsed = time.time() - start
    assert proc.returncode == 2
    error, peak_kib = proc.stderr.splitlines()[0], int(proc.stderr.splitlines()[-1])
    assert re.match(r"error: this run needs about 29\.8 GiB \(tables 29\.8 GiB, .*\) but only \d+\.\d [GM]iB of "
                    r"memory available", error), error
    assert elapsed < 60 and peak_kib < 2 * 1024 * 1024  # refused before anything big was allocated


def test_memory_estimate_counts_tables_state_mlps_and_a_batch():
    from dlrm.model.dlrm import ModelConfig
    from dlrm.run.preflight import BatchShape, estimate_bytes

    cfg = ModelConfig(embedding_dim=4, table_sizes=(1000, 10), bottom_mlp=(3, 4), top_mlp=(7, 1))
    parts = estimate_bytes(cfg, "adagrad", BatchShape(batch_size=8, bag=2, test_batch_size=8))
    assert parts["tables"] == 1010 * 4 * 4
    assert parts["MLPs"] == (3 * 4 + 4 + 7 * 1 + 1) * 4
    assert parts["optimizer state"] == parts["tables"] + parts["MLPs"]
    assert estimate_bytes(cfg, "sgd", BatchShape(8, 2, 8))["optimizer state"] == 0
    assert estimate_bytes(cfg, "rwsadagrad", BatchShape(8, 2, 8))["optimizer state"] == (1010 + 24) * 4
