"""Multi-process runs (torchrun, gloo on 127.0.0.1) against the same run in one process; the ranks of
one run must agree, and every way of failing to meet ends in one line per process.

Real processes on 127.0.0.1 with gloo: torchrun where the ranks meet, and processes started by hand
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) where they cannot.
"""
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from dlrm.distributed import DistInfo, first_disagreement, shard
from dlrm.run.checkpoint import load_checkpoint
from helpers import dist_steps
from helpers.bounds import fp32_reorder_bound
from helpers.dist_runs import assert_checkpoints_close, numbers as _numbers, run as _run
from helpers.ports import free_port
from helpers.runs import ROOT

pytestmark = pytest.mark.slow  # every test here starts processes

ARGS = ["--mini-batch-size=6", "--data-size=60", "--arch-embedding-size=40-30-20-50-7", "--nepochs=2",
        "--test-freq=5", "--loss-function=bce", "--round-targets=1", "--learning-rate=0.3", "--print-freq=5"]


@pytest.fixture(scope="module")
def single_process_steps():
    """Per dtype, every configuration's parameters after every step of the single-process run."""
    torch.manual_seed(0)
    return {dtype: dist_steps.train_configs(DistInfo(), getattr(torch, dtype)) for dtype in ("float32", "float64")}


def _multi_process_steps(tmp_path, nproc: int, dtype: str, sharding: str = "table"):
    out = tmp_path / f"multi-{dtype}.pt"
    code, _, err = _run([str(out), dtype, sharding], nproc, script="tests/helpers/dist_steps.py")
    assert code == 0, err
    return torch.load(out)


def _compare_steps(single, multi, check):
    """Run ``check(config, step, key, one, many)`` on every parameter after every step."""
    assert len(multi) == len(single) == len(dist_steps.CONFIGS)
    for c, (one, many) in enumerate(zip(single, multi)):
        assert len(one) == len(many) == dist_steps.STEPS
        for step, (a, b) in enumerate(zip(one, many)):
            assert list(a) == list(b)
            for key in a:
                assert b[key].dtype == a[key].dtype
                check(c, step + 1, key, a[key], b[key])


# With the float32 test's cases, every sharding on two rank counts, and 2, 3 and 4 ranks.
@pytest.mark.parametrize("nproc,sharding", [(4, "table"), (3, "row"), (4, "column"), (3, "auto")])
def test_every_parameter_after_every_step_equals_one_process_in_float64(tmp_path, nproc, sharding,
                                                                      single_process_steps):
    """Several ranks compute the same function as one process, with only the order of float sums
    differing, whatever the tables' sharding: proven in float64, where the same code paths run on
    float64 tensors. (Row-wise tables add a bag's partial sums from each row block; column-wise
    tables pool exactly as one process does, and only the dense part's sums are split.)

    The bound: each step's float sums have at most ``dist_steps.longest_sum`` terms (240 here), so
    over 5 steps reordering them moves a value by at most about 2 * 240 * 5 * 2**-53 = 2.7e-13 of
    the magnitudes involved (the bound of ``fp32_reorder_bound`` in float64), whatever the
    CPU's GEMM kernels do. rtol 1e-12 with atol 1e-12 of the tensor's largest value is that bound;
    an algebraic mistake (a gradient not divided by the ranks, a row sent to the wrong owner, a
    missing all-reduce) moves values by 1e-3 or more.
    """
    single = single_process_steps["float64"]

    def check(c, step, key, a, b):
        scale = float(a.abs().max())
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12 * scale,
                                   msg=lambda m: f"config {c}, step {step}, {key}: {m}")

    _compare_steps(single, _multi_process_steps(tmp_path, nproc, "float64", sharding), check)


