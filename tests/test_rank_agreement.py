"""The ranks of one run must agree, and every way of failing to meet ends in one line per process.

Real processes on 127.0.0.1 with gloo: torchrun where the ranks meet, and processes started by hand
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) where they cannot.
"""
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from dlrm.distributed import first_disagreement

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--mini-batch-size=4", "--data-size=16", "--arch-embedding-size=4-3-2-5", "--learning-rate=0.1"]
OUR_FRAMES = ('dlrm_s_pytorch.py", line', 'dlrm/run/benchmark.py", line', 'dlrm/distributed.py", line',
              'dlrm/run/checkpoint.py", line', 'rank_variants.py", line')
TIMEOUT_S = 2  # --dist-init-timeout of the processes that cannot meet


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)
    return env


def _torchrun(tmp_path, args, **env):
    """Two ranks under torchrun, each adding ``DLRM_TEST_RANK<r>_ARGS``; (exit code, stdout, stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", os.path.join(ROOT, "tests", "helpers", "rank_variants.py"), *SMALL,
           f"--tensor-board-filename={tmp_path / 'tb'}", "--dist-init-timeout=60", *args]
    proc = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stdout, proc.stderr


def _our_errors(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def _assert_no_traceback(err):
    for frame in OUR_FRAMES:
        assert frame not in err


class _Rank:
    """One process started by hand, its stderr lines and when it began waiting and when it ended."""

    def __init__(self, tmp_path, rank, port, args=(), timeout_s=TIMEOUT_S, addr="127.0.0.1", size=2):
        env = _env(RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR=addr, MASTER_PORT=str(port))
        cmd = [sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), *SMALL, f"--dist-init-timeout={timeout_s}",
               f"--tensor-board-filename={tmp_path / 'tb'}", *args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines, self.waiting_since, self.ended = [], None, None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            if "waiting for all" in line:
                self.waiting_since = time.monotonic()
            self.lines.append(line.rstrip("\n"))
        self.ended = time.monotonic()

    def finish(self):
        """(exit code, stderr lines, seconds from the waiting line to the end), killing a hung process."""
        try:
            code = self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.reader.join(10)
        return code, self.lines, self.ended - (self.waiting_since or self.ended)


def _waiting(rank, address):
    return (f"rank {rank}: waiting for all 2 processes at {address} (backend gloo; giving up after {TIMEOUT_S} s, "
            "--dist-init-timeout)")


# --- flags that must match -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank1_args, line", [
    ("--arch-embedding-size=4-3-2-6", "error: ranks disagree on --arch-embedding-size: rank 0 has 4-3-2-5, rank 1 has "
                                      "4-3-2-6"),
    ("--learning-rate=0.2", "error: ranks disagree on --learning-rate: rank 0 has 0.1, rank 1 has 0.2"),
    ("--data-size=20", "error: ranks disagree on --data-size: rank 0 has 16, rank 1 has 20"),
    ("--numpy-rand-seed=7", "error: ranks disagree on --numpy-rand-seed: rank 0 has 123, rank 1 has 7"),
])
def test_ranks_started_with_different_flags_stop_naming_the_flag(tmp_path, rank1_args, line):
    code, out, err = _torchrun(tmp_path, [], DLRM_TEST_RANK1_ARGS=rank1_args)
    assert code != 0
    errors = _our_errors(err)
    assert errors and set(errors) == {line}, err  # each rank that got to say it says the same line
    assert "Finished training" not in out
    _assert_no_traceback(err)


def test_a_checkpoint_given_to_some_ranks_only_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    code, out, err = _torchrun(tmp_path, [], DLRM_TEST_RANK0_ARGS=f"--save-model={path}")
    assert code != 0
    assert set(_our_errors(err)) == {f"error: ranks disagree on --save-model: rank 0 has {path}, rank 1 has none"}
    assert not path.exists() and "Finished training" not in out


def test_each_rank_may_have_its_own_side_outputs_and_patience(tmp_path):
    """The flags that only rank 0 uses, or that are each process's own, may differ."""
    code, out, err = _torchrun(tmp_path, [], DLRM_TEST_RANK1_ARGS=(
        f"--metrics-file={tmp_path / 'metrics1.jsonl'} --tensor-board-filename={tmp_path / 'tb1'} "
        "--dist-init-timeout=30"))
    assert code == 0, err
    assert out.count("Finished training") == 4
    assert not (tmp_path / "metrics1.jsonl").exists()  # rank 0 writes the side outputs, and it has none


