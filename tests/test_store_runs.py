"""Whole runs with ``--embedding-store=disk`` against the same runs in memory: the printed lines and
the checkpoint bit for bit, resuming across the two, the summary's store figures, one-line
refusals, and a run killed with SIGKILL (its store is removed by the next run, never reused; the
last checkpoint stays whole)."""
import os
import re
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from dlrm.run.checkpoint import load_checkpoint
from helpers import dist_runs
from helpers.runs import ROOT

pytestmark = pytest.mark.slow  # every test here starts a run as a subprocess

ARGS = ["--mini-batch-size=8", "--data-size=96", "--arch-embedding-size=300-20-1000-7", "--arch-sparse-feature-size=4",
        "--arch-mlp-bot=5-4", "--arch-mlp-top=6-1", "--nepochs=2", "--test-freq=6", "--print-freq=3",
        "--loss-function=bce", "--round-targets=1", "--learning-rate=0.1", "--num-indices-per-lookup=6"]
TINY_CACHE = "--embedding-cache-gib=0.00002"  # about 20 KiB: a few hundred rows of 1,327, so rows are evicted


STORE_SUMMARY = re.compile(r", table store: ([\d.]+) % of rows from the cache, ([\d.]+) % of the rest read ahead, "
                           r"read ([\d.]+ \w+), wrote ([\d.]+ \w+)$", re.M)


def _run(tmp_path, *args, preexec=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), *args,
                           f"--tensor-board-filename={tmp_path / 'tb'}"], env=env, capture_output=True, text=True,
                          timeout=240, preexec_fn=preexec)
    return proc.returncode, proc.stdout, proc.stderr


def _disk(tmp_path):
    return ["--embedding-store=disk", f"--embedding-store-dir={tmp_path / 'store'}", TINY_CACHE]


def _assert_same_checkpoint(a, b):
    a, b = load_checkpoint(str(a)), load_checkpoint(str(b))
    assert list(a["state_dict"]) == list(b["state_dict"])
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    state1, state2 = a["opt_state_dict"]["state"], b["opt_state_dict"]["state"]
    assert sorted(state1) == sorted(state2)
    for i in state1:
        assert sorted(state1[i]) == sorted(state2[i])
        for name, value in state1[i].items():
            other = state2[i][name]
            assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, (i, name)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rwsadagrad"])
def test_a_run_from_files_prints_and_saves_the_memory_run_bit_for_bit(tmp_path, optimizer):
    memory, disk = tmp_path / "memory.pt", tmp_path / "disk.pt"
    common = ARGS + [f"--optimizer={optimizer}", "--weighted-pooling=learned"]
    code, out1, err1 = _run(tmp_path, *common, f"--save-model={memory}")
    assert code == 0, err1
    code, out2, err2 = _run(tmp_path, *common, *_disk(tmp_path), f"--save-model={disk}")
    assert code == 0, err2
    assert out2.replace(str(disk), str(memory)) == out1  # every training, test and save line
    assert "Finished training it" in out1
    _assert_same_checkpoint(memory, disk)
    summary = [line for line in err2.splitlines() if line.startswith("summary:")]
    match = STORE_SUMMARY.search(summary[0])
    assert match and 0 < float(match.group(1)) < 100 and 0 < float(match.group(2)) <= 100, summary
    assert os.listdir(tmp_path / "store") == []  # the working copy is gone


@pytest.mark.parametrize("first,then", [("disk", "memory"), ("memory", "disk")])
def test_a_checkpoint_resumes_the_same_from_files_and_from_memory(tmp_path, first, then):
    common = ARGS + ["--optimizer=adagrad", "--fix-reference-bugs", "--nepochs=1"]
    store = {"disk": _disk(tmp_path), "memory": []}
    saved = tmp_path / "saved.pt"
    code, _, err = _run(tmp_path, *common, *store[first], f"--save-model={saved}")
    assert code == 0, err
    outs = []
    for where in ("memory", then):
        code, out, err = _run(tmp_path, *common[:-1], "--nepochs=2", *store[where], f"--load-model={saved}")
        assert code == 0, err
        outs.append(out)
    assert outs[0] == outs[1] and "Finished training it" in outs[0]


SHARDED = ["--mini-batch-size=16", "--data-size=160", "--arch-embedding-size=300-20-1000-7-50",
           "--arch-sparse-feature-size=4", "--arch-mlp-bot=5-4", "--arch-mlp-top=10-1", "--test-freq=5",
           "--print-freq=1", "--loss-function=bce", "--round-targets=1", "--learning-rate=0.1",
           "--num-indices-per-lookup=6"]