@pytest.mark.parametrize("nproc,sharding", [(2, "table"), (4, "row"), (3, "column"), (4, "auto")])
def test_every_parameter_after_every_step_stays_within_float32_rounding(tmp_path, nproc, sharding,
                                                                        single_process_steps):
    """The float32 runs several ranks make differ from one process's by no more than float32
    rounding of reordered sums (``fp32_reorder_bound``): on AVX-512 CPUs MKL's GEMM kernels block
    their sums differently for the different row counts each rank gets, so equality is not the claim.

    Adagrad's configuration is left to the float64 test: its update g / sqrt(sum g^2) turns the
    sign of a gradient element that is rounding noise (|g| ~ u * sum|terms|, with eps = 1e-10 far
    below that in float32) into a difference of up to twice the learning rate, so no bound in terms
    of rounding holds for it element by element. In float64 eps dominates such noise. Row-wise
    Adagrad divides by the root mean square of a whole row's gradient, which is not noise for a row
    that a bag looked up, so the bound holds for it.
    """
    single = single_process_steps["float32"]

    def check(c, step, key, a, b):
        config = dist_steps.CONFIGS[c]
        if config["optimizer"] == "adagrad":
            return
        bound = fp32_reorder_bound(dist_steps.longest_sum(config), step, float(a.abs().max()))
        torch.testing.assert_close(b, a, rtol=0, atol=bound, msg=lambda m: f"config {c}, step {step}, {key}: {m}")

    _compare_steps(single, _multi_process_steps(tmp_path, nproc, "float32", sharding), check)


def test_shard_matches_the_reference_partition():
    assert [shard(5, 3, r) for r in range(3)] == [(0, 2), (2, 4), (4, 5)]
    assert [shard(6, 2, r) for r in range(2)] == [(0, 3), (3, 6)]


@pytest.mark.parametrize("nproc", [2, 3])
def test_multi_process_run_gives_the_single_process_result(tmp_path, nproc):
    single, multi = tmp_path / "single.pt", tmp_path / "multi.pt"
    code, out1, err = _run(ARGS + [f"--save-model={single}"])
    assert code == 0, err
    code, out2, err = _run(ARGS + [f"--save-model={multi}"], nproc)
    assert code == 0, err
    assert f"world size: {nproc}, current rank: 0, local rank: 0" in out2
    losses1, acc1 = _numbers(out1)
    losses2, acc2 = _numbers(out2)
    assert len(losses1) == len(losses2) == 4 and acc1 == acc2
    assert losses2 == pytest.approx(losses1, abs=2e-6)  # only float summation order differs
    a, b = load_checkpoint(str(single))["state_dict"], load_checkpoint(str(multi))["state_dict"]
    assert list(a) == list(b)  # every table gathered, keys in the single-process order
    steps, bags = 2 * 10, 10 * 6  # two epochs of 10 batches; bags of up to 10 rows, batches of 6
    for key in a:
        bound = fp32_reorder_bound(bags, steps, float(a[key].abs().max()))
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=bound)


TRICKS = [  # (flags, ranks, a key of the trick's own): per-row pooling weights, QR and mixed-dimension
    # tables, with sgd and adagrad (fixed pooling weights are not parameters)
    (["--weighted-pooling=learned"], 2, "v_W_l.4"),
    (["--weighted-pooling=fixed", "--optimizer=adagrad"], 3, "emb_l.4.weight"),
    (["--weighted-pooling=learned", "--optimizer=adagrad", "--arch-interaction-op=cat"], 3, "v_W_l.2"),
    (["--qr-flag", "--qr-threshold=25"], 2, "emb_l.3.weight_q"),
    (["--qr-flag", "--qr-threshold=25", "--qr-operation=concat", "--arch-mlp-bot=4-3-4", "--optimizer=adagrad"], 3,
     "emb_l.1.weight_r"),
    (["--md-flag", "--md-threshold=25", "--optimizer=adagrad"], 2, "emb_l.3.proj.weight"),
]