def test_the_first_setting_that_differs_is_named_with_both_values():
    same = {"--a": ("1", "1"), "--b": ("x", "x")}
    assert first_disagreement([same, dict(same), dict(same)]) is None
    third = {"--a": ("1", "1"), "--b": ("y", "y")}
    assert first_disagreement([same, same, third]) == "ranks disagree on --b: rank 0 has x, rank 2 has y"
    both = {"--a": ("2", "2"), "--b": ("y", "y")}
    assert first_disagreement([same, third, both]) == "ranks disagree on --a: rank 0 has 1, rank 2 has 2"
    assert first_disagreement([same, {"--a": ("1", "1")}]) == (
        "ranks disagree on the settings they know (different versions of the program?): only one of rank 0 and "
        "rank 1 has --b")


# --- a checkpoint is loaded by all ranks or none ------------------------------------------------------------------


def _save_checkpoint(tmp_path, name, *args):
    path = tmp_path / name
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), *SMALL, f"--save-model={path}",
                           f"--tensor-board-filename={tmp_path / 'tb'}", *args], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return path


@pytest.fixture
def checkpoint(tmp_path):
    return _save_checkpoint(tmp_path, "good.pt")


def test_a_checkpoint_that_one_rank_cannot_load_stops_every_rank(tmp_path, checkpoint):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, out, err = _torchrun(tmp_path, [f"--load-model={checkpoint}"], DLRM_TEST_RANK1_ARGS=f"--load-model={bad}")
    assert code != 0
    own = [line for line in _our_errors(err) if line.startswith(f"error: {bad}: not a readable checkpoint")]
    others = [line for line in _our_errors(err) if line.startswith("error: rank 0:")]
    assert len(own) == 1 and len(own) + len(others) == len(_our_errors(err)), err
    assert others in ([], [f"error: rank 0: stopping because rank 1 could not load the checkpoint: {own[0][7:]}"])
    assert "Finished training" not in out
    _assert_no_traceback(err)


def test_ranks_whose_checkpoints_resume_at_different_places_stop(tmp_path, checkpoint):
    """Each rank may read its own copy of a checkpoint, but the copies must agree."""
    earlier = _save_checkpoint(tmp_path, "earlier.pt", "--num-batches=2")
    code, out, err = _torchrun(tmp_path, [f"--load-model={checkpoint}"], DLRM_TEST_RANK1_ARGS=f"--load-model={earlier}")
    assert code != 0
    assert set(_our_errors(err)) == {"error: ranks disagree on the loaded checkpoint: rank 0 has epoch 0 batch 4 "
                                     "(accuracy 0.000 %), rank 1 has epoch 0 batch 2 (accuracy 0.000 %)"}, err
    assert "Finished training" not in out


def test_a_checkpoint_missing_on_one_rank_stops_every_rank_at_once(tmp_path, checkpoint):
    """Started by hand (torchrun would stop rank 0 itself): rank 0 learns why rank 1 cannot start,
    instead of waiting out --dist-init-timeout for it."""
    missing = tmp_path / "missing.pt"
    port, patience = _free_port(), 60
    ranks = [_Rank(tmp_path, 0, port, [f"--load-model={checkpoint}"], patience),
             _Rank(tmp_path, 1, port, [f"--load-model={missing}"], patience)]
    (code0, lines0, waited0), (code1, lines1, _) = [r.finish() for r in ranks]
    assert code1 == 2 and len(lines1) == 2 and "checkpoint file not found" in lines1[1], lines1
    assert str(missing) in lines1[1]
    assert code0 == 2 and lines0[1:] == [f"error: rank 0: stopping because rank 1 could not start: {lines1[1][7:]}"]
    assert waited0 < patience / 2


