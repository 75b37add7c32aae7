"""Tests of the Criteo datasets and loaders (dlrm/data/criteo/loaders.py, rows.py, row_cache.py).

Tiny processed datasets are written in tmp_path in the reference's formats. The expected batches come
from a plain implementation of the reference's semantics (here and in helpers/criteo_loaders.py):
per-sample indexing into Python lists, a per-row log transform and Python batching.
"""
from __future__ import annotations

import math
import os
import re
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dlrm.cli import describe
from dlrm.common import ConfigError, DataError
from dlrm.data.criteo import row_cache
from dlrm.data.criteo import loaders as cd
from dlrm.data.criteo import preprocess as du
from dlrm.data.criteo import rows as criteo_rows
from dlrm.io import npz as npz_io
from dlrm.run.flags import build_parser
from helpers.criteo import fake_kaggle
from helpers.criteo_loaders import (BAD_VALUES, COUNTS, already_processed, assert_same_batches, config, make_rows,
                                    quiet, reference_batches, without_notes, write_dataset)
from helpers.plain_criteo import plain_parse, read_lines

KAGGLE_DAY_SIZES = [150, 170, 130, 160, 140, 155, 61]      # odd last day: test takes ceil(61/2)


@pytest.fixture
def fake_data_utils(monkeypatch):
    """Preprocessing stand-in: the data written by the test is ready as it is."""
    monkeypatch.setattr(du, "preprocess_criteo", already_processed)
    return monkeypatch


@pytest.fixture
def kaggle(tmp_path, fake_data_utils):
    rows = make_rows(KAGGLE_DAY_SIZES)
    raw, processed = write_dataset(tmp_path, "kaggle", KAGGLE_DAY_SIZES, rows)
    return SimpleNamespace(raw=raw, processed=processed, rows=rows, tmp=tmp_path)


# --------------------------------------------------------------------------------------------------
# The reference's semantics, written plainly
# --------------------------------------------------------------------------------------------------

def reference_samples(rows, day_sizes, split, randomize, rng):
    """The reference CriteoDataset (non-memory-map): per-sample lists in serving order."""
    x_int, x_cat, y = rows
    offsets = np.cumsum([0] + list(day_sizes))
    indices = np.array_split(np.arange(len(y)), offsets[1:-1])
    if randomize == "day":
        for i in range(len(indices) - 1):
            indices[i] = rng.permutation(indices[i])
    train_indices = np.concatenate(indices[:-1])
    test_indices, val_indices = np.array_split(indices[-1], 2)
    if randomize == "total":
        train_indices = rng.permutation(train_indices)
    chosen = {"train": train_indices, "test": test_indices, "val": val_indices}[split]
    return [(x_int[i], x_cat[i].astype(np.float64), y[i]) for i in chosen]


# --------------------------------------------------------------------------------------------------
# In-memory (processed file) mode
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("randomize", ["none", "day", "total"])
def test_batches_and_draws_match_the_reference(kaggle, randomize):
    logs = []
    rng = np.random.RandomState(123)
    data = cd.make_criteo_data_and_loaders(config(kaggle, randomize=randomize), rng, logs.append)

    ref_rng = np.random.RandomState(123)
    train = reference_samples(kaggle.rows, KAGGLE_DAY_SIZES, "train", randomize, ref_rng)
    test = reference_samples(kaggle.rows, KAGGLE_DAY_SIZES, "test", randomize, ref_rng)
    assert_same_batches(data.train_loader, reference_batches(train, 32))
    assert_same_batches(data.test_loader, reference_batches(test, 50))
    assert len(data.train_loader) == math.ceil(sum(KAGGLE_DAY_SIZES[:-1]) / 32)
    assert len(data.test_data) == 31 and len(data.train_data) == sum(KAGGLE_DAY_SIZES[:-1])
    # same state afterwards: the train and the test construction each drew, in this order
    assert rng.randint(1 << 30) == ref_rng.randint(1 << 30)
    assert data.table_sizes == tuple(int(c) for c in COUNTS) and data.dense_dim == 13

    per_split = ["Sparse fea = 26, Dense fea = 13"]
    per_split += ["Randomized indices per day ..."] if randomize == "day" else []
    per_split += ["Defined {} indices..."]
    per_split += ["Randomized indices across days ..."] if randomize == "total" else []
    per_split += ["Split data according to indices..."]
    assert without_notes(logs) == [line.format("train") for line in per_split] + \
                                  [line.format("test") for line in per_split]
    # the compressed (reference-made) file needs a row cache: one note, when it is built
    assert [line for line in logs if line.startswith("note: ")] == [
        f"note: {kaggle.processed} is compressed or otherwise cannot be mapped in place; caching "
        f"its rows in {kaggle.tmp / 'kaggleAdDisplayChallenge_processed.rows.npy'} "
        "(160 B per sample)"]


