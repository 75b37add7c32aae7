"""Tables kept in files behind a row cache (dlrm.store) against the same tables in memory: every
parameter and optimizer state bit for bit after every step, with caches from none to all of the
rows; the cache's eviction and write-back against a plain dictionary model; the store's
directory, its refusals and its clean-up."""
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from dlrm.data.random import RandomDataConfig, RandomDataset
from dlrm.model.dlrm import DLRM, ModelConfig, make_loss, top_mlp_input_width
from dlrm.model.fused_embedding import parameters_excluding_fused
from dlrm.run.train import make_optimizer
from dlrm.store.cache import RowCache
from dlrm.store.files import NOTE_NAME, PREFIX, StoreDir, StoreError
from dlrm.store.tables import StoredTables

SIZES, DIM, BATCH, BAG, STEPS = (40, 7, 300, 1, 90), 4, 16, 6, 6


def _model_config(pooling=None):
    width = top_mlp_input_width("dot", False, len(SIZES), DIM)
    return ModelConfig(embedding_dim=DIM, table_sizes=SIZES, bottom_mlp=(5, DIM), top_mlp=(width, 3, 1),
                       weighted_pooling=pooling, embedding_backend="plain")


def _pair(tmp_path, optimizer, cache_rows, pooling=None, seed=3):
    """The same model twice: tables in memory, and tables in files behind a cache of ``cache_rows``
    rows in all; with their optimizers."""
    cfg = _model_config(pooling)
    memory = DLRM(cfg, np.random.RandomState(seed))
    stored = DLRM(cfg, np.random.RandomState(seed))
    row_bytes = (DIM + {"sgd": 0, "adagrad": DIM, "rwsadagrad": 1}[optimizer]) * 4
    stored.emb_l = StoredTables(SIZES, DIM, np.random.RandomState(seed), str(tmp_path / "store"),
                                cache_rows * row_bytes, optimizer)
    optimizers = [make_optimizer(optimizer, list(m.parameters()), 0.1) for m in (memory, stored)]
    stored.emb_l.attach_optimizer(optimizers[1])
    return (memory, optimizers[0]), (stored, optimizers[1])


def _batches(seed=5):
    data = RandomDataset(RandomDataConfig(dense_dim=5, table_sizes=SIZES, batch_size=BATCH, num_batches=STEPS,
                                          num_indices_per_lookup=BAG, round_targets=True, seed=seed),
                         np.random.RandomState(seed), print)
    return [data[j] for j in range(STEPS)]


