"""Whole runs in one or several processes (torchrun, gloo on 127.0.0.1) and what the multi-process
tests compare: the printed numbers and the saved checkpoints."""
import os
import re
import subprocess
import sys

import torch

from dlrm.run.checkpoint import load_checkpoint
from helpers.bounds import fp32_reorder_bound
from helpers.ports import free_port
from helpers.runs import ROOT


def run(args, nproc=1, script="dlrm_s_pytorch.py", timeout=240):
    """Run ``script`` (relative to the checkout) in ``nproc`` processes; (code, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    script = os.path.join(ROOT, script)
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", script, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def numbers(out):
    """(losses, accuracy lines) of a run's output."""
    losses = [float(x) for x in re.findall(r"^Finished training it .* loss (\d+\.\d+)", out, re.M)]
    return losses, re.findall(r"^ accuracy .*$", out, re.M)


def assert_checkpoints_close(single, multi, terms, steps, optimizer_state=True):
    """Every parameter (and the optimizer state) of the checkpoint ``multi`` equals ``single``'s up to
    float32 rounding of reordered sums of at most ``terms`` terms over ``steps`` steps
    (``fp32_reorder_bound``); the keys are the same, in the same order."""
    a, b = load_checkpoint(str(single)), load_checkpoint(str(multi))
    assert list(a["state_dict"]) == list(b["state_dict"])

    def close(x, y, what):
        bound = fp32_reorder_bound(terms, steps, float(y.abs().max()) if y.numel() else 0.0)
        torch.testing.assert_close(x, y, rtol=0, atol=bound, msg=lambda m: f"{what}: {m}")

    for key in a["state_dict"]:
        close(b["state_dict"][key], a["state_dict"][key], key)
    if not optimizer_state:
        return
    state1, state2 = a["opt_state_dict"]["state"], b["opt_state_dict"]["state"]
    assert sorted(state1) == sorted(state2)
    for i in state1:
        assert sorted(state1[i]) == sorted(state2[i])
        for name in state1[i]:
            one, many = state1[i][name], state2[i][name]
            if not isinstance(one, torch.Tensor):
                assert many == one, f"optimizer state {i}.{name}"
            elif one.is_floating_point():
                close(many, one, f"optimizer state {i}.{name}")
            else:
                assert torch.equal(many, one), f"optimizer state {i}.{name}"
