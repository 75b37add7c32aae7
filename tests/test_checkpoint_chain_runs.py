"""``--checkpoint-every`` runs: the chain of a base and an increment restores the ``--save-model``
file of the same step bit for bit (row-wise Adagrad, fused SGD, Adagrad with tables in files), and
a run resumed from the directory prints what one resumed from that file prints; refusals are one
line."""
import json
import os
import subprocess
import sys
import time

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


KILL_ARGS = ["--arch-embedding-size=250000-250000", "--arch-sparse-feature-size=16", "--arch-mlp-bot=4-16",
             "--arch-mlp-top=8-1", "--mini-batch-size=256", "--num-indices-per-lookup=8", "--num-batches=400",
             "--print-freq=100", "--checkpoint-every=5", "--checkpoint-rebase-every=2"]


def _moment_reached(directory, moment):
    """Whether ``directory`` shows the moment to kill at: a file being written (its temporary name)
    of a base or an increment, while a complete chain is there."""
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return False
    return "manifest.json" in entries and any(e.startswith(f"{moment}-") and ".tmp" in e for e in entries)


@pytest.mark.parametrize("moment", ["base", "increment"])
def test_kill_9_while_writing_leaves_the_last_chain_and_the_next_run_resumes_from_it(tmp_path, moment):
    chain = tmp_path / "chain"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    command = [sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), *KILL_ARGS, f"--checkpoint-dir={chain}",
               "--tensor-board-filename="]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and not _moment_reached(chain, moment) and time.monotonic() < deadline:
            time.sleep(0.0005)
        assert proc.poll() is None, f"the run ended before a {moment} was being written"
        proc.kill()  # SIGKILL: no handler, no cleanup
    finally:
        proc.kill()
        proc.wait()
    assert any(".tmp" in e for e in os.listdir(chain))  # the cut write's file is there
    links = json.loads((chain / "manifest.json").read_text())["chain"]
    restored = load_chain(str(chain))
    assert restored["iter"] == links[-1]["iter"] and restored["iter"] % 5 == 0
    code, _, err = _run(tmp_path, *KILL_ARGS, f"--load-model={chain}", f"--checkpoint-dir={chain}")
    assert code == 0, err
    assert f"{chain}: resuming from epoch 0, iteration {links[-1]['iter']} (a base at epoch 0, iteration " \
           f"{links[0]['iter']}" in err
    assert not any(".tmp" in e for e in os.listdir(chain))  # the next run removed it
    assert load_chain(str(chain))["iter"] == 400


def _tool(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "tools.checkpoint", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_a_quantized_chain_consolidates_into_a_file_that_evaluates_as_the_chain(tmp_path):
    common = ARGS + ["--optimizer=adagrad"]
    chain, model = tmp_path / "chain", tmp_path / "model.pt"
    code, _, err = _run(tmp_path, *common, "--checkpoint-every=4", f"--checkpoint-dir={chain}",
                        "--checkpoint-quantize=4")
    assert code == 0, err
    code, out, err = _tool("inspect", str(chain))
    assert code == 0, err
    rows = out.splitlines()
    assert rows[1].split()[:5] == ["0", "base", "0", "4", "4"] and rows[2].split()[:5] == ["1", "increment", "0", "8", "4"]
    assert rows[-1].endswith("the chain restores epoch 0, iteration 8 (a base at epoch 0, iteration 4 and 1 increment; "
                             "tables in 4 bits)")
    code, out, err = _tool("consolidate", str(chain), "-o", str(model))
    assert code == 0 and out.strip() == f"wrote {model}: epoch 0, iteration 8", err
    outs = []
    for source in (chain, model):
        code, out, err = _run(tmp_path, *common, f"--load-model={source}", "--inference-only")
        assert code == 0, err
        outs.append(out.replace(str(source), "SOURCE"))
    assert outs[0] == outs[1] and "accuracy" in outs[0]
    # a run restored from 4-bit tables writes its own chain in 8 bits, and counts the restore
    again = tmp_path / "again"
    code, _, err = _run(tmp_path, *common, "--nepochs=2", f"--load-model={chain}", "--checkpoint-every=4",
                        f"--checkpoint-dir={again}", "--checkpoint-quantize=4")
    assert code == 0, err
    manifest = json.loads((again / "manifest.json").read_text())
    assert manifest["quantized_restores"] == 1 and {link["bits"] for link in manifest["chain"]} == {8}
    assert _tool("inspect", str(tmp_path / "none"))[1:] == ("", f"error: {tmp_path / 'none'}: no checkpoint manifest "
                                                                "(manifest.json) there\n")
