"""Tests of the Terabyte loaders: the MLPerf binary files (dlrm/data/criteo/bins.py) and the day-file
stream, on tiny processed datasets written in tmp_path in the reference's formats."""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dlrm.common import DataError
from dlrm.data.criteo import bins
from dlrm.data.criteo import loaders as cd
from dlrm.data.criteo import preprocess as du
from dlrm.data.criteo import rows as criteo_rows
from dlrm.data.criteo.schema import NUM_FIELDS
from dlrm.io import provenance
from helpers.criteo_loaders import (BAD_VALUES, COUNTS, already_processed, assert_same_batches, config, make_rows,
                                    quiet, reference_batches, reference_paths, write_dataset)

TERABYTE_DAY_SIZES = [20 + 3 * d for d in range(23)] + [37]


@pytest.fixture
def terabyte(tmp_path, monkeypatch):
    monkeypatch.setattr(du, "preprocess_criteo", already_processed)  # the data written here is ready
    rows = make_rows(TERABYTE_DAY_SIZES, seed=1)
    raw, processed = write_dataset(tmp_path, "terabyte", TERABYTE_DAY_SIZES, rows)
    return SimpleNamespace(raw=raw, processed=processed, rows=rows, tmp=tmp_path)


def terabyte_config(fixture, **overrides):
    return config(fixture, data_set="terabyte", memory_map=True, mlperf_logging=True,
                  batch_size=64, test_batch_size=10, **overrides)


def day_file_samples(fixture, days):
    """The reference's day-file loader: the selected reordered day files loaded whole, concatenated."""
    samples = []
    for day in days:
        with np.load(reference_paths("terabyte", fixture.raw).reordered_day(day)) as data:
            samples += list(zip(data["X_int"], data["X_cat"], data["y"]))
    return samples


def test_terabyte_day_stream_concatenates_days(terabyte):
    data = cd.make_criteo_data_and_loaders(terabyte_config(terabyte), np.random.RandomState(0),
                                           lambda _: None)
    assert isinstance(data.train_loader, cd.CriteoDayStream)
    train = day_file_samples(terabyte, range(23))
    assert_same_batches(data.train_loader, reference_batches(train, 64))
    assert_same_batches(data.test_loader,
                        reference_batches(day_file_samples(terabyte, [23])[:19], 10))
    assert len(data.train_loader) == math.ceil(sum(TERABYTE_DAY_SIZES[:-1]) / 64)


def test_binary_files_round_trip(terabyte):
    paths = reference_paths("terabyte", terabyte.raw)
    outputs = {split: str(terabyte.tmp / f"rt_{split}.bin") for split in bins.SPLITS}
    bins.write_criteo_bins([paths.reordered_day(d) for d in range(24)], outputs, progress=False)
    x_int, x_cat, y = terabyte.rows
    source = np.column_stack([y, x_int, x_cat]).astype(np.int32)
    n_train = sum(TERABYTE_DAY_SIZES[:-1])
    expected = {"train": source[:n_train], "test": source[n_train:n_train + 19],
                "val": source[n_train + 19:]}
    for split, path in outputs.items():
        stored = np.fromfile(path, dtype="<i4").reshape(-1, 40)
        np.testing.assert_array_equal(stored, expected[split])
    reader = bins.CriteoBinDataset(outputs["train"], batch_size=100, max_ind_range=20)
    samples = [(r[1:14], r[14:].astype(np.float64), r[0]) for r in expected["train"]]
    assert reader.num_samples == n_train and len(reader) == math.ceil(n_train / 100)
    assert_same_batches([reader[k] for k in range(len(reader))],
                        reference_batches(samples, 100, max_ind_range=20))
    assert not [name for name in os.listdir(terabyte.tmp) if ".tmp" in name]


def test_binary_file_of_the_wrong_size_is_refused(tmp_path):
    bad = tmp_path / "broken_train.bin"
    bad.write_bytes(b"\0" * 161)
    with pytest.raises(DataError, match=r"broken_train.bin: size 161 bytes is not a multiple "
                                        r"of the 160-byte record"):
        bins.CriteoBinDataset(str(bad), batch_size=4)
    with pytest.raises(DataError, match="nothing.bin: file not found"):
        bins.CriteoBinDataset(str(tmp_path / "nothing.bin"), batch_size=4)
    os.mkfifo(tmp_path / "pipe.bin")  # its size reads 0: it would pass for an empty file
    with pytest.raises(DataError, match=r"pipe.bin: is a named pipe \(FIFO\), not a binary data"):
        bins.CriteoBinDataset(str(tmp_path / "pipe.bin"), batch_size=4)


def test_binary_file_is_mapped_at_open(tmp_path):
    """A binary file removed during training is still read: it was mapped at start-up."""
    records = np.arange(3 * NUM_FIELDS, dtype="<i4").reshape(3, NUM_FIELDS) % 2
    (tmp_path / "t.bin").write_bytes(records.tobytes())
    dataset = bins.CriteoBinDataset(str(tmp_path / "t.bin"), batch_size=2)
    os.remove(tmp_path / "t.bin")
    assert_same_batches([dataset[1]], [criteo_rows.rows_to_batch(records[2:])])