def test_val_split_is_the_second_half_of_the_last_day(kaggle):
    split = cd.load_criteo_split(config(kaggle).preprocess, "val", np.random.RandomState(0), quiet)
    expected = reference_samples(kaggle.rows, KAGGLE_DAY_SIZES, "val", "none", None)
    assert_same_batches([split.batch(0, len(split))], reference_batches(expected, len(expected)))
    assert len(split) == 30


def test_max_ind_range_takes_ids_modulo_and_caps_table_sizes(kaggle):
    rng = np.random.RandomState(5)
    data = cd.make_criteo_data_and_loaders(config(kaggle, max_ind_range=50, randomize="total"),
                                           rng, lambda _: None)
    ref_rng = np.random.RandomState(5)
    train = reference_samples(kaggle.rows, KAGGLE_DAY_SIZES, "train", "total", ref_rng)
    assert_same_batches(data.train_loader, reference_batches(train, 32, max_ind_range=50))
    assert data.table_sizes == tuple(min(int(c), 50) for c in COUNTS)
    dense, sparse, label = data.train_data[3]                 # the reference's per-sample view
    np.testing.assert_array_equal(sparse, train[3][1] % 50)
    np.testing.assert_array_equal(dense, train[3][0])
    assert label == train[3][2]


def test_worker_processes_yield_the_same_batches(kaggle):
    cfg = config(kaggle, randomize="total", num_workers=2, test_num_workers=1)
    data = cd.make_criteo_data_and_loaders(cfg, np.random.RandomState(1), lambda _: None)
    ref_rng = np.random.RandomState(1)
    train = reference_samples(kaggle.rows, KAGGLE_DAY_SIZES, "train", "total", ref_rng)
    assert_same_batches(data.train_loader, reference_batches(train, 32))


def test_pickled_datasets_carry_no_row_data(kaggle):
    data = cd.make_criteo_data_and_loaders(config(kaggle, randomize="none"),
                                           np.random.RandomState(1), lambda _: None)
    blob = pickle.dumps(data.test_loader.dataset)
    assert len(blob) < 4096
    assert_same_batches([pickle.loads(blob)[0]], [data.test_loader.dataset[0]])


def test_row_cache_is_written_once_and_rebuilt_when_the_npz_changes(kaggle):
    rows, cache = row_cache.open_rows(kaggle.processed, quiet, progress=False)
    assert cache == str(kaggle.tmp / "kaggleAdDisplayChallenge_processed.rows.npy")
    assert isinstance(rows, np.memmap)
    assert not [name for name in os.listdir(kaggle.tmp) if ".tmp" in name]
    stamp = os.stat(cache).st_mtime_ns
    row_cache.open_rows(kaggle.processed, quiet, progress=False)
    assert os.stat(cache).st_mtime_ns == stamp                  # reused, not rewritten
    x_int, x_cat, y = make_rows([40], seed=9)
    np.savez(kaggle.processed, X_cat=x_cat, X_int=x_int, y=y, counts=COUNTS)
    os.utime(kaggle.processed, ns=(stamp + 10**9, stamp + 10**9))
    rows, _ = row_cache.open_rows(kaggle.processed, quiet, progress=False)
    np.testing.assert_array_equal(rows, np.column_stack([y, x_int, x_cat]))