def test_a_rank_failing_after_the_run_ends_the_others_without_a_traceback(tmp_path):
    """Rank 0 fails after training while rank 1 waits in the final shutdown barrier."""
    code, out, err = _torchrun(tmp_path, [], DLRM_TEST_FAIL_AFTER_RUN="0")
    assert code != 0
    assert out.count("Finished training") == 4
    assert err.count("error: a problem after the run (injected by the test)") == 1
    others = [line for line in _our_errors(err) if line.startswith("error: rank 1:")]
    assert others in ([], ["error: rank 1: stopping because rank 0 failed"]), err
    assert "[rank1]:" not in err
    _assert_no_traceback(err)


# --- processes that cannot meet end within --dist-init-timeout, in one line ---------------------------------------


def test_a_port_in_use_ends_every_rank_within_the_timeout_naming_it(tmp_path):
    with socket.socket() as squatter:  # another program holds the port: it accepts, and never answers
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        ranks = [_Rank(tmp_path, 0, port), _Rank(tmp_path, 1, port)]
        (code0, lines0, _), (code1, lines1, waited1) = [r.finish() for r in ranks]
    address = f"127.0.0.1:{port}"
    assert code0 == 2 and lines0 == [_waiting(0, address), (
        f"error: rank 0: cannot serve the rendezvous at {address}: port {port} is already in use (by another "
        "program or run); choose a free MASTER_PORT for every rank")]
    assert code1 == 2 and lines1 == [_waiting(1, address), (
        f"error: rank 1: something at {address} accepts connections but does not answer as this run's rank 0 "
        f"within {TIMEOUT_S} s (--dist-init-timeout): another program holds MASTER_PORT={port}? Choose a free "
        "port for every rank")]
    assert TIMEOUT_S - 0.5 < waited1 < TIMEOUT_S + 4  # it hung for good before


@pytest.mark.parametrize("addr", ["127.0.0.1", "127.0.0.2"])
def test_nobody_listening_at_the_master_address_ends_within_the_timeout(tmp_path, addr):
    port = _free_port()
    code, lines, waited = _Rank(tmp_path, 1, port, addr=addr).finish()
    address = f"{addr}:{port}"
    assert code == 2 and lines == [_waiting(1, address), (
        f"error: rank 1: cannot reach rank 0 at {address} within {TIMEOUT_S} s (--dist-init-timeout): nobody is "
        "listening there; start rank 0 too, with the same MASTER_ADDR and MASTER_PORT")]  # no c10d log
    assert TIMEOUT_S - 0.5 < waited < TIMEOUT_S + 4


def test_a_rank_out_of_range_is_refused_at_once(tmp_path):
    code, lines, _ = _Rank(tmp_path, 5, _free_port()).finish()
    assert code == 2 and lines == ["error: RANK=5 is out of range: a run of 2 processes has ranks 0 to 1"]


def test_ranks_given_different_world_sizes_stop_naming_both(tmp_path):
    port = _free_port()
    ranks = [_Rank(tmp_path, 0, port, timeout_s=30), _Rank(tmp_path, 1, port, timeout_s=30, size=3)]
    (code0, lines0, _), (code1, lines1, _) = [r.finish() for r in ranks]
    assert code0 == 2 and lines0[1:] == ["error: ranks disagree on WORLD_SIZE: rank 0 has 2, rank 1 has 3"], lines0
    assert code1 == 2 and lines1[1:] == ["error: ranks disagree on WORLD_SIZE: rank 1 has 3, rank 0 has 2"], lines1
