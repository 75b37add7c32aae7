"""Checkpoint chains (dlrm.checkpoints): a base and increments of the touched rows restore the full
checkpoint of the last step bit for bit (SGD, Adagrad and row-wise Adagrad, plain and fused
tables, in memory and in files); a new base replaces the chain; a damaged or missing link, and a
manifest of another configuration, are one-line errors naming what is wrong."""
import json
import os

import pytest
import torch

from dlrm.checkpoints.chain import CheckpointChain, load_chain, read_manifest
from dlrm.checkpoints.increments import TouchedRows
from dlrm.common import CheckpointError
from helpers.chain_models import CONFIG, SIZES, assert_same, payload_at, small_run, train_step

@pytest.mark.parametrize("optimizer,backend,store", [
    ("sgd", "plain", False), ("sgd", "fused", False), ("adagrad", "plain", False),
    ("rwsadagrad", "plain", False), ("adagrad", "plain", True), ("rwsadagrad", "plain", True)])
def test_a_base_and_its_increments_restore_the_full_checkpoint(tmp_path, optimizer, backend, store):
    model, opt, schedule, batches = small_run(tmp_path, optimizer, backend, store)
    names = [n for n, _ in model.named_parameters()] if backend == "plain" else []
    chain = CheckpointChain(str(tmp_path / "ckpt"), CONFIG, rebase_fraction=10.0)  # increments only
    touched = TouchedRows(SIZES)
    kinds = []
    for step, batch in enumerate(batches, start=1):
        train_step(model, opt, schedule, batch)
        touched.add(batch.indices)
        if step % 2 == 0:
            kinds.append(chain.save(payload_at(model, opt, optimizer, schedule, step), touched.take(), names).kind)
    assert kinds == ["base", "increment", "increment", "increment"]
    restored = load_chain(str(tmp_path / "ckpt"))
    assert restored["iter"] == 8
    # the chain restores step 8; the model has trained step 9 since: compare with a replay of 8 steps
    model2, opt2, schedule2, _ = small_run(tmp_path / "again", optimizer, backend, store)
    for batch in batches[:8]:
        train_step(model2, opt2, schedule2, batch)
    assert_same(restored, payload_at(model2, opt2, optimizer, schedule2, 8), "payload")
    for m in (model, model2):
        if store:
            m.emb_l.close()


def test_increments_are_smaller_than_a_base_and_a_new_base_replaces_the_chain(tmp_path):
    model, opt, schedule, batches = small_run(tmp_path, "adagrad")
    names = [n for n, _ in model.named_parameters()]
    chain = CheckpointChain(str(tmp_path / "ckpt"), CONFIG, rebase_every=2, rebase_fraction=10.0)
    touched = TouchedRows(SIZES)
    links = []
    for step, batch in enumerate(batches[:4], start=1):
        train_step(model, opt, schedule, batch)
        touched.add(batch.indices)
        links.append(chain.save(payload_at(model, opt, "adagrad", schedule, step), touched.take(), names))
    assert [link.kind for link in links] == ["base", "increment", "increment", "base"]
    assert all(link.bytes < links[0].bytes for link in links[1:3])
    assert sorted(os.listdir(tmp_path / "ckpt")) == sorted(["manifest.json", links[3].file])  # the old chain is gone
    assert [link.file for link in read_manifest(str(tmp_path / "ckpt"), CONFIG)] == [links[3].file]
    by_size = CheckpointChain(str(tmp_path / "small"), CONFIG, rebase_fraction=0.0)  # any increment is too big
    kinds = [by_size.save(payload_at(model, opt, "adagrad", schedule, 4), touched.take(), names).kind for _ in range(2)]
    assert kinds == ["base", "base"]


def _chain_of_three(tmp_path):
    model, opt, schedule, batches = small_run(tmp_path, "sgd")
    chain = CheckpointChain(str(tmp_path / "ckpt"), CONFIG, rebase_fraction=10.0)
    touched = TouchedRows(SIZES)
    for step, batch in enumerate(batches[:3], start=1):
        train_step(model, opt, schedule, batch)
        touched.add(batch.indices)
        chain.save(payload_at(model, opt, "sgd", schedule, step), touched.take(), [])
    return chain


def test_a_missing_or_damaged_increment_names_the_file_and_the_last_goodtrain_step(tmp_path):
    chain = _chain_of_three(tmp_path)
    second, third = (os.path.join(chain.directory, link.file) for link in chain.links[1:])
    with open(third, "r+b") as damaged:
        damaged.seek(200)
        damaged.write(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=rf"{third}: damaged.*the last good checkpoint is at epoch 0, "
                                               r"iteration 2\)$"):
        load_chain(chain.directory)
    os.remove(second)
    with pytest.raises(CheckpointError, match=rf"checkpoint file not found: {second} \(the last good checkpoint is "
                                               r"at epoch 0, iteration 1\)$"):
        load_chain(chain.directory)


def test_a_manifest_of_another_configuration_is_refused_naming_the_field(tmp_path):
    _chain_of_three(tmp_path)
    with pytest.raises(CheckpointError, match=r"another configuration: optimizer is 'adagrad' there and 'sgd' in "
                                               r"this run$"):
        CheckpointChain(str(tmp_path / "ckpt"), {**CONFIG, "optimizer": "sgd"})
    manifest = tmp_path / "ckpt" / "manifest.json"
    document = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**document, "format": 99}))
    with pytest.raises(CheckpointError, match=r"format 99, this version reads format 1$"):
        load_chain(str(tmp_path / "ckpt"))


def test_a_write_cut_short_leaves_the_last_chain_and_its_file_is_removed(tmp_path):
    chain = _chain_of_three(tmp_path)
    stray = os.path.join(chain.directory, "increment-e0-i4-3.pt")
    with open(stray, "wb") as cut:
        cut.write(b"PK\x03\x04 half a file")
    assert load_chain(chain.directory)["iter"] == 3  # the manifest does not name it
    CheckpointChain(chain.directory, CONFIG)
    assert not os.path.exists(stray)


def test_touched_rows_are_the_union_of_the_batches_and_start_afresh():
    touched = TouchedRows((8, 6))
    touched.add(torch.tensor([[3, 1, 3], [0, 0, 5]]))
    touched.add([torch.tensor([7]), torch.tensor([5, 2])])
    rows = touched.take()
    assert rows[0].tolist() == [1, 3, 7] and rows[1].tolist() == [0, 2, 5]
    assert [r.tolist() for r in touched.take().values()] == [[], []]