def test_row_cache_falls_back_to_memory_when_the_directory_is_read_only(kaggle, monkeypatch):
    def refuse(path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(npz_io, "atomic_path", refuse)
    notes = []
    rows, cache = row_cache.open_rows(kaggle.processed, notes.append, progress=False)
    x_int, x_cat, y = kaggle.rows
    assert cache is None and "cannot write" in notes[0]
    np.testing.assert_array_equal(rows, np.column_stack([y, x_int, x_cat]))


def test_preprocessing_runs_first_and_its_output_is_used(kaggle, fake_data_utils):
    seen = []

    def preprocess(cfg, log, rng=None):
        seen.append((cfg.raw_data_file, cfg.randomize, cfg.memory_map, cfg.seed))
        np.random.RandomState(cfg.seed).random_sample(3)       # its own stream, as the real one
        return kaggle.processed

    fake_data_utils.setattr(du, "preprocess_criteo", preprocess)
    rng = np.random.RandomState(2)
    cfg = config(kaggle, processed_data_file=str(kaggle.tmp / "missing.npz"), randomize="total",
                 seed=5)
    data = cd.make_criteo_data_and_loaders(cfg, rng, lambda _: None)
    ref_rng = np.random.RandomState(2)  # the datasets' draws do not depend on preprocessing's
    train = reference_samples(kaggle.rows, KAGGLE_DAY_SIZES, "train", "total", ref_rng)
    assert_same_batches(data.train_loader, reference_batches(train, 32))
    assert seen == [(kaggle.raw, "total", False, 5)]


# --------------------------------------------------------------------------------------------------
# Uncompressed files (data_utils.py's) are mapped in place; compressed ones go through the row cache
# --------------------------------------------------------------------------------------------------

def row_caches(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".rows.npy"))


@pytest.mark.parametrize("x_cat_dtype", [np.int32, np.float64])
@pytest.mark.parametrize("memory_map", [False, True])
def test_in_place_maps_yield_the_batches_of_the_row_cache(tmp_path, fake_data_utils, memory_map,
                                                          x_cat_dtype):
    rows = make_rows(KAGGLE_DAY_SIZES, seed=6)
    loaded = {}
    for layout in ("compressed", "uncompressed"):
        (tmp_path / layout).mkdir()
        raw, processed = write_dataset(tmp_path / layout, "kaggle", KAGGLE_DAY_SIZES, rows,
                                       compressed=layout == "compressed", x_cat_dtype=x_cat_dtype)
        fixture = SimpleNamespace(raw=raw, processed=processed)
        cfg = config(fixture, memory_map=memory_map, randomize="total", max_ind_range=70)
        loaded[layout] = cd.make_criteo_data_and_loaders(cfg, np.random.RandomState(8),
                                                         lambda _: None)
    mapped, cached = loaded["uncompressed"], loaded["compressed"]
    for name in ("train_loader", "test_loader"):
        assert_same_batches(getattr(mapped, name), list(getattr(cached, name)))
    n_train = sum(KAGGLE_DAY_SIZES[:-1])
    order = (np.arange(n_train) if memory_map
             else np.random.RandomState(8).permutation(n_train))
    samples = [(rows[0][i], rows[1][i].astype(np.float64), rows[2][i]) for i in order]
    assert_same_batches(mapped.train_loader, reference_batches(samples, 32, max_ind_range=70))

    assert row_caches(tmp_path / "uncompressed") == []
    assert len(row_caches(tmp_path / "compressed")) == (6 + 1 if memory_map else 1)
    assert all(isinstance(part, criteo_rows.NpzColumns) for part in mapped.train_data.rows._arrays)
    blob = pickle.dumps(mapped.train_loader.dataset)   # what workers receive: the order, no rows
    assert len(blob) < 4096 + (0 if memory_map else order.nbytes)
    assert_same_batches([pickle.loads(blob)[5]], [mapped.train_loader.dataset[5]])


def test_workers_read_in_place_maps(tmp_path, fake_data_utils):
    rows = make_rows(KAGGLE_DAY_SIZES, seed=2)
    raw, processed = write_dataset(tmp_path, "kaggle", KAGGLE_DAY_SIZES, rows, compressed=False)
    cfg = config(SimpleNamespace(raw=raw, processed=processed), memory_map=True, num_workers=2)
    data = cd.make_criteo_data_and_loaders(cfg, np.random.RandomState(0), lambda _: None)
    samples = [(rows[0][i], rows[1][i].astype(np.float64), rows[2][i])
               for i in range(sum(KAGGLE_DAY_SIZES[:-1]))]
    assert_same_batches(data.train_loader, reference_batches(samples, 32))
    assert row_caches(tmp_path) == []


