"""Tiny processed Criteo data sets in the reference's formats, a stand-in for the preprocessing, and
the reference's batches written plainly, for the loader tests."""
from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import numpy as np
import torch

from dlrm.common import Batch
from dlrm.data.criteo import loaders as cd
from dlrm.data.criteo import preprocess as du
from dlrm.data.criteo.config import criteo_paths

COUNTS = np.array([13, 7, 300, 250, 5, 24, 40, 60, 3, 90, 55, 280, 31, 27, 149, 270, 10, 56,
                   21, 4, 290, 18, 15, 120, 105, 142], dtype=np.int32)

BAD_VALUES = [  # (column of a packed row, value, message after "row N: ")
    (0, 2, "label 2, expected 0 or 1"),
    (0, -1, "label -1, expected 0 or 1"),
    (1 + 4, -3, r"dense feature I5 is -3, expected >= 0"),
    (14 + 2, 300, "sparse feature C3 has id 300, outside the 300 of its table"),
    (14 + 0, -1, "sparse feature C1 has id -1, outside the 13 of its table"),
]


def make_rows(day_sizes, seed=0):
    """Random (X_int int32 (n, 13), X_cat int64 (n, 26), y int32 (n,)) with ids below COUNTS."""
    gen = np.random.default_rng(seed)
    n = sum(day_sizes)
    x_int = gen.integers(0, 1000, size=(n, 13), dtype=np.int32)
    x_int[gen.random((n, 13)) < 0.3] = 0
    x_int[0, 0] = 23_159_456                     # above 2**24: float32 rounding as the reference
    x_cat = (gen.random((n, 26)) * COUNTS).astype(np.int64)
    y = gen.integers(0, 2, size=n, dtype=np.int32)
    return x_int, x_cat, y


def reference_paths(data_set, raw_data_file):
    """The reference's file names, written out literally for the tests."""
    d_path = os.path.dirname(raw_data_file) + "/"
    base = os.path.basename(raw_data_file)
    d_file = base.split(".")[0] if data_set == "kaggle" else base
    npzfile = d_path + d_file + ("_day" if data_set == "kaggle" else "")
    return SimpleNamespace(
        d_path=d_path, d_file=d_file, npzfile=npzfile, days=7 if data_set == "kaggle" else 24,
        day_count_file=lambda: d_path + d_file + "_day_count.npz",
        fea_count_file=lambda: d_path + d_file + "_fea_count.npz",
        reordered_day=lambda i: f"{npzfile}_{i}_reordered.npz",
        output_file=lambda: d_path + ("kaggleAdDisplayChallenge_processed.npz"
                                      if data_set == "kaggle" else "terabyte_processed.npz"))


def write_dataset(tmp_path, data_set, day_sizes, rows, compressed=True, x_cat_dtype=np.float64):
    """Write day counts, feature counts, the all-days processed npz and the reordered day files.

    compressed=True: as the reference writes them (np.savez_compressed); False: uncompressed, as
    data_utils.py writes them. X_cat is stored as ``x_cat_dtype``, X_int and y of the reordered
    files as float64.
    """
    x_int, x_cat, y = rows
    raw = str(tmp_path / ("train.txt" if data_set == "kaggle" else "day"))
    paths = reference_paths(data_set, raw)
    save = np.savez_compressed if compressed else np.savez
    np.savez_compressed(paths.day_count_file(), total_per_file=np.array(day_sizes))
    np.savez_compressed(paths.fea_count_file(), counts=COUNTS)
    save(paths.output_file(), X_cat=x_cat.astype(x_cat_dtype), X_int=x_int, y=y, counts=COUNTS)
    bounds = np.cumsum([0] + list(day_sizes))
    for day in range(len(day_sizes)):
        part = slice(bounds[day], bounds[day + 1])
        save(paths.reordered_day(day), X_cat=x_cat[part].astype(x_cat_dtype),
             X_int=x_int[part].astype(np.float64), y=y[part].astype(np.float64))
    return raw, paths.output_file()


def without_notes(logs):
    """The log lines the reference prints: ours (about row caches) start with 'note: '."""
    return [line for line in logs if not line.startswith("note: ")]


def quiet(message):
    """A log that drops every message."""


def already_processed(cfg, log, rng=None):
    """What preprocess_criteo returns when every file is there: the file (or stem) to read."""
    paths = criteo_paths(cfg.data_set, cfg.raw_data_file)
    return paths.npzfile if cfg.memory_map else cfg.processed_data_file or paths.output_file()


def reference_batches(samples, batch_size, max_ind_range=-1):
    """Python batching plus the reference's collate, one row at a time."""
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        dense = torch.stack([torch.log(torch.tensor(s[0], dtype=torch.float) + 1) for s in chunk])
        cats = [s[1] % max_ind_range if max_ind_range > 0 else s[1] for s in chunk]
        sparse = torch.tensor(np.array(cats), dtype=torch.long).t()
        offsets = torch.stack([torch.tensor(range(len(chunk)))] * sparse.shape[0])
        labels = torch.tensor([float(s[2]) for s in chunk], dtype=torch.float32).view(-1, 1)
        batches.append(Batch(dense, offsets, sparse, labels))
    return batches


def assert_same_batches(actual, expected):
    actual = list(actual)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        for name in Batch._fields:
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == b.dtype and a.shape == b.shape, name
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def config(fixture, **overrides):
    """A CriteoLoaderConfig; ``overrides`` may name fields of it or of its PreprocessConfig."""
    fields = dict(data_set="kaggle", raw_data_file=fixture.raw,
                  processed_data_file=fixture.processed, batch_size=32, test_batch_size=50,
                  randomize="none", progress=False)
    fields.update(overrides)
    loader_fields = {f.name for f in dataclasses.fields(cd.CriteoLoaderConfig)}
    loader = {name: fields.pop(name) for name in list(fields) if name in loader_fields}
    return cd.CriteoLoaderConfig(preprocess=du.PreprocessConfig(**fields), **loader)
