"""Shared builders for the tests, and the fixture that keeps every test to itself.

Every test runs in a fresh temporary directory of its own (so run outputs with default relative
names, TensorBoard folders, profiler files, graphs, land there and vanish), and leaves torch's,
NumPy's and Python's random generators, torch's thread count and sparse-invariant checking as it
found them. At the end of the session the checkout is checked: a test that wrote into it fails the
run, naming the file.
"""
import os
import random
import subprocess

import numpy as np
import pytest
import torch

import dlrm_s_pytorch
from dlrm.outputs import mlperf_logger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWED_LEFTOVERS = ("__pycache__/", ".pytest_cache/")


@pytest.fixture(autouse=True)
def isolated_test(tmp_path_factory, monkeypatch):
    """Run the test in its own working directory; restore the global state it may change."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    monkeypatch.setattr(mlperf_logger, "DEFAULT_LOG_FILE", "dlrm.log")  # in that directory, not the checkout
    torch_rng, numpy_rng, python_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    threads = torch.get_num_threads()
    sparse_checks = torch.sparse.check_sparse_tensor_invariants.is_enabled()
    yield
    torch.set_rng_state(torch_rng)
    np.random.set_state(numpy_rng)
    random.setstate(python_rng)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if sparse_checks:
        torch.sparse.check_sparse_tensor_invariants.enable()
    else:
        torch.sparse.check_sparse_tensor_invariants.disable()


def _untracked_in_checkout():
    """Paths git reports as untracked or ignored in the checkout (None outside a git checkout)."""
    try:
        proc = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return {line[3:] for line in proc.stdout.splitlines() if line[:2] in ("??", "!!")}


def pytest_sessionstart(session):
    session.config._leftovers_before = _untracked_in_checkout()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if the tests left a file in the checkout that was not there before."""
    before = getattr(session.config, "_leftovers_before", None)
    after = _untracked_in_checkout()
    if before is None or after is None:
        return
    new = sorted(p for p in after - before if not any(part in p for part in ALLOWED_LEFTOVERS))
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "tests left files in the checkout: " + ", ".join(new[:10])
        if reporter is not None:
            reporter.write_line("error: " + message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def run_main(capsys):
    """Run ``dlrm_s_pytorch.main(argv)`` in-process; returns (exit code, stdout, stderr)."""

    def _run(*argv):
        code = dlrm_s_pytorch.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return _run


@pytest.fixture
def rng():
    return np.random.RandomState(123)
