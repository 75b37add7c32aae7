"""``--checkpoint-every`` runs: the chain of a base and an increment restores the ``--save-model``
file of the same step bit for bit (row-wise Adagrad, fused SGD, Adagrad with tables in files), and
a run resumed from the directory prints what one resumed from that file prints; refusals are one
line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dlrm.checkpoints.chain import load_chain
from dlrm.run.checkpoint import load_checkpoint
from helpers.runs import ROOT

pytestmark = pytest.mark.slow  # every test here starts runs as subprocesses

ARGS = ["--mini-batch-size=8", "--data-size=96", "--arch-embedding-size=300-20-1000-7", "--arch-sparse-feature-size=4",
        "--arch-mlp-bot=5-4", "--arch-mlp-top=6-1", "--print-freq=4", "--test-freq=8", "--num-batches=8",
        "--loss-function=bce", "--round-targets=1", "--learning-rate=0.1", "--num-indices-per-lookup=6",
        "--fix-reference-bugs"]


def _run(tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), *args,
                           f"--tensor-board-filename={tmp_path / 'tb'}"], env=env, capture_output=True, text=True,
                          timeout=240)
    return proc.returncode, proc.stdout, proc.stderr


def _assert_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for x, y in zip(a, b):
            _assert_equal(x, y, where)
    else:
        assert a == b, where


@pytest.mark.parametrize("optimizer,flags", [("rwsadagrad", []), ("sgd", ["--embedding-backend=fused"]),
                                             ("adagrad", ["--embedding-store=disk", "--embedding-cache-gib=0.00002"])])
def test_the_chain_restores_the_saved_file_and_resumes_as_it_does(tmp_path, optimizer, flags):
    if "--embedding-store=disk" in flags:
        flags.append(f"--embedding-store-dir={tmp_path}")
    common = ARGS + [f"--optimizer={optimizer}", *flags]
    chain, full = tmp_path / "chain", tmp_path / "full.pt"
    code, _, err = _run(tmp_path, *common, "--checkpoint-every=4", f"--checkpoint-dir={chain}", f"--save-model={full}")
    assert code == 0, err
    kinds = [link["kind"] for link in json.loads((chain / "manifest.json").read_text())["chain"]]
    assert kinds == ["base", "increment"]  # steps 4 and 8; --save-model wrote step 8 at its test
    _assert_equal(load_chain(str(chain)), load_checkpoint(str(full)))
    if optimizer != "rwsadagrad":
        return  # resuming from a directory: once is enough (each run takes seconds)
    outs = []
    for source in (chain, full):
        code, out, err = _run(tmp_path, *common, "--nepochs=2", f"--load-model={source}")
        assert code == 0, err
        outs.append(out.replace(str(source), "SOURCE"))
    assert outs[0] == outs[1] and "Finished training it" in outs[0]


@pytest.mark.parametrize("args,message", [
    (["--checkpoint-every=4"], "error: --checkpoint-every=N and --checkpoint-dir=DIR go together"),
    (["--checkpoint-every=-1", "--checkpoint-dir=X"], "error: --checkpoint-every must not be negative, got -1"),
    (["--load-model={tmp}"], "error: --load-model={tmp}: a directory without a checkpoint manifest (manifest.json)"),
])
def test_bad_checkpoint_flags_are_one_line(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = _run(tmp_path, "--mini-batch-size=2", "--data-size=4", *args)
    assert code == 2 and "Finished" not in out
    assert err.strip().splitlines() == [message.replace("{tmp}", str(tmp_path))], err
