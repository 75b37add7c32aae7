"""Signals end a run cleanly: real processes get SIGTERM, SIGINT or SIGHUP while they train, test,
save a checkpoint or preprocess, and each ends with one line saying where it stood and what is kept,
exit code 128 + the signal, no temporary file and no warning. Also: a closed pipe on standard
output ends a run quietly, and a captured log holds no progress-bar redraws."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
from dlrm.run.checkpoint import load_checkpoint
from helpers.criteo import fake_kaggle
from helpers.ports import free_port

SMALL = ["--mini-batch-size=2", "--data-size=20000", "--arch-embedding-size=40-30-20", "--print-freq=1",
         "--round-targets=true"]


class Run:
    """A real ``python dlrm_s_pytorch.py`` (or the pausing driver) whose stdout is read line by line."""

    def __init__(self, args, cwd: Path, pause: str = "", pause_count: int = 1, torchrun: int = 0,
                 reader: bool = True):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        script = str(ROOT / "dlrm_s_pytorch.py")
        if pause:
            env.update(DLRM_TEST_PAUSE=pause, DLRM_TEST_PAUSE_COUNT=str(pause_count))
            script = str(ROOT / "tests" / "helpers" / "signal_pause.py")
        launcher = [sys.executable]
        if torchrun:
            launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "--master_addr=127.0.0.1",
                         f"--master_port={free_port()}"]
        self.proc = subprocess.Popen(launcher + [script, *args, f"--tensor-board-filename={cwd / 'tb'}"], cwd=cwd,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.out: list = []
        if reader:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, marker: str, timeout: float = 180) -> None:
        """Read stdout until a line holds ``marker`` (the run's readiness, not a fixed sleep)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            if line is None:
                raise AssertionError(f"ended before {marker!r}: {self.proc.stderr.read()}")
            self.out.append(line)
            if marker in line:
                return

    def stop(self, signum: int, group: bool = False):
        """Send ``signum`` (to the whole process group, as a terminal does, with ``group``);
        return (exit code, stderr)."""
        if group:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)
        try:
            err = self.proc.stderr.read()
            return self.proc.wait(timeout=120), err
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)


def assert_one_line_end(code: int, err: str, signum: int, tmp_path: Path, pattern: str) -> str:
    """Exit 128 + signum; the one ``error:`` line is stderr's last and matches ``pattern``; no
    traceback, warning or temporary file. Returns the line."""
    assert code == 128 + signum, err
    errors = re.findall(r"^error: .*$", err, re.M)
    assert len(errors) == 1 and err.rstrip("\n").splitlines()[-1] == errors[0], err
    name = signal.Signals(signum).name
    assert re.fullmatch(rf"error: interrupted by {name} while {pattern}", errors[0]), errors[0]
    for noise in ("Traceback", "Warning", "warning", "leaked", "\r"):
        assert noise not in err, err
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_during_training(tmp_path, signum):
    run = Run(SMALL + ["--progress", "--metrics-file=m.jsonl"], tmp_path)
    run.wait_for("Finished training it 3/")
    code, err = run.stop(signum)
    line = assert_one_line_end(code, err, signum, tmp_path, r"training \(iteration (\d+)/10000 of epoch 0\); "
                               r"kept: no checkpoint \(no --save-model\)")
    assert int(re.search(r"iteration (\d+)/", line).group(1)) >= 3


@pytest.mark.slow
def test_a_signal_during_a_test_pass_keeps_the_last_checkpoint(tmp_path):
    run = Run(SMALL + ["--test-freq=2", "--save-model=c.pt"], tmp_path, pause="test", pause_count=2)
    run.wait_for("PAUSED test")
    code, err = run.stop(signal.SIGTERM)
    assert_one_line_end(code, err, signal.SIGTERM, tmp_path, r"testing \(iteration 4/10000 of epoch 0\); "
                        r"kept: the checkpoint c.pt of iteration 2/10000 of epoch 0")
    assert load_checkpoint(str(tmp_path / "c.pt"))["iter"] == 2


