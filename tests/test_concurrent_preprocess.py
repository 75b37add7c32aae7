"""Two runs preprocessing one directory at once, as real processes: the second waits for the
first (one note), never removes the first's files in flight, and then reuses what it made."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlrm.data.criteo import command
from dlrm.data.criteo.lock import LOCK_NAME
from helpers.criteo import fake_kaggle_fixture

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # every test here starts processes

# The first run: preprocessing that stops once its parsed day 3 is open under a temporary name,
# says so (a file "holding" in the control directory), and goes on when a file "go" appears there.
HOLDING_RUN = """
import os, sys, time
from dlrm.data.criteo import command
from dlrm.io import npz as npz_io
raw, control = sys.argv[1], sys.argv[2]
real_enter = npz_io.NpzStreamWriter.__enter__
def enter(self):
    writer = real_enter(self)
    if self.path.endswith("_day_3.npz"):
        open(os.path.join(control, "holding"), "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(control, "go")) and time.monotonic() < deadline:
            time.sleep(0.02)
    return writer
npz_io.NpzStreamWriter.__enter__ = enter
sys.exit(command.main([f"--raw-data-file={raw}", "--no-progress"]))
"""


def _start(argv, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True)


def _wait_for(condition, what: str, alive: subprocess.Popen, log: Path, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while not condition():
        if alive.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what}: did not happen (rc {alive.poll()}): {log.read_text()}")
        time.sleep(0.02)


raw_kaggle = fake_kaggle_fixture(700, seed=5)


def test_second_run_waits_for_the_first_and_reuses_its_files(tmp_path, raw_kaggle):
    data, control = tmp_path / "data", tmp_path / "control"
    data.mkdir()
    control.mkdir()
    raw = data / "train.txt"
    shutil.copy(raw_kaggle, raw)
    first = _start(["-c", HOLDING_RUN, str(raw), str(control)], tmp_path / "first.err")
    second = None
    try:
        _wait_for(lambda: (control / "holding").exists(), "the first run holding day 3", first,
                  tmp_path / "first.err")
        in_flight = sorted(data.glob("*.tmp*"))
        assert in_flight  # the first run's day 3 (and its processed twin) under temporary names
        second = _start([str(ROOT / "data_utils.py"), f"--raw-data-file={raw}", "--no-progress"],
                        tmp_path / "second.err")
        _wait_for(lambda: "waiting" in (tmp_path / "second.err").read_text(),
                  "the second run waiting", second, tmp_path / "second.err")
        assert sorted(data.glob("*.tmp*")) == in_flight  # nothing of the first run removed
        (control / "go").touch()
        assert first.wait(timeout=120) == 0, (tmp_path / "first.err").read_text()
        output = data / "kaggleAdDisplayChallenge_processed.npz"
        made = os.stat(output)
        assert second.wait(timeout=120) == 0, (tmp_path / "second.err").read_text()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert (tmp_path / "second.err").read_text() == (
        f"note: another run is preprocessing in {data} (pid {first.pid}); waiting for it to "
        "finish\n")  # and no note about redoing a stage: every file is reused
    assert second.stdout.read() == f"{output}\n" == first.stdout.read()
    again = os.stat(output)
    assert (again.st_ino, again.st_mtime_ns) == (made.st_ino, made.st_mtime_ns)
    assert not list(data.glob("*.tmp*")) and not (data / LOCK_NAME).exists()


def test_a_killed_holder_leaves_no_lock(tmp_path, raw_kaggle):
    """The kernel drops a killed run's lock; the next run takes the file over and removes it."""
    raw = tmp_path / "train.txt"
    shutil.copy(raw_kaggle, raw)
    (tmp_path / LOCK_NAME).write_text("4194305\n")  # left by a run killed with SIGKILL
    assert command.main([f"--raw-data-file={raw}", "--no-progress"]) == 0
    assert not (tmp_path / LOCK_NAME).exists()
