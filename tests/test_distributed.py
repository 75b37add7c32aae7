"""Multi-process runs (torchrun, gloo on 127.0.0.1) against the same run in one process."""
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from dlrm.distributed import DistInfo, shard
from dlrm.run.checkpoint import load_checkpoint
from helpers import dist_steps

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--mini-batch-size=6", "--data-size=60", "--arch-embedding-size=40-30-20-50-7", "--nepochs=2",
        "--test-freq=5", "--loss-function=bce", "--round-targets=1", "--learning-rate=0.3", "--print-freq=5"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, nproc=1, script="dlrm_s_pytorch.py"):
    """Run ``script`` (relative to the checkout) in the test's own directory; (code, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    script = os.path.join(ROOT, script)
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", script, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stdout, proc.stderr


def _numbers(out):
    """(losses, accuracy lines) of a run's output."""
    losses = [float(x) for x in re.findall(r"^Finished training it .* loss (\d+\.\d+)", out, re.M)]
    return losses, re.findall(r"^ accuracy .*$", out, re.M)


@pytest.fixture(scope="module")
def single_process_steps():
    """Per dtype, every configuration's parameters after every step of the single-process run."""
    torch.manual_seed(0)
    return {dtype: dist_steps.train_configs(DistInfo(), getattr(torch, dtype)) for dtype in ("float32", "float64")}


def _multi_process_steps(tmp_path, nproc: int, dtype: str):
    out = tmp_path / f"multi-{dtype}.pt"
    code, _, err = _run([str(out), dtype], nproc, script="tests/helpers/dist_steps.py")
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


@pytest.mark.parametrize("nproc", [2, 3, 4])
def test_every_parameter_after_every_step_equals_one_process_in_float64(tmp_path, nproc, single_process_steps):
    """Several ranks compute the same function as one process, with only the order of float sums
    differing: proven in float64, where the same code paths run on float64 tensors.

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

    _compare_steps(single, _multi_process_steps(tmp_path, nproc, "float64"), check)


def fp32_reorder_bound(n: int, step: int, magnitude: float) -> float:
    """How far two float32 evaluations of the same training steps may drift apart when only the
    order of their sums differs: 2 * N * s * u * M.

    One float sum of N terms, evaluated in any order, is within gamma_N = N*u/(1 - N*u) of the exact
    sum, relative to the sum of the terms' magnitudes (u = 2**-24, the float32 unit roundoff). Two
    orders are then within 2*gamma_N of each other. A step's sums are at most N =
    ``dist_steps.longest_sum(config)`` long, and each step's error adds to the earlier ones (first
    order: the small learning rates keep the amplification of earlier differences well below 2). M
    is the largest magnitude of the parameter tensor, which bounds the terms' scale after the
    updates are applied.
    """
    u = 2.0 ** -24
    return 2 * (n * u / (1 - n * u)) * step * magnitude


@pytest.mark.parametrize("nproc", [2, 4])
def test_every_parameter_after_every_step_stays_within_float32_rounding(tmp_path, nproc, single_process_steps):
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

    _compare_steps(single, _multi_process_steps(tmp_path, nproc, "float32"), check)


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
    a, b = load_checkpoint(str(single)), load_checkpoint(str(multi))
    assert list(a["state_dict"]) == list(b["state_dict"])
    assert own_key in a["state_dict"]
    steps, bags = 2 * 10, 10 * 6  # two epochs of 10 batches; bags of up to 10 rows, batches of 6

    def close(x, y):  # float32 rounding of reordered sums only (see fp32_reorder_bound)
        torch.testing.assert_close(x, y, rtol=0, atol=fp32_reorder_bound(bags, steps, float(y.abs().max())))

    for key in a["state_dict"]:
        close(b["state_dict"][key], a["state_dict"][key])
    state1, state2 = a["opt_state_dict"]["state"], b["opt_state_dict"]["state"]
    assert sorted(state1) == sorted(state2)
    for i in state1:
        for name in state1[i]:
            if state1[i][name].is_floating_point():
                close(state2[i][name], state1[i][name])
            else:
                assert torch.equal(state2[i][name], state1[i][name])


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