@pytest.mark.parametrize("flags,nproc,own_key", TRICKS)
def test_pooling_weights_qr_and_md_tables_give_the_single_process_result(tmp_path, flags, nproc, own_key):
    """The printed numbers, every parameter (v_W_l.K, QR and projected tables gathered from their
    owners) and the optimizer state of a multi-process run equal the single-process ones."""
    single, multi = tmp_path / "single.pt", tmp_path / "multi.pt"
    common = ARGS + flags + [f"--tensor-board-filename={tmp_path / 'tb'}"]
    code, out1, err = _run(common + [f"--save-model={single}"])
    assert code == 0, err
    code, out2, err = _run(common + [f"--save-model={multi}"], nproc)
    assert code == 0, err
    losses1, acc1 = _numbers(out1)
    losses2, acc2 = _numbers(out2)
    assert len(losses1) == len(losses2) == 4 and acc1 == acc2
    assert losses2 == pytest.approx(losses1, abs=2e-6)  # only float summation order differs
    assert own_key in load_checkpoint(str(single))["state_dict"]
    assert_checkpoints_close(single, multi, terms=10 * 6, steps=2 * 10)  # bags of up to 10 rows, batches of 6


@pytest.mark.parametrize("flags", [["--weighted-pooling=learned"], ["--qr-flag", "--qr-threshold=25"]])
def test_pooling_weight_and_qr_checkpoints_move_between_one_and_several_processes(tmp_path, flags):
    path = tmp_path / "single.pt"
    common = ARGS + flags + ["--optimizer=adagrad", "--fix-reference-bugs", "--learning-rate=0.05",
                             f"--tensor-board-filename={tmp_path / 'tb'}"]
    code, full, err = _run(common + [f"--save-model={path}"])
    assert code == 0, err
    code, resumed, err = _run(common + [f"--load-model={path}"], 2)
    assert code == 0, err
    tail = resumed.split("time/loss/accuracy (if enabled):\n")[1]
    expected = full.rsplit("Saving model to", 1)[1].split("\n", 1)[1]
    assert _numbers(tail)[1] == _numbers(expected)[1]
    assert _numbers(tail)[0] == pytest.approx(_numbers(expected)[0], abs=2e-6)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc (Linux)")
def test_no_backend_thread_outlives_the_shutdown():
    """A training run (its optimizer imports torch modules that used to capture the process group)
    leaves no gloo thread behind, so nothing is freed at interpreter exit."""
    code, out, err = _run(ARGS[:3] + ["--print-freq=5"], 3, script="tests/helpers/exit_check.py")
    assert code == 0, err
    lines = re.findall(r"rank \d backend threads after main: \[[^\]]*\]", err)  # ranks' lines may interleave
    assert len(lines) == 3 and all(line.endswith(": []") for line in lines), lines


def test_a_failing_rank_says_so_once_and_the_others_name_it(monkeypatch):
    monkeypatch.setenv("DLRM_TEST_FAILING_RANK", "1")
    code, out, err = _run(ARGS[:3] + ["--print-freq=1"], 2, script="tests/helpers/rank_failure.py")
    assert code != 0
    assert err.count("error: a rank-local problem (injected by the test)") == 1
    others = re.findall(r"error: rank 0: .*", err)  # rank 0 names rank 1, or says torchrun stopped it
    assert len(others) == 1, err
    assert others[0] == "error: rank 0: stopping because rank 1 failed" or others[0].startswith(
        "error: rank 0: interrupted by SIGTERM while training (iteration "), others
    for frame in ("dlrm_s_pytorch.py\", line", "dlrm/run/train.py\", line", "dlrm/distributed.py\", line"):
        assert frame not in err  # no traceback from our processes


def test_checkpoints_move_between_one_and_several_processes(tmp_path):
    path = tmp_path / "single.pt"
    code, full, err = _run(ARGS + ["--optimizer=adagrad", "--fix-reference-bugs", f"--save-model={path}"])
    assert code == 0, err
    code, resumed, err = _run(ARGS + ["--optimizer=adagrad", "--fix-reference-bugs", f"--load-model={path}"], 2)
    assert code == 0, err
    tail = resumed.split("time/loss/accuracy (if enabled):\n")[1]
    expected = full.rsplit("Saving model to", 1)[1].split("\n", 1)[1]
    assert _numbers(tail)[1] == _numbers(expected)[1]
    assert _numbers(tail)[0] == pytest.approx(_numbers(expected)[0], abs=2e-6)


