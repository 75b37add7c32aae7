"""Multi-process runs (torchrun, gloo on 127.0.0.1) against the same run in one process."""
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

import dist_steps
from checkpoint import load_checkpoint
from extend_distributed import DistInfo, shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--mini-batch-size=6", "--data-size=60", "--arch-embedding-size=40-30-20-50-7", "--nepochs=2",
        "--test-freq=5", "--loss-function=bce", "--round-targets=1", "--learning-rate=0.3", "--print-freq=5"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, nproc=1, script="dlrm_s_pytorch.py"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stdout, proc.stderr


def _numbers(out):
    """(losses, accuracy lines) of a run's output."""
    losses = [float(x) for x in re.findall(r"^Finished training it .* loss (\d+\.\d+)", out, re.M)]
    return losses, re.findall(r"^ accuracy .*$", out, re.M)


@pytest.fixture(scope="module")
def single_process_steps():
    torch.manual_seed(0)
    return dist_steps.train_configs(DistInfo())


@pytest.mark.parametrize("nproc", [2, 3, 4])
def test_every_parameter_after_every_step_equals_one_process(tmp_path, nproc, single_process_steps):
    """Varied tables, bags, dims, dense widths, interactions and optimizers: after every step every
    parameter of a multi-process run equals the single-process one (only summation order differs)."""
    out = tmp_path / "multi.pt"
    code, _, err = _run([str(out)], nproc, script="tests/dist_steps.py")
    assert code == 0, err
    multi = torch.load(out)
    assert len(multi) == len(single_process_steps) == len(dist_steps.CONFIGS)
    for c, (one, many) in enumerate(zip(single_process_steps, multi)):
        assert len(one) == len(many) == dist_steps.STEPS
        for step, (a, b) in enumerate(zip(one, many)):
            assert list(a) == list(b)
            for key in a:
                torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7,
                                           msg=lambda m: f"config {c}, step {step + 1}, {key}: {m}")


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
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc (Linux)")
def test_no_backend_thread_outlives_the_shutdown():
    """A training run (its optimizer imports torch modules that used to capture the process group)
    leaves no gloo thread behind, so nothing is freed at interpreter exit."""
    code, out, err = _run(ARGS[:3] + ["--print-freq=5"], 3, script="tests/exit_check.py")
    assert code == 0, err
    lines = re.findall(r"rank \d backend threads after main: \[[^\]]*\]", err)  # ranks' lines may interleave
    assert len(lines) == 3 and all(line.endswith(": []") for line in lines), lines


def test_a_failing_rank_says_so_once_and_the_others_name_it(monkeypatch):
    monkeypatch.setenv("DLRM_TEST_FAILING_RANK", "1")
    code, out, err = _run(ARGS[:3] + ["--print-freq=1"], 2, script="tests/rank_failure.py")
    assert code != 0
    assert err.count("error: a rank-local problem (injected by the test)") == 1
    others = re.findall(r"error: rank 0: .*", err)  # rank 0 names rank 1, or says torchrun stopped it
    assert len(others) == 1, err
    assert others[0] == "error: rank 0: stopping because rank 1 failed" or others[0].startswith(
        "error: rank 0: interrupted by SIGTERM while training (iteration "), others
    for frame in ("dlrm_s_pytorch.py\", line", "dlrm_train.py\", line", "extend_distributed.py\", line"):
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