@pytest.mark.slow
def test_a_signal_during_a_checkpoint_save_leaves_no_temporary_file(tmp_path):
    run = Run(SMALL + ["--test-freq=2", "--save-model=c.pt"], tmp_path, pause="save")
    run.wait_for("PAUSED save")
    written = [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert len(written) == 1 and written[0].startswith("c.pt.")  # the whole checkpoint, not yet renamed
    code, err = run.stop(signal.SIGHUP)
    assert_one_line_end(code, err, signal.SIGHUP, tmp_path, r"saving the checkpoint c.pt \(iteration 2/10000 of "
                        r"epoch 0\); kept: no checkpoint written yet \(c.pt untouched\)")
    assert not (tmp_path / "c.pt").exists()


CRITEO = ["--data-generation=dataset", "--arch-sparse-feature-size=4", "--arch-mlp-bot=13-4",
          "--mini-batch-size=64", "--print-freq=1", "--progress"]


@pytest.mark.slow
def test_a_signal_during_preprocessing(tmp_path):
    fake_kaggle(tmp_path / "train.txt", 700, seed=2)
    run = Run(CRITEO + ["--raw-data-file=train.txt"], tmp_path, pause="preprocess")
    run.wait_for("PAUSED preprocess")
    assert [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # a day half written
    code, err = run.stop(signal.SIGINT)
    assert_one_line_end(code, err, signal.SIGINT, tmp_path, r"preprocessing train.txt; kept: the preprocessed files "
                        r"finished so far \(the next run goes on from them\)")


@pytest.mark.slow
@pytest.mark.parametrize("signum, group", [(signal.SIGTERM, False), (signal.SIGHUP, True)])
def test_a_signal_during_multiprocess_preprocessing(tmp_path, signum, group):
    """While worker processes write days: the parent stops them and removes what they were
    writing; no worker or multiprocessing's tracker prints anything."""
    fake_kaggle(tmp_path / "train.txt", 70000, seed=2)
    run = Run(CRITEO + ["--raw-data-file=train.txt", "--dataset-multiprocessing"], tmp_path)
    deadline = time.monotonic() + 180
    while not [p for p in tmp_path.iterdir() if ".tmp" in p.name]:  # a worker is writing a day
        assert time.monotonic() < deadline and run.proc.poll() is None
        time.sleep(0.01)
    code, err = run.stop(signum, group=group)
    assert_one_line_end(code, err, signum, tmp_path, r"preprocessing train.txt; kept: the preprocessed files "
                        r"finished so far \(the next run goes on from them\)")


@pytest.mark.slow
def test_one_rank_stopped_under_torchrun(tmp_path):
    """SIGTERM to rank 1 of 2: it says so in one line, and rank 0 ends with one line too."""
    run = Run(SMALL, tmp_path, torchrun=2)
    run.wait_for("Finished training it 3/")
    rank1 = _torchrun_worker(run.proc.pid, rank=1)
    os.kill(rank1, signal.SIGTERM)
    err = run.proc.stderr.read()
    assert run.proc.wait(timeout=120) != 0
    stopped, other = (re.findall(rf"^error: rank {rank}: .*$", err, re.M) for rank in (1, 0))
    assert len(stopped) == 1 and len(other) == 1, err
    assert re.fullmatch(r"error: rank 1: interrupted by SIGTERM while training \(iteration \d+/10000 of epoch 0\); "
                        r"kept: no checkpoint \(no --save-model\)", stopped[0])
    assert other[0] == "error: rank 0: stopping because rank 1 failed" or other[0].startswith(
        "error: rank 0: interrupted by SIGTERM while training"), other  # torchrun may stop rank 0 first
    for frame in ("dlrm_s_pytorch.py\", line", "dlrm_train.py\", line", "extend_distributed.py\", line"):
        assert frame not in err  # no traceback from our processes


def _torchrun_worker(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker process of ``rank``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry)
    raise AssertionError(f"no rank {rank} under torchrun {launcher}")


@pytest.mark.slow
def test_a_closed_pipe_ends_the_run_quietly(tmp_path):
    """``python dlrm_s_pytorch.py ... | head -2``: the run stops at the next line, with no
    traceback and exit code 128 + SIGPIPE, as a Unix tool does."""
    run = Run(SMALL, tmp_path, reader=False)
    while "Finished training it 1/" not in run.proc.stdout.readline():
        assert run.proc.poll() is None
    run.proc.stdout.close()  # the reader goes away
    err = run.proc.stderr.read()
    assert run.proc.wait(timeout=120) == 128 + signal.SIGPIPE
    assert "Traceback" not in err and "Exception ignored" not in err and "error" not in err, err


@pytest.mark.slow
def test_a_captured_log_has_no_progress_redraws(tmp_path):
    """With stderr captured (not a terminal), neither ``--progress`` nor preprocessing draws bars:
    every line of the log is a line, and a whole Criteo run's stderr holds no carriage return."""
    fake_kaggle(tmp_path / "train.txt", 700, seed=2)
    proc = subprocess.run([sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *CRITEO, "--raw-data-file=train.txt",
                           "--num-batches=2", f"--tensor-board-filename={tmp_path / 'tb'}"], cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "%|" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("summary: ")


def test_signals_raised_keeps_ignored_signals_ignored_and_restores_the_handlers():
    """A signal ignored before (SIGHUP under nohup) stays ignored; the others raise Interrupted
    once, with their number; the handlers before come back afterwards."""
    from dlrm.common import Interrupted
    from dlrm.io import interrupts

    before_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    before_term = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Interrupted) as caught:
            with interrupts.signals_raised():
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
                os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing happens
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises here, at once
        assert caught.value.exit_code == 143 and caught.value.describe() == (
            "interrupted by SIGTERM while starting; kept: nothing written yet")
        assert signal.getsignal(signal.SIGTERM) is before_term
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before_hup)


def test_remove_temps_of_removes_only_the_named_processes_files(tmp_path):
    from dlrm.io.atomic import remove_temps_of, temp_name

    mine = temp_name(str(tmp_path / "day_0.npz"))
    other = mine.replace(f".{os.getpid()}-", f".{os.getpid() + 1}-")
    for name in (mine, other, str(tmp_path / "day_0.npz")):
        Path(name).write_bytes(b"x")
    assert remove_temps_of(str(tmp_path), [os.getpid()]) == [mine]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(other).name, "day_0.npz"])