@pytest.mark.parametrize("column, value, message", BAD_VALUES)
def test_binary_file_from_elsewhere_is_checked_at_open(tmp_path, column, value, message):
    x_int, x_cat, y = make_rows([3000], seed=4)
    records = np.column_stack([y, x_int, x_cat]).astype("<i4")
    records[2345, column] = value
    path = tmp_path / "day_train.bin"
    records.tofile(path)
    with pytest.raises(DataError, match=f"^{path}: row 2345: {message}"):
        bins.CriteoBinDataset(str(path), batch_size=64, counts=COUNTS)
    records[2345, column] = records[2344, column]
    records.tofile(path)
    assert bins.CriteoBinDataset(str(path), batch_size=64, counts=COUNTS).num_samples == 3000


def test_bin_files_alone_are_used_as_they_are_and_checked(tmp_path, terabyte):
    cfg = terabyte_config(terabyte, mlperf_bin_loader=True)
    cd.make_criteo_data_and_loaders(cfg, np.random.RandomState(0), quiet)
    for day in range(24):
        os.remove(reference_paths("terabyte", terabyte.raw).reordered_day(day))
    train_bin = str(terabyte.tmp / "terabyte_processed_train.bin")
    os.remove(provenance.record_path(train_bin))  # as if the reference had written it
    logs = []
    data = cd.make_criteo_data_and_loaders(cfg, np.random.RandomState(0), logs.append)
    assert logs == [f"note: the raw data and the reordered day files are missing; using "
                    f"{train_bin} and {terabyte.tmp / 'terabyte_processed_test.bin'} as they are "
                    "(what they were made from cannot be checked)"]
    assert len(list(data.train_loader)) == len(data.train_loader)
    records = np.fromfile(train_bin, dtype="<i4").reshape(-1, 40)
    records[17, 0] = 5
    records.tofile(train_bin)
    with pytest.raises(DataError, match=f"{train_bin}: row 17: label 5, expected 0 or 1"):
        cd.make_criteo_data_and_loaders(cfg, np.random.RandomState(0), quiet)


def test_bin_files_made_from_day_files_from_elsewhere_are_checked(terabyte):
    paths = reference_paths("terabyte", terabyte.raw)
    x_int, x_cat, y = make_rows([20], seed=9)
    x_cat[11, 25] = COUNTS[25]  # one past the end of the last table, in day 0
    np.savez_compressed(paths.reordered_day(0), X_cat=x_cat.astype(np.float64),
                        X_int=x_int.astype(np.float64), y=y.astype(np.float64))
    train_bin = terabyte.tmp / "terabyte_processed_train.bin"
    with pytest.raises(DataError, match=f"^{train_bin}: row 11: sparse feature C26 has id 142"):
        cd.make_criteo_data_and_loaders(terabyte_config(terabyte, mlperf_bin_loader=True),
                                        np.random.RandomState(0), quiet)


def test_bin_files_are_rewritten_when_the_day_files_change(terabyte):
    cfg = terabyte_config(terabyte, mlperf_bin_loader=True)
    cd.make_criteo_data_and_loaders(cfg, np.random.RandomState(0), quiet)
    paths = reference_paths("terabyte", terabyte.raw)
    x_int, x_cat, y = make_rows([37], seed=9)  # another last day
    np.savez_compressed(paths.reordered_day(23), X_cat=x_cat.astype(np.float64),
                        X_int=x_int.astype(np.float64), y=y.astype(np.float64))
    logs = []
    data = cd.make_criteo_data_and_loaders(cfg, np.random.RandomState(0), logs.append)
    test_bin, val_bin = (terabyte.tmp / f"terabyte_processed_{split}.bin" for split in ("test", "val"))
    assert [line.split(" was made from day_23_reordered.npz of ")[0] for line in logs] == [
        f"note: {test_bin}", f"note: {val_bin}", f"Writing binary files {test_bin}, {val_bin}"]
    # (train.bin, made from the other days, is as it was)
    samples = list(zip(x_int, x_cat.astype(np.float64), y))[:19]
    assert_same_batches(data.test_loader, reference_batches(samples, 10))


def test_bin_loader_writes_missing_files_and_serves_batches(terabyte):
    cfg = terabyte_config(terabyte, mlperf_bin_loader=True, mlperf_bin_shuffle=True)
    data = cd.make_criteo_data_and_loaders(cfg, np.random.RandomState(0), lambda _: None)
    assert data.train_data.num_samples == sum(TERABYTE_DAY_SIZES[:-1])  # the reference lacks it
    assert os.path.exists(str(terabyte.tmp / "terabyte_processed_val.bin"))
    expected = reference_batches(day_file_samples(terabyte, range(23)), 64)
    torch.manual_seed(0)                  # the reference's DataLoader over a RandomSampler
    batch_ids = range(len(expected))
    order = list(torch.utils.data.DataLoader(batch_ids, batch_size=None,
                                             sampler=torch.utils.data.RandomSampler(batch_ids)))
    assert sorted(order) == list(batch_ids) and order != list(batch_ids)
    torch.manual_seed(0)
    assert_same_batches(data.train_loader, [expected[k] for k in order])
    assert_same_batches(data.test_loader,
                        reference_batches(day_file_samples(terabyte, [23])[:19], 10))
    assert data.table_sizes == tuple(int(c) for c in COUNTS)