@pytest.mark.parametrize("memory_map", [False, True])
def test_both_splits_are_opened_at_start_up(tmp_path, memory_map):
    """Files deleted once the loaders exist (during training) do not end the run at its first
    test: every split's files are mapped at start-up (here files of this version, whose values
    are not read at open), and a mapping outlives its name."""
    write_raw_kaggle(tmp_path / "train.txt", 7 * 20)
    files = SimpleNamespace(raw=str(tmp_path / "train.txt"), processed=str(tmp_path / "k.npz"))
    cfg = config(files, memory_map=memory_map, randomize="day")
    first = cd.make_criteo_data_and_loaders(cfg, np.random.RandomState(0), quiet)
    expected = [list(first.train_loader), list(first.test_loader)]
    data = cd.make_criteo_data_and_loaders(cfg, np.random.RandomState(0), quiet)
    for name in os.listdir(tmp_path):
        os.remove(tmp_path / name)
    assert_same_batches(data.train_loader, expected[0])
    assert_same_batches(data.test_loader, expected[1])


@pytest.mark.parametrize("memory_map", [False, True])
def test_no_training_sample_left_is_one_error_before_the_model(tmp_path, memory_map):
    """Sub-sampling that drops every line leaves empty days and tables of no rows (the model's
    initialisation divided by zero): one error naming the files instead."""
    write_raw_kaggle(tmp_path / "train.txt", 7 * 4)
    text = (tmp_path / "train.txt").read_text().splitlines(keepends=True)
    (tmp_path / "train.txt").write_text("".join("0" + line[1:] for line in text))  # negatives
    files = SimpleNamespace(raw=str(tmp_path / "train.txt"), processed=str(tmp_path / "k.npz"))
    cfg = config(files, memory_map=memory_map, sub_sample_rate=1.0)
    shown = str(tmp_path / ("train_day_*_reordered.npz" if memory_map else "k.npz"))
    with pytest.raises(DataError, match=f"^{re.escape(shown)}: no training samples after "
                                        r"--data-sub-sample-rate=1.0$"):
        cd.make_criteo_data_and_loaders(cfg, np.random.RandomState(0), quiet)


def test_open_npz_rows_maps_any_layout_of_stored_members(tmp_path):
    x_int, x_cat, y = make_rows([37], seed=3)
    path = str(tmp_path / "odd.npz")
    np.savez(path, y=y.astype(">f8"), X_cat=np.asfortranarray(x_cat.astype(np.int64)),
             X_int=np.asfortranarray(x_int.astype(np.float64)), counts=COUNTS)
    notes = []
    rows, cache = criteo_rows.open_npz_rows(path, notes.append, progress=False)
    assert isinstance(rows, criteo_rows.NpzColumns) and cache is None and notes == []
    assert [m.fortran_order for m in rows.members] == [False, True, True]
    labels, dense, sparse = rows.read(slice(0, 37))
    for got, want in ((labels, y), (dense, x_int), (sparse, x_cat)):
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
    positions = np.array([36, 0, 5, 5, 17])
    np.testing.assert_array_equal(rows.read(positions)[2], x_cat[positions])
    assert row_caches(tmp_path) == []

    np.savez(str(tmp_path / "empty.npz"), X_int=x_int[:0], X_cat=x_cat[:0], y=y[:0])
    empty, _ = criteo_rows.open_npz_rows(str(tmp_path / "empty.npz"), quiet, progress=False)
    assert len(empty) == 0
    assert criteo_rows.PackedRows([empty, rows], [None, None]).slice(0, 2).shape == (2, 40)


