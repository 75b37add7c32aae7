"""A full disk or a file-size limit while writing: the reason is the system's ("No space left on
device", "File too large"), in one line, and no file is left half-written.

A file-size limit is real here: the run is a subprocess whose RLIMIT_FSIZE is set before it
starts (Python ignores SIGXFSZ, so a write past the limit fails with EFBIG, after a short write
that stops at the limit). A full disk is /dev/full, where the file can be written there, or a
subprocess whose ``os.write`` fails with ENOSPC past a number of bytes.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlrm.common import WriteError
from dlrm.outputs.metrics import MetricsFile

ROOT = Path(__file__).resolve().parents[1]


def _limited(max_bytes: int):
    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return set_limit


def run_python(code: str, cwd: Path, max_bytes: int = 0, *argv: str) -> subprocess.CompletedProcess:
    """Run ``code`` (or, with argv, a script) in a fresh interpreter in ``cwd``, its files limited
    to ``max_bytes`` when given."""
    command = [sys.executable, *argv] if argv else [sys.executable, "-c", code]
    # no bytecode: the interpreter writes a .pyc with one unchecked write, which a limit cuts short
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limited(max_bytes) if max_bytes else None)


SAVE = """
import sys, torch
from dlrm.run.checkpoint import save_checkpoint
from dlrm.common import DLRMError
{setup}
try:
    save_checkpoint("model.pt", {{"w": torch.arange(100000, dtype=torch.float32)}})
except DLRMError as exc:
    print(exc)
"""

ENOSPC_PAST_4096 = """
import errno, os
real_write, written = os.write, [0]
def write(fd, data):
    if written[0] + len(data) > 4096:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    written[0] += len(data)
    return real_write(fd, data)
os.write = write
"""


@pytest.mark.parametrize("setup, max_bytes, reason", [
    ("", 20000, "File too large"),
    (ENOSPC_PAST_4096, 0, "No space left on device"),
], ids=["file-size-limit", "full-disk"])
@pytest.mark.slow
def test_checkpoint_save_names_the_reason_and_keeps_the_old_file(tmp_path, setup, max_bytes,
                                                                 reason):
    """Not torch's "unexpected pos 28352 vs 28240"; the earlier checkpoint stays, no temporary."""
    torch.save({"w": torch.ones(3)}, tmp_path / "model.pt")
    result = run_python(SAVE.format(setup=setup), tmp_path, max_bytes)
    assert result.stdout == f"model.pt: cannot write the checkpoint ({reason})\n", result.stderr
    assert os.listdir(tmp_path) == ["model.pt"]
    assert torch.equal(torch.load(tmp_path / "model.pt")["w"], torch.ones(3))


WRITE_METRICS = """
from dlrm.common import WriteError
from dlrm.outputs.metrics import MetricsFile
metrics = MetricsFile("m.jsonl")
try:
    for k in range(1000):
        metrics.write(k, 0, loss=0.5, lr=0.1, ms_per_it=1.25, samples_per_s=1000.0)
except WriteError as exc:
    print(exc)
metrics.close()
"""


@pytest.mark.slow
def test_metrics_file_over_the_size_limit_ends_in_a_whole_line(tmp_path):
    result = run_python(WRITE_METRICS, tmp_path, 1000)
    assert result.stdout == "metrics file m.jsonl: cannot write (File too large)\n", result.stderr
    assert result.stderr == ""
    text = (tmp_path / "m.jsonl").read_text()
    line_bytes = len(text.splitlines()[0]) + 1
    assert text.endswith("\n") and len(text) == (1000 // line_bytes) * line_bytes
    assert [json.loads(line)["iteration"] for line in text.splitlines()] == list(range(1000 // line_bytes))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_metrics_file_on_a_full_disk_is_one_error_and_closes_quietly():
    metrics = MetricsFile("/dev/full")
    with pytest.raises(WriteError, match=r"^metrics file /dev/full: cannot write \(No space left "
                                         r"on device\)$"):
        metrics.write(1, 0, loss=0.5)
    metrics.close()  # the close path raises nothing more (it used to flush the failed line again)


TINY_RUN = ["--arch-sparse-feature-size=2", "--arch-embedding-size=4-3-2", "--arch-mlp-bot=4-3-2",
            "--arch-mlp-top=8-4-2-1", "--num-batches=4", "--print-freq=1"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_run_with_metrics_on_a_full_disk_ends_in_one_error_line(run_main, tmp_path):
    code, _, err = run_main(*TINY_RUN, "--metrics-file=/dev/full",
                            f"--tensor-board-filename={tmp_path / 'tb'}")
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == "error: metrics file /dev/full: cannot write (No space left on device)"
    assert err.count("error:") == 1


@pytest.mark.slow
def test_run_over_the_size_limit_saving_its_model_ends_in_one_error_line(tmp_path):
    result = run_python("", tmp_path, 3000, str(ROOT / "dlrm_s_pytorch.py"), *TINY_RUN,
                        "--num-batches=4", f"--save-model={tmp_path / 'model.pt'}",
                        f"--tensor-board-filename={tmp_path / 'tb'}",
                        f"--metrics-file={tmp_path / 'm.jsonl'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (f"error: {tmp_path / 'model.pt'}: cannot write the "
                                              "checkpoint (File too large)")
    assert sorted(os.listdir(tmp_path)) == ["m.jsonl", "tb"]
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 4