@pytest.mark.parametrize("sharding,optimizer,pooling", [("row", "rwsadagrad", "learned"), ("column", "rwsadagrad", "learned"),
                                                      ("table", "adagrad", "fixed")])
def test_a_rank_s_pieces_in_files_train_as_its_pieces_in_memory(tmp_path, sharding, optimizer, pooling):
    """Two ranks, each keeping its tables (or row or column blocks) in files behind a cache of a few
    hundred rows: every printed line and the gathered checkpoint equal the same run with the pieces
    in memory, bit for bit (column blocks: the row-wise Adagrad's whole-row means and the learned
    pooling weights' summed gradients too); with row blocks, a run resumed from it with pieces in
    files goes on as one in memory."""
    common = SHARDED + [f"--sharding={sharding}", f"--optimizer={optimizer}", f"--weighted-pooling={pooling}"]
    outs = {}
    for where, store in (("memory", []), ("disk", _disk(tmp_path))):
        code, outs[where], err = dist_runs.run([*common, "--nepochs=1", *store, f"--save-model={tmp_path / where}.pt",
                                                f"--tensor-board-filename={tmp_path / 'tb'}"], nproc=2)
        assert code == 0, err
    assert outs["disk"].replace("disk.pt", "memory.pt") == outs["memory"] and "Finished training it" in outs["memory"]
    read_ahead = STORE_SUMMARY.search(err)
    assert read_ahead and float(read_ahead.group(2)) > 0, err  # the next batch's rows were read ahead
    _assert_same_checkpoint(tmp_path / "memory.pt", tmp_path / "disk.pt")
    if sharding != "row":
        return  # resuming into pieces in files: once is enough (each run takes seconds)
    for where, store in (("memory", []), ("disk", _disk(tmp_path))):
        code, outs[where], err = dist_runs.run([*common, "--nepochs=2", "--fix-reference-bugs", *store,
                                                f"--load-model={tmp_path / 'disk.pt'}",
                                                f"--tensor-board-filename={tmp_path / 'tb'}"], nproc=2)
        assert code == 0, err
    assert outs["disk"] == outs["memory"] and "Finished training it" in outs["memory"]
    assert os.listdir(tmp_path / "store") == []


@pytest.mark.parametrize("args,message", [
    (["--embedding-store=disk"], "error: --embedding-store=disk needs --embedding-store-dir=DIR"),
    (["--embedding-store=disk", "--embedding-store-dir=X", "--qr-flag"],
     "error: --embedding-store=disk does not work with --qr-flag"),
    (["--embedding-store=disk", "--embedding-store-dir=/proc/dlrm-store"],
     "error: --embedding-store-dir=/proc/dlrm-store: cannot create it"),
    (["--embedding-cache-gib=-1"], "error: --embedding-cache-gib must not be negative"),
])
def test_bad_store_flags_are_one_line(tmp_path, args, message):
    code, out, err = _run(tmp_path, "--mini-batch-size=2", "--data-size=4", *args)
    assert code == 2 and "Finished" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), err


def test_a_file_size_limit_below_the_tables_is_one_line(tmp_path):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    code, out, err = _run(tmp_path, *ARGS, *_disk(tmp_path), preexec=limit)
    assert code != 0 and "Finished" not in out
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cannot make a" in lines[0] and "table file: File too large" in lines[0], err
    assert "Traceback" not in err
    assert os.listdir(tmp_path / "store") == []


def test_a_killed_run_keeps_its_last_checkpoint_and_its_store_is_never_reused(tmp_path):
    model = tmp_path / "model.pt"
    common = ARGS + _disk(tmp_path) + ["--nepochs=200", "--print-freq=1", "--test-freq=3", f"--save-model={model}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), *common,
                             f"--tensor-board-filename={tmp_path / 'tb'}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    saves = 0
    for line in proc.stdout:
        saves += line.startswith("Saving model to")
        if saves >= 2:
            break
    time.sleep(0.3)  # somewhere in the next steps, perhaps in the middle of the next save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = os.listdir(tmp_path / "store")
    assert len(left) == 1  # the killed run's working copy
    assert load_checkpoint(str(model))["state_dict"]  # the last checkpoint is whole
    code, out, err = _run(tmp_path, *ARGS, *_disk(tmp_path), f"--load-model={model}", "--inference-only")
    assert code == 0, err
    assert f"removed {tmp_path / 'store' / left[0]}" in err
    assert os.listdir(tmp_path / "store") == []
