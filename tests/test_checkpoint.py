"""Checkpoints: the reference's layout, safe loading, atomic writes and exact resumption."""
import os

import numpy as np
import pytest
import torch

from dlrm.common import CheckpointError
from dlrm.model import dlrm
from dlrm.run.checkpoint import load_checkpoint, save_checkpoint
from helpers.models import tiny_model_config

TRAIN = ["--mini-batch-size=8", "--data-size=64", "--nepochs=4", "--test-freq=4", "--loss-function=bce",
         "--round-targets=true", "--learning-rate=0.3", "--arch-mlp-top=8-4-1"]
# An exact resume needs test passes that leave the training stream alone (the reference's move it).
EXACT = TRAIN + ["--fix-reference-bugs"]


def _after_last_save(out):
    """The lines an uninterrupted run prints after its last 'Saving model' line."""
    lines = out.splitlines()
    last = max(i for i, line in enumerate(lines) if line.startswith("Saving model to"))
    return lines[last + 1:]


@pytest.mark.parametrize("seed, saved_at", [(3, (3, 4)), (5, (2, 8))])
def test_resumed_run_prints_what_the_uninterrupted_run_printed(run_main, tmp_path, seed, saved_at):
    path = str(tmp_path / "model.pt")
    code, full, err = run_main(*EXACT, f"--numpy-rand-seed={seed}", f"--save-model={path}")
    assert code == 0, err
    payload = load_checkpoint(path)
    assert (payload["epoch"], payload["iter"]) == saved_at  # a later epoch (the reference hangs on these)
    code, resumed, err = run_main(*EXACT, f"--numpy-rand-seed={seed}", f"--load-model={path}")
    assert code == 0, err
    tail = resumed.split("time/loss/accuracy (if enabled):\n")[1].splitlines()
    assert tail == _after_last_save(full)
    assert any(line.startswith("Finished training it") for line in tail) or saved_at == (3, 8)


def test_checkpoint_has_reference_keys(run_main, tmp_path):
    path = str(tmp_path / "model.pt")
    run_main(*TRAIN, "--numpy-rand-seed=3", f"--save-model={path}")
    payload = load_checkpoint(path)
    assert payload["nepochs"] == 4 and payload["nbatches"] == 8 and payload["test_acc"] > 0
    for key in ("nepochs", "nbatches", "nbatches_test", "state_dict", "test_acc", "epoch", "iter",
                "train_loss", "total_loss", "opt_state_dict"):
        assert key in payload
    assert sorted(payload["state_dict"]) == sorted(
        [f"emb_l.{k}.weight" for k in range(3)]
        + [f"bot_l.{n}.{p}" for n in (0, 2) for p in ("weight", "bias")]
        + [f"top_l.{n}.{p}" for n in (0, 2, 4) for p in ("weight", "bias")])


def _reference_layout_checkpoint(model, path):
    """A checkpoint as the reference writes it: NumPy scalars for test_acc and train_loss."""
    torch.save({
        "nepochs": 1, "nbatches": 3, "nbatches_test": 3, "state_dict": model.state_dict(),
        "test_acc": np.float64(0.5), "epoch": 0, "iter": 3, "train_loss": np.float32(0.25),
        "total_loss": 0, "opt_state_dict": torch.optim.SGD(model.parameters(), lr=0.01).state_dict(),
    }, path)


def test_reference_layout_checkpoint_loads(run_main, tmp_path):
    """A reference checkpoint (NumPy scalars inside) loads on torch >= 2.6 (where the reference fails)."""
    other = dlrm.DLRM(tiny_model_config(), np.random.RandomState(7))
    path = str(tmp_path / "ref.pt")
    _reference_layout_checkpoint(other, path)
    code, out, err = run_main("--mini-batch-size=2", "--data-size=6", f"--load-model={path}", "--inference-only")
    assert code == 0, err
    assert f"Loading saved model {path}" in out
    assert "Saved at: epoch = 0/1, batch = 3/3, ntbatch = 3" in out
    assert "Training state: loss = 0.250000" in out
    assert "Testing state: accuracy = 50.000 %" in out
    assert "Testing for inference only" in out