def test_compressed_file_is_cached_once_and_a_stale_cache_of_a_mapped_file_removed(tmp_path):
    x_int, x_cat, y = make_rows([50], seed=5)
    path = str(tmp_path / "ref.npz")
    np.savez_compressed(path, X_int=x_int, X_cat=x_cat.astype(np.float64), y=y)
    notes = []
    rows, cache = criteo_rows.open_npz_rows(path, notes.append, progress=False)
    assert cache == str(tmp_path / "ref.rows.npy") and isinstance(rows, np.memmap)
    np.testing.assert_array_equal(rows, np.column_stack([y, x_int, x_cat]))
    criteo_rows.open_npz_rows(path, notes.append, progress=False)              # reuses the cache
    assert len(notes) == 1 and notes[0].startswith(f"note: {path} is compressed")

    np.savez(path, X_int=x_int, X_cat=x_cat.astype(np.float64), y=y)     # now uncompressed
    notes = []
    rows, cache = criteo_rows.open_npz_rows(path, notes.append, progress=False)
    assert isinstance(rows, criteo_rows.NpzColumns) and cache is None
    assert row_caches(tmp_path) == [] and notes == [
        f"note: removed {tmp_path / 'ref.rows.npy'}, not needed any more "
        f"({path} is mapped in place)"]


@pytest.mark.parametrize("key, value, shown", [
    ("X_cat", 1.5, "1.5"), ("y", 2.0**31, "2147483648.0"), ("X_int", np.nan, "nan")])
def test_non_integers_in_a_mapped_file_are_refused_when_read(tmp_path, key, value, shown):
    arrays = dict(zip(("X_int", "X_cat", "y"), (a.astype(np.float64) for a in make_rows([30]))))
    arrays[key][(20, 3) if arrays[key].ndim == 2 else 20] = value
    path = str(tmp_path / "bad.npz")
    np.savez(path, **arrays)
    rows, _ = criteo_rows.open_npz_rows(path, quiet, progress=False)
    packed = criteo_rows.PackedRows([rows], [None])
    packed.columns(0, 20)                                               # rows before it are fine
    message = rf"bad.npz: array '{key}' holds {shown}, which is not a 32-bit integer"
    with pytest.raises(DataError, match=message):
        packed.columns(16, 24)
    with pytest.raises(DataError, match=message):
        packed.take_columns(np.array([3, 20]))
    with pytest.raises(DataError, match=message):                      # the row cache, as before
        row_cache.open_rows(path, quiet, progress=False)


# --------------------------------------------------------------------------------------------------
# Memory-map (reordered day files) mode
# --------------------------------------------------------------------------------------------------

def test_memory_map_and_in_memory_modes_yield_the_same_samples(kaggle):
    in_memory = cd.make_criteo_data_and_loaders(config(kaggle), np.random.RandomState(3),
                                                lambda _: None)
    rng = np.random.RandomState(3)
    logs = []
    mapped = cd.make_criteo_data_and_loaders(config(kaggle, memory_map=True), rng, logs.append)
    assert_same_batches(mapped.train_loader, list(in_memory.train_loader))
    assert_same_batches(mapped.test_loader, list(in_memory.test_loader))
    assert rng.randint(1 << 30) == np.random.RandomState(3).randint(1 << 30)   # no draws
    assert without_notes(logs) == ["Sparse features= 26, Dense features= 13"] * 2
    assert mapped.table_sizes == in_memory.table_sizes


def test_memory_map_works_in_any_access_order(kaggle):
    data = cd.make_criteo_data_and_loaders(config(kaggle, memory_map=True, batch_size=45),
                                           np.random.RandomState(0), lambda _: None)
    x_int, x_cat, y = kaggle.rows
    n_train = sum(KAGGLE_DAY_SIZES[:-1])
    samples = [(x_int[i], x_cat[i].astype(np.float64), y[i]) for i in range(n_train)]
    expected = reference_batches(samples, 45)          # batches 3, 6, ... span day boundaries
    batches = data.train_loader.dataset
    order = np.random.RandomState(7).permutation(len(batches))
    assert_same_batches([batches[int(k)] for k in order], [expected[k] for k in order])
    sampler = torch.utils.data.RandomSampler(batches)
    shuffled = cd._torch_loader(batches, num_workers=2, sampler=sampler)
    seen = sorted(tuple(b.labels.flatten().tolist()) + tuple(b.indices[0].tolist())
                  for b in shuffled)
    assert seen == sorted(tuple(b.labels.flatten().tolist()) + tuple(b.indices[0].tolist())
                          for b in expected)