def _step(model, optimizer, batch):
    loss = make_loss("bce")(model(batch.dense_x, batch.offsets, batch.indices), batch.labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _assert_same(memory, stored, mem_opt, stored_opt):
    for t in range(len(SIZES)):
        assert torch.equal(stored.emb_l.table(t), memory.emb_l[t].weight.detach()), f"table {t}"
    named = dict(stored.named_parameters())
    for name, param in memory.named_parameters():
        if not name.startswith("emb_l."):
            assert torch.equal(named[name], param), name
    cache = stored.emb_l.cache
    cache.flush()
    for t, state in enumerate(cache.states or []):
        expected = mem_opt.state[memory.emb_l[t].weight]["sum"]
        assert torch.equal(state.whole().reshape(expected.shape), expected), f"state of table {t}"


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rwsadagrad"])
@pytest.mark.parametrize("cache_rows", [0, 12, 10_000])
def test_every_parameter_after_every_step_equals_memory_tables(tmp_path, optimizer, cache_rows):
    (memory, mem_opt), (stored, stored_opt) = _pair(tmp_path, optimizer, cache_rows)
    for batch in _batches():
        assert torch.equal(_step(stored, stored_opt, batch), _step(memory, mem_opt, batch))
        _assert_same(memory, stored, mem_opt, stored_opt)
    stored.emb_l.close()


def test_tables_from_files_equal_the_fused_tables_in_memory(tmp_path):
    """Under SGD large tables default to --embedding-backend=fused (the update inside backward);
    the store's plain arithmetic on its working rows gives the same bits after every step."""
    cfg = replace(_model_config(), embedding_backend="fused")
    fused = DLRM(cfg, np.random.RandomState(3))
    fused_opt = make_optimizer("sgd", parameters_excluding_fused(fused), 0.1)
    fused.emb_l.follow_optimizer_lr(fused_opt)
    _, (stored, stored_opt) = _pair(tmp_path, "sgd", 12)
    for batch in _batches():
        assert torch.equal(_step(stored, stored_opt, batch), _step(fused, fused_opt, batch))
        for t in range(len(SIZES)):
            assert torch.equal(stored.emb_l.table(t), fused.emb_l.table_weight(t).detach()), f"table {t}"
        named = dict(stored.named_parameters())
        for name, param in fused.named_parameters():
            if not name.startswith("emb_l."):
                assert torch.equal(named[name], param), name
    stored.emb_l.close()


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rwsadagrad"])
def test_rows_read_ahead_while_a_step_trains_give_the_same_bits(tmp_path, optimizer):
    """As the training loop does: batch k+1's rows are read in the background before step k runs,
    so rows step k writes meanwhile must be read again."""
    (memory, mem_opt), (stored, stored_opt) = _pair(tmp_path, optimizer, 12)
    batches = _batches()
    for k, batch in enumerate(batches):
        if k + 1 < len(batches):
            stored.emb_l.prefetch(batches[k + 1].indices)
        _step(memory, mem_opt, batch)
        _step(stored, stored_opt, batch)
        _assert_same(memory, stored, mem_opt, stored_opt)
    assert stored.emb_l.cache.read_ahead_used > 0
    stored.emb_l.close()


def test_a_row_written_after_it_was_read_ahead_is_read_again(tmp_path):
    files = _Files(tmp_path)
    cache = RowCache(files.weights, files.states, 0)  # no slots: every update goes to the files
    since = cache.start_read_ahead()
    ahead = cache.read_ahead(np.array([5, 56]), since)
    cache.scatter(np.array([5]), torch.full((1, 3), 9.0), torch.full((1, 2), 8.0))  # the step updates row 5
    got = _joined(cache.gather(np.array([5, 56]), ahead))
    assert torch.equal(got[0], torch.tensor([9.0, 9, 9, 8, 8])) and torch.equal(got[1], files.expected[56])
    assert cache.read_ahead_used == 1  # row 56 came from the read-ahead, row 5 from the file again
    files.dir.close()


@pytest.mark.parametrize("pooling", ["fixed", "learned"])
def test_weighted_pooling_from_files_equals_memory_tables(tmp_path, pooling):
    (memory, mem_opt), (stored, stored_opt) = _pair(tmp_path, "adagrad", 20, pooling)
    for batch in _batches():
        _step(memory, mem_opt, batch)
        _step(stored, stored_opt, batch)
        _assert_same(memory, stored, mem_opt, stored_opt)
    stored.emb_l.close()


def test_the_state_dict_holds_whole_tables_under_the_reference_keys_and_loads_back(tmp_path):
    (memory, mem_opt), (stored, stored_opt) = _pair(tmp_path, "sgd", 10)
    for batch in _batches()[:3]:
        _step(memory, mem_opt, batch)
        _step(stored, stored_opt, batch)
    a, b = memory.state_dict(), stored.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    (_, _), (other, _) = _pair(tmp_path, "sgd", 10, seed=9)
    other.load_state_dict(a)
    for t in range(len(SIZES)):
        assert torch.equal(other.emb_l.table(t), a[f"emb_l.{t}.weight"])
    for model in (stored, other):
        model.emb_l.close()


# --- the cache against a dictionary ---------------------------------------------------------------


class _Files:
    """RowFiles of two small tables (rows 0-49 and 50-79 in the cache's numbering), weights (R_t, 3)
    and state (R_t, 2), and a dictionary of what each row should hold (weights then state)."""

    def __init__(self, tmp_path, sizes=(50, 30), dim=3, state=2):
        self.dir = StoreDir(str(tmp_path / "cache"))
        self.weights = [self.dir.file(f"w{t}", rows, dim) for t, rows in enumerate(sizes)]
        self.states = [self.dir.file(f"s{t}", rows, state) for t, rows in enumerate(sizes)]
        values = torch.arange(sum(sizes) * (dim + state), dtype=torch.float32).reshape(sum(sizes), dim + state)
        start = 0
        for weights, states, rows in zip(self.weights, self.states, sizes):
            mine = values[start:start + rows]
            weights.fill(lambda a, b, mine=mine: mine[a:b, :dim].contiguous(), 7)
            states.fill(lambda a, b, mine=mine: mine[a:b, dim:].contiguous(), 7)
            start += rows
        self.expected = {r: values[r].clone() for r in range(sum(sizes))}

    def on_disk(self, row: int) -> torch.Tensor:
        t, local = (0, row) if row < 50 else (1, row - 50)
        return torch.cat([self.weights[t].whole()[local], self.states[t].whole()[local]])


def _joined(rows):
    weights, state = rows
    return torch.cat([weights, state], dim=1)


@pytest.mark.parametrize("capacity", [0, 1, 4, 80])
def test_the_cache_serves_and_writes_back_what_a_dictionary_holds(tmp_path, capacity):
    files = _Files(tmp_path)
    cache = RowCache(files.weights, files.states, capacity)
    rng = np.random.default_rng(0)
    looked_up = 0
    for step in range(40):
        rows = np.unique(np.concatenate([rng.zipf(1.5, size=8) % 50, 50 + rng.zipf(1.5, size=5) % 30]))
        looked_up += len(rows)
        got = _joined(cache.gather(rows))
        for i, r in enumerate(rows):
            assert torch.equal(got[i], files.expected[int(r)]), (step, r)
        new = got + step + 1
        cache.scatter(rows, new[:, :3].contiguous(), new[:, 3:].contiguous())
        for i, r in enumerate(rows):
            files.expected[int(r)] = new[i].clone()
        assert (cache.row_of >= 0).sum() <= capacity
    cache.flush()
    for r, value in files.expected.items():  # everything reached the files
        assert torch.equal(files.on_disk(r), value), r
    assert cache.hits + cache.misses == looked_up and (cache.hits > 0) == (capacity > 0)
    files.dir.close()


def test_a_dirty_row_is_written_to_the_files_only_when_evicted(tmp_path):
    files = _Files(tmp_path)
    cache = RowCache(files.weights, files.states, 2)
    cache.gather(np.array([3, 54]))
    cache.scatter(np.array([3, 54]), torch.full((2, 3), -1.0), torch.full((2, 2), -2.0))
    assert files.weights[0].bytes_written == files.weights[1].bytes_written == 0
    assert torch.equal(files.on_disk(54), files.expected[54])
    cache.gather(np.array([3]))  # row 3 used twice: row 54 goes first
    cache.gather(np.array([10]))
    assert cache.slot_of[54] == -1 and cache.slot_of[3] >= 0
    assert torch.equal(files.on_disk(54), torch.tensor([-1.0, -1, -1, -2, -2]))  # written back on eviction
    assert torch.equal(files.on_disk(3), files.expected[3])  # still only in the cache
    files.dir.close()


# --- the directory --------------------------------------------------------------------------------


def test_each_run_makes_its_own_directory_and_removes_it(tmp_path):
    first, second = StoreDir(str(tmp_path)), StoreDir(str(tmp_path))
    assert first.path != second.path
    assert os.path.isfile(os.path.join(first.path, NOTE_NAME))
    assert "not a checkpoint" in open(os.path.join(first.path, NOTE_NAME)).read()
    first.close()
    assert not os.path.exists(first.path) and os.path.isdir(second.path)
    kept = StoreDir(str(tmp_path), keep=True)
    kept.close()
    assert os.path.isdir(kept.path)


def test_the_store_of_a_dead_run_is_removed_with_a_warning_never_reused(tmp_path):
    import socket
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    host = socket.gethostname().split(".")[0] or "host"
    stale = tmp_path / f"{PREFIX}{host}-{dead}-1"
    stale.mkdir()
    (stale / NOTE_NAME).write_text("a working copy")
    (stale / "table_0.f32").write_bytes(b"\0" * 64)
    lines = []
    fresh = StoreDir(str(tmp_path), warn=lines.append)
    assert not stale.exists() and len(lines) == 1 and str(stale) in lines[0]
    assert os.listdir(fresh.path) == [NOTE_NAME]
    fresh.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_directory_is_one_error(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="cannot write there: not writable"):
            StoreDir(str(tmp_path))
    finally:
        tmp_path.chmod(0o700)


def test_a_path_that_is_a_file_is_one_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(StoreError, match="--embedding-store-dir=.*: cannot create it"):
        StoreDir(str(path / "sub"))


def test_tables_larger_than_the_free_disk_are_refused_before_writing(tmp_path, monkeypatch):
    import dlrm.store.tables as tables

    monkeypatch.setattr(tables, "free_bytes", lambda path: 1000)
    with pytest.raises(StoreError, match=r"the tables need .* GiB on disk, .* GiB are free there"):
        StoredTables(SIZES, DIM, np.random.RandomState(0), str(tmp_path), 0)
    assert [p for p in os.listdir(tmp_path)] == []  # its directory is gone again

