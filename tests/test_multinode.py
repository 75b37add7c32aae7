"""Runs over several machines, played on this one by two torchrun launchers as two nodes of two
ranks each (c10d rendezvous, gloo on 127.0.0.1): they give the single-process result, and nodes
started with different model flags stop naming the flag.

With the c10d rendezvous torchrun ignores ``--node-rank``: the nodes' global ranks follow the order
of their rendezvous descriptors (host, then the launcher's process id), so either launcher may hold
ranks 0 and 1. The tests find out which from what rank 0 prints.
"""
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
import torch

from dlrm.run.checkpoint import load_checkpoint
from helpers.bounds import fp32_reorder_bound
from helpers.ports import free_port
from helpers.runs import ROOT

pytestmark = pytest.mark.slow  # every test here starts processes

NODES, RANKS_PER_NODE = 2, 2
TIMEOUT_S = 240  # for every process started; a hung launcher is stopped, never left behind
FAILED_PEER_S = 60  # how long a launcher may go on after the other one failed
BATCH, BATCHES, EPOCHS, LOOKUPS = 8, 10, 2, 10  # eight rows split over four ranks; bags of up to ten rows
ARGS = [f"--mini-batch-size={BATCH}", f"--data-size={BATCH * BATCHES}", "--arch-embedding-size=40-30-20-50-7",
        f"--nepochs={EPOCHS}", "--test-freq=5", "--loss-function=bce", "--round-targets=1", "--learning-rate=0.3",
        "--print-freq=5"]
OUR_FRAMES = ('dlrm_s_pytorch.py", line', 'dlrm/run/', 'dlrm/distributed.py", line')


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _launcher(node, port, run_id, args, out_dir):
    """Start node ``node``'s torchrun, its stdout and stderr going to files in ``out_dir``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", f"--nproc-per-node={RANKS_PER_NODE}",
           f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
           "--local-addr=127.0.0.1", os.path.join(ROOT, "dlrm_s_pytorch.py"), *args]
    with open(out_dir / f"node{node}.out", "w") as out, open(out_dir / f"node{node}.err", "w") as err:
        return subprocess.Popen(cmd, env=_env(), stdout=out, stderr=err, text=True)


def _stop(proc):
    """End a launcher: SIGTERM, which it passes on to its ranks, then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _two_nodes(tmp_path, args_by_node):
    """Run one launcher per node at once; [(exit code, stdout, stderr)] in node order.

    When a launcher fails, the other gets FAILED_PEER_S to end by itself (ranks that fail together
    end together; a launcher left alone would wait in the rendezvous) and is stopped after that; so
    is a launcher still running after TIMEOUT_S.
    """
    port, run_id = free_port(), f"dlrm-test-{uuid.uuid4().hex}"
    procs = []
    try:
        for node, args in enumerate(args_by_node):
            procs.append(_launcher(node, port, run_id, args, tmp_path))
        _wait(procs)
    finally:
        for proc in procs:
            _stop(proc)
    return [(proc.returncode, (tmp_path / f"node{node}.out").read_text(), (tmp_path / f"node{node}.err").read_text())
            for node, proc in enumerate(procs)]


def _wait(procs):
    """Return when every process has ended, FAILED_PEER_S after one failed, or after TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and any(proc.poll() is None for proc in procs):
        if any(proc.poll() for proc in procs):  # a non-zero exit code
            deadline = min(deadline, time.monotonic() + FAILED_PEER_S)
        time.sleep(0.2)


def _one_process(args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), *args], env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc.returncode, proc.stdout, proc.stderr


def _numbers(out):
    """(losses, accuracy lines) of a run's output."""
    losses = [float(x) for x in re.findall(r"^Finished training it .* loss (\d+\.\d+)", out, re.M)]
    return losses, re.findall(r"^ accuracy .*$", out, re.M)


def _assert_no_traceback(err):
    for frame in OUR_FRAMES:
        assert frame not in err, err


def test_two_nodes_give_the_single_process_result(tmp_path):
    """Tables cut into row blocks over both nodes' ranks (whole tables, the reference's layout, take
    the same path through the rendezvous and the all-to-all)."""
    single, multi = tmp_path / "single.pt", tmp_path / "multi.pt"
    code, out1, err = _one_process(ARGS + [f"--save-model={single}"])
    assert code == 0, err
    nodes = _two_nodes(tmp_path, [ARGS + ["--sharding=row", f"--save-model={multi}"]] * NODES)
    for code, _, err in nodes:
        assert code == 0, err
    out2 = "".join(out for _, out, _ in nodes)  # only rank 0 prints; it is on either node
    assert out2.count("world size:") == 1 and "world size: 4, current rank: 0, local rank: 0" in out2, out2
    losses1, acc1 = _numbers(out1)
    losses2, acc2 = _numbers(out2)
    assert len(losses1) == len(losses2) == EPOCHS * BATCHES // 5 and acc1 == acc2
    steps, terms = EPOCHS * BATCHES, BATCH * LOOKUPS  # the longest sum: a row's gradient over a batch's bags
    # printed with six decimals, so two losses within the bound print up to 1e-6 further apart
    assert losses2 == pytest.approx(losses1, abs=fp32_reorder_bound(terms, steps, max(losses1)) + 1e-6)
    a, b = load_checkpoint(str(single))["state_dict"], load_checkpoint(str(multi))["state_dict"]
    assert list(a) == list(b)  # every table gathered from both nodes, keys in the single-process order
    for key in a:
        bound = fp32_reorder_bound(terms, steps, float(a[key].abs().max()))
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=bound, msg=lambda m: f"{key}: {m}")


def test_nodes_started_with_different_model_flags_stop_naming_the_flag(tmp_path):
    common = ["--mini-batch-size=4", "--data-size=16", "--learning-rate=0.1"]
    sizes = ["4-3-2-5", "4-3-2-6"]  # node 0's, node 1's
    nodes = _two_nodes(tmp_path, [common + [f"--arch-embedding-size={size}"] for size in sizes])
    errors = [[line for line in err.splitlines() if line.startswith("error:")] for _, _, err in nodes]
    first = (errors[0] or errors[1] or ["(none)"])[0]
    match = re.fullmatch(r"error: ranks disagree on --arch-embedding-size: rank 0 has (\S+), rank 2 has (\S+)", first)
    assert match and sorted(match.groups()) == sizes, errors
    main = sizes.index(match.group(1))  # the node whose ranks are 0 and 1
    assert errors[main] and set(errors[main] + errors[1 - main]) == {first}, errors  # each rank says the same
    for code, out, err in nodes:
        assert code != 0
        assert "Finished training" not in out
        _assert_no_traceback(err)
