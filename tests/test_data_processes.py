"""Preprocessing ends cleanly: pool workers die with their parent, Ctrl-C is one line and exit 130."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dlrm.data.criteo import command, days
from dlrm.data.criteo import preprocess as du
from helpers.criteo import fake_kaggle

ROOT = Path(__file__).resolve().parents[1]


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie nobody reaped has ended too)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def read_lines(stream, count: int, timeout: float):
    """``count`` lines from a pipe, or fewer if ``timeout`` seconds pass (a stuck child)."""
    lines, deadline = [], time.monotonic() + timeout
    while len(lines) < count and time.monotonic() < deadline:
        if select.select([stream], [], [], deadline - time.monotonic())[0]:
            lines.append(stream.readline())
    return lines


@pytest.mark.slow
def test_pool_workers_die_with_their_parent(tmp_path):
    (tmp_path / "sleeper.py").write_text(textwrap.dedent("""
        import os, time
        def announce_and_sleep():
            print(os.getpid(), flush=True)
            time.sleep(600)
    """))
    parent = textwrap.dedent("""
        import os, time
        os.cpu_count = lambda: 2
        import sleeper
        from dlrm.data.criteo import pool as workers
        pool = workers.process_pool(2)
        # the first job blocks its worker, so the second one runs in the other worker
        jobs = [pool.submit(sleeper.announce_and_sleep) for _ in range(2)]
        time.sleep(600)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    proc = subprocess.Popen([sys.executable, "-c", parent], env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    workers = []
    try:
        workers = [int(line) for line in read_lines(proc.stdout, 2, timeout=120)]
        assert len(set(workers)) == 2 and not any(gone(pid) for pid in workers)
        proc.kill()  # SIGKILL: no clean-up code of the parent runs
        proc.wait()
        deadline = time.monotonic() + 30
        while not all(gone(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(pid) for pid in workers)
    finally:
        proc.kill()
        for pid in workers:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        proc.stdout.close()


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    fake_kaggle(tmp_path / "train.txt", 300, seed=2)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(days, "run_day", interrupted)
    assert command.main([f"--raw-data-file={tmp_path / 'train.txt'}", "--no-progress"]) == 130
    assert capsys.readouterr() == ("", "error: interrupted\n")
    assert sorted(os.listdir(tmp_path)) == ["train.txt"]  # no temporary file left


@pytest.mark.slow
def test_ctrl_c_with_worker_processes(tmp_path):
    """A real SIGINT to the whole process group (as a terminal sends it) while the workers run:
    the workers leave it to the parent, which stops them, removes their temporary files and
    reports one line."""
    fake_kaggle(tmp_path / "train.txt", 700, seed=2)
    script = textwrap.dedent("""
        import concurrent.futures, os, signal, sys
        from dlrm.data.criteo import command
        real_as_completed = concurrent.futures.as_completed

        def ctrl_c_then_wait(futures):
            os.killpg(os.getpgid(0), signal.SIGINT)
            return real_as_completed(futures)

        concurrent.futures.as_completed = ctrl_c_then_wait
        raise SystemExit(command.main(sys.argv[1:]))
    """)
    result = subprocess.run([sys.executable, "-c", script, f"--raw-data-file={tmp_path}/train.txt",
                             "--dataset-multiprocessing", "--no-progress"], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=300, start_new_session=True)
    assert (result.returncode, result.stdout) == (130, "")
    assert result.stderr == (f"error: interrupted by SIGINT while preprocessing {tmp_path}/train.txt; kept: the "
                             "preprocessed files finished so far (the next run goes on from them)\n")
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]  # what the workers were writing
    rerun = du.preprocess_criteo(du.PreprocessConfig("kaggle", str(tmp_path / "train.txt"),
                                                     progress=False), lambda message: None)
    assert os.path.exists(rerun)  # what the killed workers left does not stop the next run