def test_packed_rows_read_across_parts_like_one_array():
    parts = [np.arange(k * 40, (k + n) * 40, dtype=np.int32).reshape(n, 40)
             for k, n in ((0, 5), (5, 0), (5, 7), (12, 3))]
    whole = np.concatenate(parts)
    rows = pickle.loads(pickle.dumps(criteo_rows.PackedRows(parts, [None] * 4)))
    positions = np.random.RandomState(0).randint(0, 15, size=30)
    np.testing.assert_array_equal(rows.take(positions), whole[positions])
    for start, stop in ((0, 15), (3, 6), (5, 12), (4, 13), (12, 15), (7, 7)):
        np.testing.assert_array_equal(rows.slice(start, stop), whole[start:stop])


def test_day_file_with_the_wrong_number_of_rows_is_refused(kaggle):
    x_int, x_cat, y = make_rows([10], seed=4)
    bad = str(kaggle.tmp / "train_day_2_reordered.npz")
    np.savez_compressed(bad, X_cat=x_cat.astype(np.float64), X_int=x_int.astype(np.float64),
                        y=y.astype(np.float64))
    with pytest.raises(DataError, match=r"train_day_2_reordered.npz: 10 samples, but .*"
                                        r"train_day_count.npz counts 130 for day 2"):
        cd.make_criteo_data_and_loaders(config(kaggle, memory_map=True),
                                        np.random.RandomState(0), lambda _: None)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("memory_map", [False, True])
@pytest.mark.parametrize("column, value, message", BAD_VALUES)
def test_processed_files_from_elsewhere_are_checked_at_open(tmp_path, fake_data_utils, memory_map,
                                                             column, value, message):
    x_int, x_cat, y = make_rows(KAGGLE_DAY_SIZES, seed=3)
    packed = np.column_stack([y, x_int, x_cat])
    row = KAGGLE_DAY_SIZES[0] + 37  # day 1, row 37
    packed[row, column] = value
    rows = (packed[:, 1:14].astype(np.int32), packed[:, 14:], packed[:, 0].astype(np.int32))
    raw, processed = write_dataset(tmp_path, "kaggle", KAGGLE_DAY_SIZES, rows)
    where = f"{tmp_path / 'train_day_1_reordered.npz'}: row 37" if memory_map else \
        f"{processed}: row {row}"
    cfg = config(SimpleNamespace(raw=raw, processed=processed), memory_map=memory_map)
    with pytest.raises(DataError, match=f"^{where}: {message}"):
        cd.make_criteo_data_and_loaders(cfg, np.random.RandomState(0), quiet)


def test_files_with_a_provenance_record_are_not_read_at_open(tmp_path, monkeypatch):
    write_raw_kaggle(tmp_path / "train.txt", 7 * 20)
    files = SimpleNamespace(raw=str(tmp_path / "train.txt"), processed=str(tmp_path / "k.npz"))
    for memory_map in (False, True):
        cfg = config(files, memory_map=memory_map)
        cd.make_criteo_data_and_loaders(cfg, np.random.RandomState(0), quiet)
        monkeypatch.setattr(criteo_rows, "check_values", lambda *args: pytest.fail("checked our file"))
        cd.make_criteo_data_and_loaders(cfg, np.random.RandomState(0), quiet)
        monkeypatch.undo()


def test_missing_day_count_file_is_named(kaggle):
    os.remove(kaggle.tmp / "train_day_count.npz")
    with pytest.raises(DataError, match=r"train_day_count.npz: file not found"):
        cd.make_criteo_data_and_loaders(config(kaggle), np.random.RandomState(0), lambda _: None)


def test_processed_file_disagreeing_with_day_counts_is_refused(kaggle):
    np.savez_compressed(kaggle.tmp / "train_day_count.npz",
                        total_per_file=np.array(KAGGLE_DAY_SIZES) + 1)
    with pytest.raises(DataError, match=r"kaggleAdDisplayChallenge_processed.npz: 966 samples, "
                                        r"but .*train_day_count.npz counts 973"):
        cd.make_criteo_data_and_loaders(config(kaggle), np.random.RandomState(0), lambda _: None)