def test_loaded_weights_are_used(tmp_path):
    other = dlrm.DLRM(tiny_model_config(), np.random.RandomState(7))
    path = str(tmp_path / "ref.pt")
    _reference_layout_checkpoint(other, path)
    payload = load_checkpoint(path)
    fresh = dlrm.DLRM(tiny_model_config(), np.random.RandomState(123))
    fresh.load_state_dict(payload["state_dict"])
    for a, b in zip(fresh.parameters(), other.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_arbitrary_pickles_are_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"state_dict": {}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load: it holds GLOBAL posix.system"):
        load_checkpoint(path)


@pytest.mark.parametrize("content, message", [(None, "not found"), (b"garbage", "not a readable checkpoint")])
def test_missing_or_corrupt_checkpoint_is_one_line_error(run_main, tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    code, out, err = run_main("--mini-batch-size=2", "--data-size=6", f"--load-model={path}")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_checkpoint_of_another_shape_is_refused(run_main, tmp_path):
    other = dlrm.DLRM(tiny_model_config(table_sizes=(5, 3, 2)), np.random.RandomState(7))
    path = str(tmp_path / "other.pt")
    _reference_layout_checkpoint(other, path)
    code, _, err = run_main("--mini-batch-size=2", "--data-size=6", f"--load-model={path}")
    assert code == 2 and "does not fit this model" in err


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(str(path), {"state_dict": {"a": torch.ones(1)}})

    def crash(obj, f, *args, **kwargs):
        f.write(b"half")  # save_checkpoint gives torch.save a file object
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(str(path), {"state_dict": {"a": torch.zeros(1)}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(str(path))["state_dict"]["a"], torch.ones(1))
    assert os.listdir(tmp_path) == ["model.pt"]


# --- checkpoints with surprising contents ---------------------------------------------------------

RUN = ["--mini-batch-size=4", "--data-size=40", "--loss-function=bce", "--round-targets=true", "--test-freq=5"]


def _saved(run_main, tmp_path, *extra):
    path = str(tmp_path / "m.pt")
    code, _, err = run_main(*RUN, *extra, f"--save-model={path}", f"--tensor-board-filename={tmp_path / 'tb'}")
    assert code == 0, err
    return path


@pytest.mark.parametrize("saved_with, resumed_with", [("sgd", "adagrad"), ("adagrad", "rwsadagrad"),
                                                      ("rwsadagrad", "sgd")])
def test_another_optimizer_starts_fresh_with_a_warning(run_main, tmp_path, saved_with, resumed_with):
    path = _saved(run_main, tmp_path, f"--optimizer={saved_with}")
    code, out, err = run_main(*RUN, f"--optimizer={resumed_with}", f"--load-model={path}")
    assert code == 0, err
    assert f"holds {saved_with} optimizer state and this run uses --optimizer={resumed_with}" in err


def test_a_reference_file_without_the_optimizer_name_is_recognised(run_main, tmp_path):
    path = _saved(run_main, tmp_path, "--optimizer=adagrad")
    payload = load_checkpoint(path)
    del payload["optimizer"]  # the reference does not save it
    save_checkpoint(path, payload)
    code, out, err = run_main(*RUN, "--optimizer=rwsadagrad", f"--load-model={path}")
    assert code == 0 and "holds adagrad optimizer state" in err
    code, out, err = run_main(*RUN, "--optimizer=adagrad", f"--load-model={path}")
    assert code == 0 and "optimizer state" not in err


@pytest.mark.parametrize("key, value, message", [
    ("epoch", "three", "entry 'epoch' is a str, not a number"),
    ("test_acc", [0.5], "entry 'test_acc' is a list, not a number"),
    ("opt_state_dict", 7, "entry 'opt_state_dict' is a int, not a dict"),
    ("opt_state_dict", {"state": {}}, "entry 'opt_state_dict' lacks 'state' and 'param_groups'"),
    ("state_dict", {"bot_l.0.weight": 3.0}, "state_dict entry 'bot_l.0.weight' is a float, not a tensor"),
])
def test_entries_of_the_wrong_type_are_one_line_errors(run_main, tmp_path, key, value, message):
    path = _saved(run_main, tmp_path)
    payload = load_checkpoint(path)
    payload[key] = value
    torch.save(payload, path)
    code, _, err = run_main(*RUN, f"--load-model={path}")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def _moved(path, **entries):
    payload = load_checkpoint(path)
    payload.update(entries)
    save_checkpoint(path, payload)
    return path


def test_a_position_beyond_this_data_set_trains_nothing_with_a_warning(run_main, tmp_path):
    """Saved in the first epoch after more batches than this run has: as the reference, the run
    completes without training, testing or saving anything, and says so."""
    path = _moved(_saved(run_main, tmp_path), iter=5)  # 10 batches per epoch there
    again = tmp_path / "again.pt"
    code, out, err = run_main(*RUN[:1], "--data-size=12", *RUN[2:], "--nepochs=2", f"--load-model={path}",
                              f"--save-model={again}", f"--tensor-board-filename={tmp_path / 'tb'}")  # 3 batches
    assert code == 0, err
    assert "warning: " in err and "saved after batch 5 of 10, but this run has 3 batches per epoch" in err
    assert "nothing will be trained" in err
    assert out.split("time/loss/accuracy (if enabled):\n")[1] == ""
    assert not again.exists()


def test_a_position_beyond_this_data_set_in_a_later_epoch_is_refused(run_main, tmp_path):
    """From a later epoch the reference never completed (it looped forever): no reference run to match."""
    path = _moved(_saved(run_main, tmp_path), iter=5, epoch=1)
    code, _, err = run_main(*RUN[:1], "--data-size=12", *RUN[2:], "--nepochs=2", f"--load-model={path}")
    assert code == 2 and "saved after batch 5 of 10, but this run has 3 batches per epoch" in err


def _reference_rwsadagrad_checkpoint(path, row_sums):
    """A checkpoint as the reference writes it after row-wise Adagrad steps: each table's accumulator
    under ``momentum`` (one value per row), each MLP parameter's under ``sum``."""
    model = dlrm.DLRM(tiny_model_config(), np.random.RandomState(7))
    params = list(model.parameters())
    state = {i: {"step": 3, "momentum": row_sums[i]} if i < 3 else {"step": 3, "sum": torch.full_like(p, 0.5)}
             for i, p in enumerate(params)}
    group = {"lr": 0.01, "lr_decay": 0, "weight_decay": 0, "initial_accumulator_value": 0, "eps": 1e-10,
             "initial_lr": 0.01, "params": list(range(len(params)))}
    torch.save({
        "nepochs": 1, "nbatches": 3, "nbatches_test": 3, "state_dict": model.state_dict(),
        "test_acc": np.float64(0.5), "epoch": 0, "iter": 0, "train_loss": np.float32(0.25),
        "total_loss": 0, "opt_state_dict": {"state": state, "param_groups": [group]},
    }, path)


def test_a_reference_row_wise_adagrad_file_is_recognised(run_main, tmp_path):
    path = tmp_path / "ref.pt"
    _reference_rwsadagrad_checkpoint(path, [torch.full((n,), 2.0) for n in (4, 3, 2)])
    args = ["--mini-batch-size=2", "--data-size=6", f"--load-model={path}", f"--tensor-board-filename={tmp_path / 'tb'}"]
    code, _, err = run_main(*args, "--optimizer=rwsadagrad")
    assert code == 0 and "optimizer state" not in err, err
    code, _, err = run_main(*args, "--optimizer=adagrad")
    assert code == 0 and "holds rwsadagrad optimizer state and this run uses --optimizer=adagrad" in err


def test_a_mismatch_names_the_key_and_both_shapes(run_main, tmp_path):
    path = _saved(run_main, tmp_path)
    code, _, err = run_main(*RUN, "--arch-embedding-size=4-5-2", f"--load-model={path}")
    assert code == 2 and "emb_l.1.weight is (3, 2) in the checkpoint and (5, 2) in this model" in err
    code, _, err = run_main(*RUN, "--arch-embedding-size=4-3-2-2", f"--load-model={path}")
    assert code == 2 and "it has no emb_l.3.weight" in err