def test_batches_that_do_not_split_evenly_are_skipped_with_a_warning():
    code, out, err = _run(["--mini-batch-size=4", "--data-size=9", "--arch-embedding-size=4-3-2"], 2)
    assert code == 0, err
    assert "Warning: Skiping the batch 2 with size 1" in out


def test_more_ranks_than_tables_is_refused():
    code, out, err = _run(["--mini-batch-size=4", "--data-size=8", "--arch-embedding-size=4-3"], 3)
    assert code != 0
    assert "error: only (2) sparse features for (3) devices, table partitions will fail" in err
    assert 'dlrm_s_pytorch.py", line' not in err  # our processes end cleanly; torchrun reports their exit


# --- the ranks of one run must agree; a failure to meet is one line per process ---------------------------

RANK_ARGS = ["--mini-batch-size=4", "--data-size=16", "--arch-embedding-size=4-3-2-5", "--learning-rate=0.1"]
OUR_FRAMES = ('dlrm_s_pytorch.py", line', 'dlrm/run/benchmark.py", line', 'dlrm/distributed.py", line',
              'dlrm/run/checkpoint.py", line', 'rank_variants.py", line')
TIMEOUT_S = 2  # --dist-init-timeout of the processes that cannot meet


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)
    return env


def _torchrun(tmp_path, args, **env):
    """Two ranks under torchrun, each adding ``DLRM_TEST_RANK<r>_ARGS``; (exit code, stdout, stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", os.path.join(ROOT, "tests", "helpers", "rank_variants.py"), *RANK_ARGS,
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
        cmd = [sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), *RANK_ARGS, f"--dist-init-timeout={timeout_s}",
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
    ("--numpy-rand-seed=7", "error: ranks disagree on --numpy-rand-seed: rank 0 has 123, rank 1 has 7"),
    ("--sharding=row", "error: ranks disagree on --sharding: rank 0 has table, rank 1 has row"),
    ("--rank-memory-gib=2", "error: ranks disagree on --rank-memory-gib: rank 0 has none, rank 1 has 2.0"),
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
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), *RANK_ARGS, f"--save-model={path}",
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
    port, patience = free_port(), 60
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
    port = free_port()
    code, lines, waited = _Rank(tmp_path, 1, port, addr=addr).finish()
    address = f"{addr}:{port}"
    assert code == 2 and lines == [_waiting(1, address), (
        f"error: rank 1: cannot reach rank 0 at {address} within {TIMEOUT_S} s (--dist-init-timeout): nobody is "
        "listening there; start rank 0 too, with the same MASTER_ADDR and MASTER_PORT")]  # no c10d log
    assert TIMEOUT_S - 0.5 < waited < TIMEOUT_S + 4


def test_a_rank_out_of_range_is_refused_at_once(tmp_path):
    code, lines, _ = _Rank(tmp_path, 5, free_port()).finish()
    assert code == 2 and lines == ["error: RANK=5 is out of range: a run of 2 processes has ranks 0 to 1"]


def test_ranks_given_different_world_sizes_stop_naming_both(tmp_path):
    port = free_port()
    ranks = [_Rank(tmp_path, 0, port, timeout_s=30), _Rank(tmp_path, 1, port, timeout_s=30, size=3)]
    (code0, lines0, _), (code1, lines1, _) = [r.finish() for r in ranks]
    assert code0 == 2 and lines0[1:] == ["error: ranks disagree on WORLD_SIZE: rank 0 has 2, rank 1 has 3"], lines0
    assert code1 == 2 and lines1[1:] == ["error: ranks disagree on WORLD_SIZE: rank 1 has 3, rank 0 has 2"], lines1