def test_non_integer_or_misshapen_arrays_are_refused(tmp_path):
    x_int, x_cat, y = make_rows([5])
    fractional = x_cat.astype(np.float64)
    fractional[2, 3] = 1.5
    np.savez(tmp_path / "frac.npz", X_int=x_int, X_cat=fractional, y=y)
    with pytest.raises(DataError, match=r"frac.npz: array 'X_cat' holds 1.5, which is not a 32-bit"):
        row_cache.open_rows(str(tmp_path / "frac.npz"), quiet, progress=False)
    np.savez(tmp_path / "shape.npz", X_int=x_int[:, :12], X_cat=x_cat, y=y)
    with pytest.raises(DataError, match=r"shape.npz: array 'X_int' has shape \(5, 12\), "
                                        r"expected \(5, 13\)"):
        row_cache.open_rows(str(tmp_path / "shape.npz"), quiet, progress=False)
    np.savez(tmp_path / "nolabel.npz", X_int=x_int, X_cat=x_cat)
    with pytest.raises(DataError, match=r"nolabel.npz: no array 'y'"):
        row_cache.open_rows(str(tmp_path / "nolabel.npz"), quiet, progress=False)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".npy") or ".tmp" in name]


@pytest.mark.parametrize("overrides, message", [
    (dict(data_set="criteo"), "--data-set must be kaggle or terabyte, got 'criteo'"),
    (dict(randomize="all"), "--data-randomize must be total, day or none, got 'all'"),
    (dict(batch_size=0), "--mini-batch-size must be at least 1, got 0"),
    (dict(mlperf_bin_loader=True), "--mlperf-bin-loader needs --data-set=terabyte"),
    (dict(mlperf_bin_shuffle=True), "--mlperf-bin-shuffle needs --mlperf-bin-loader"),
])
def test_bad_flags_are_refused(kaggle, overrides, message):
    """The configs refuse them when made, in the run's words (its flags name the fields)."""
    with pytest.raises(ConfigError) as refused:
        cd.make_criteo_data_and_loaders(config(kaggle, **overrides), np.random.RandomState(0), quiet)
    assert describe(refused.value, build_parser()).startswith(message)


# --------------------------------------------------------------------------------------------------
# End to end through the real preprocessing (data_utils.py): raw text -> batches
# --------------------------------------------------------------------------------------------------

def write_raw_kaggle(path, lines, seed=0):
    """A small fake raw train.txt and its plain reading: (labels, dense, raw hash values)."""
    fake_kaggle(path, lines, seed)
    (labels, dense, hashes), = plain_parse([read_lines(path)], 0.0, -1, None)
    return np.array(labels), np.maximum(np.array(dense), 0), np.array(hashes)  # dense clamped at 0


def first_seen_ids(values):
    """Per column, ids 0.. in order of first appearance (the reference's dictionaries)."""
    ids = np.empty_like(values)
    for col in range(values.shape[1]):
        table = {}
        for row, value in enumerate(values[:, col]):
            ids[row, col] = table.setdefault(value, len(table))
    return ids


@pytest.mark.parametrize("memory_map", [False, True])
def test_end_to_end_from_raw_text(tmp_path, memory_map):
    pytest.importorskip("data_utils")
    lines = 7 * 30 + 4                                   # day sizes 31, 31, 31, 31, 30, 30, 30
    labels, dense, hashes = write_raw_kaggle(tmp_path / "train.txt", lines)
    files = SimpleNamespace(raw=str(tmp_path / "train.txt"), processed=str(tmp_path / "k.npz"))
    cfg = config(files, memory_map=memory_map, batch_size=16, test_batch_size=7)
    rng = np.random.RandomState(123)
    data = cd.make_criteo_data_and_loaders(cfg, rng, lambda _: None)
    samples = list(zip(dense, first_seen_ids(hashes).astype(np.float64), labels))
    assert_same_batches(data.train_loader, reference_batches(samples[:4 * 31 + 2 * 30], 16))
    assert_same_batches(data.test_loader, reference_batches(samples[4 * 31 + 2 * 30:][:15], 7))
    assert data.table_sizes == tuple(len(set(column)) for column in hashes.T)
    assert rng.randint(1 << 30) == np.random.RandomState(123).randint(1 << 30)   # nothing drawn
    assert row_caches(tmp_path) == []                   # data_utils.py's files are mapped in place
