"""Criteo Kaggle / Terabyte datasets and loaders.

Every loader yields ``dlrm_common.Batch`` objects that are whole mini-batches cut from arrays: no
per-sample Python work and no per-row Python objects (the reference indexes one sample at a time,
holds every row as a Python object and collates each batch in Python).

Dimension vocabulary: B samples in a batch, T = 26 tables (sparse features), M = 13 dense features,
R = 1 + M + T = 40 columns of a packed row.

The files they read and how: :mod:`.rows` (npz files mapped in place, values checked),
:mod:`.row_cache` (files that cannot be), :mod:`.bins` (the MLPerf binary files).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Tuple

import numpy as np
from torch.utils.data import DataLoader, Dataset, RandomSampler

from dlrm.common import Batch, DataError, FlagError
from dlrm.data.config import check_batching
from dlrm.data.criteo import preprocess
from dlrm.data.criteo.bins import CriteoBinDataset, bin_file_paths, bins_alone, unchecked, write_stale_bins
from dlrm.data.criteo.config import PreprocessConfig
from dlrm.data.criteo.rows import PackedRows, check_from_elsewhere, columns_to_batch, open_npz_rows
from dlrm.data.criteo.schema import NUM_DENSE, NUM_SPARSE
from dlrm.io.npz import load_npz_array

# columns_to_batch is imported from here by dlrm.reference_api
__all__ = ["CriteoData", "CriteoLoaderConfig", "columns_to_batch", "load_criteo_split", "make_criteo_data_and_loaders"]


@dataclass(frozen=True)
class CriteoLoaderConfig:
    """What the Criteo loaders need from the command line (flag names in the comments).

    ``preprocess`` holds the data flags (what to read or preprocess, and how); the rest say how
    to serve it. A negative ``test_batch_size`` / ``test_num_workers`` means "same as training",
    as the reference's -1 defaults do.
    """

    preprocess: PreprocessConfig        # --data-set, --raw-data-file, --processed-data-file, ...
    batch_size: int = 1                 # --mini-batch-size
    test_batch_size: int = 1            # --test-mini-batch-size
    num_workers: int = 0                # --num-workers
    test_num_workers: int = 0           # --test-num-workers
    mlperf_logging: bool = False        # --mlperf-logging
    mlperf_bin_loader: bool = False     # --mlperf-bin-loader
    mlperf_bin_shuffle: bool = False    # --mlperf-bin-shuffle

    def __post_init__(self):
        """Raise FlagError for values the loaders cannot honour, naming the flags (the parser's dests)."""
        check_batching(self.batch_size, self.num_workers, self.test_batch_size, self.test_num_workers)
        data = self.preprocess
        if self.mlperf_bin_loader and not (self.mlperf_logging and data.memory_map and data.data_set == "terabyte"):
            raise FlagError("{mlperf_bin_loader} needs {data_set}=terabyte, {memory_map} and {mlperf_logging}")
        if self.mlperf_bin_loader and not data.processed_data_file:
            raise FlagError("{mlperf_bin_loader} needs {processed_data_file} (the .bin files are named after it)")
        if self.mlperf_bin_shuffle and not self.mlperf_bin_loader:
            raise FlagError("{mlperf_bin_shuffle} needs {mlperf_bin_loader}")


class CriteoData(NamedTuple):
    """Datasets and loaders of one run. ``len(loader)`` is its number of batches."""

    train_data: object
    train_loader: Iterable[Batch]
    test_data: object
    test_loader: Iterable[Batch]
    table_sizes: Tuple[int, ...]   # the T counts, each capped at max_ind_range when > 0
    dense_dim: int                 # M


def _keep_batch(item: Batch) -> Batch:
    """DataLoader conversion for datasets whose items are already whole batches."""
    return item


class CriteoSplit:
    """One split (train, test or val) of a Criteo dataset: the reference's ``CriteoDataset``.

    Sample p is row ``order[p]`` of ``rows`` when an order is given (randomized training data),
    else row ``start + p``. Loaders read it by whole batches through ``batch()``.

    Attributes:
        num_samples: samples in the split (also ``len()``).
        counts: (T,) distinct values per sparse feature, as stored with the data.
        dense_dim: M.
        max_ind_range: sparse ids are taken modulo it when > 0.
    """

    def __init__(self, rows: PackedRows, start: int, stop: int, order: Optional[np.ndarray],
                 counts: np.ndarray, max_ind_range: int):
        self.rows = rows
        self.start = start
        self.order = order
        self.num_samples = len(order) if order is not None else stop - start
        self.counts = counts
        self.dense_dim = NUM_DENSE
        self.max_ind_range = max_ind_range

    def __len__(self) -> int:
        return self.num_samples

    @property
    def m_den(self) -> int:
        """M under the reference's name (its scripts read ``train_data.m_den``)."""
        return self.dense_dim

    @property
    def n_emb(self) -> int:
        """T under the reference's name."""
        return len(self.counts)

    def __getitem__(self, position: int) -> Tuple[np.ndarray, np.ndarray, np.float32]:
        """Sample ``position`` as the reference returns it: (dense (M,), sparse ids (T,), label)."""
        if not 0 <= position < self.num_samples:
            raise IndexError(f"sample {position} out of range 0..{self.num_samples - 1}")
        labels, dense, sparse = self._columns(position, position + 1)
        sparse = sparse[0].astype(np.int64)
        if self.max_ind_range > 0:
            sparse %= self.max_ind_range
        return dense[0].copy(), sparse, np.float32(labels[0])

    def _columns(self, first: int, last: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.order is None:
            return self.rows.columns(self.start + first, self.start + last)
        return self.rows.take_columns(self.order[first:last])

    def batch(self, first: int, last: int) -> Batch:
        """Samples [first, last) as one Batch of B = last - first samples."""
        return columns_to_batch(*self._columns(first, last), max_ind_range=self.max_ind_range)


class CriteoBatches(Dataset):
    """Map-style dataset whose item k is batch k of a split (samples [kB, (k+1)B), the last one
    partial), for ``DataLoader(batch_size=None)``. Any access order and any number of workers."""

    def __init__(self, split: CriteoSplit, batch_size: int):
        self.split = split
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(self.split.num_samples / self.batch_size)

    def __getitem__(self, k: int) -> Batch:
        if not 0 <= k < len(self):
            raise IndexError(f"batch {k} out of range 0..{len(self) - 1}")
        first = k * self.batch_size
        return self.split.batch(first, min(first + self.batch_size, self.split.num_samples))


class CriteoDayStream:
    """The Terabyte day-file streaming loader: the split's days read in order, consecutive
    B-sized batches that run across day boundaries, the last one partial. Single process."""

    def __init__(self, split: CriteoSplit, batch_size: int):
        self._batches = CriteoBatches(split, batch_size)

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[Batch]:
        for k in range(len(self._batches)):
            yield self._batches[k]


def reference_split(day_counts: np.ndarray, split: str, randomize: str,
                    rng: np.random.RandomState,
                    log: Callable[[str], None]) -> Tuple[int, int, Optional[np.ndarray]]:
    """Rows of the processed (all-days) file forming ``split``, with the reference's draws.

    Train = days 0..D-2; the last day is split with ``array_split``: test = first ceil(n/2) rows,
    val = the rest. Draws from ``rng``, whatever the split (the reference's train and test datasets
    each draw): ``day`` -> one permutation per training day; ``total`` -> one permutation of the
    concatenated training rows.

    Returns:
        (start, stop, order): the split is rows [start, stop) in order when ``order`` is None,
        else the rows ``order`` (a permutation of [start, stop)) in that order.
    """
    bounds = np.concatenate(([0], np.cumsum(day_counts))).astype(np.int64)
    days = np.array_split(np.arange(bounds[-1], dtype=np.int64), bounds[1:-1])
    if randomize == "day":
        for day in range(len(days) - 1):
            days[day] = rng.permutation(days[day])
        log("Randomized indices per day ...")
    train = np.concatenate(days[:-1])
    log(f"Defined {split} indices...")
    if randomize == "total":
        train = rng.permutation(train)
        log("Randomized indices across days ...")
    first_test, end = int(bounds[-2]), int(bounds[-1])
    first_val = first_test + math.ceil((end - first_test) / 2)
    if split == "test":
        return first_test, first_val, None
    if split == "val":
        return first_val, end, None
    return 0, first_test, (None if randomize == "none" else train)


def _day_counts(path: str, days: int) -> np.ndarray:
    """(D,) samples per day from ``<...>_day_count.npz`` (key ``total_per_file``)."""
    counts = load_npz_array(path, "total_per_file")
    if counts.shape != (days,):
        raise DataError(f"{path}: total_per_file has shape {counts.shape}, expected ({days},)")
    return counts.astype(np.int64)


def _feature_counts(path: str) -> np.ndarray:
    """(T,) distinct values per sparse feature (key ``counts``)."""
    counts = load_npz_array(path, "counts")
    if counts.shape != (NUM_SPARSE,):
        raise DataError(f"{path}: counts has shape {counts.shape}, expected ({NUM_SPARSE},)")
    return counts.astype(np.int64)


def _processed_file_split(cfg: PreprocessConfig, paths, processed_file: str, split: str,
                          rng: np.random.RandomState, log: Callable[[str], None]) -> CriteoSplit:
    """A split of the all-days processed npz (the reference's non-memory-map CriteoDataset)."""
    rows, cache = open_npz_rows(processed_file, log, cfg.progress)
    counts = _feature_counts(processed_file)
    log(f"Sparse fea = {len(counts)}, Dense fea = {NUM_DENSE}")
    day_counts = _day_counts(paths.day_count_file(), paths.days)
    if day_counts.sum() != len(rows):
        raise DataError(f"{processed_file}: {len(rows)} samples, but "
                        f"{paths.day_count_file()} counts {day_counts.sum()}")
    start, stop, order = reference_split(day_counts, split, cfg.randomize, rng, log)
    log("Split data according to indices...")
    packed = PackedRows([rows], [cache])
    check_from_elsewhere(packed, 0, processed_file, start, stop, counts)
    return CriteoSplit(packed, start, stop, order, counts, cfg.max_ind_range)


def _day_files_split(cfg: PreprocessConfig, paths, split: str,
                     log: Callable[[str], None]) -> CriteoSplit:
    """A split of the reordered day files (the reference's memory-map CriteoDataset); no draws.

    Train = days 0..D-2 in order; test / val = first ceil(n/2) / remaining rows of day D-1.
    """
    day_counts = _day_counts(paths.day_count_file(), paths.days)
    counts = _feature_counts(paths.fea_count_file())
    log(f"Sparse features= {len(counts)}, Dense features= {NUM_DENSE}")
    days = range(paths.days - 1) if split == "train" else [paths.days - 1]
    arrays, caches = [], []
    for day in days:
        rows, cache = open_npz_rows(paths.reordered_day(day), log, cfg.progress)
        if len(rows) != day_counts[day]:
            raise DataError(f"{paths.reordered_day(day)}: {len(rows)} samples, but "
                            f"{paths.day_count_file()} counts {day_counts[day]} for day {day}")
        arrays.append(rows)
        caches.append(cache)
    rows = PackedRows(arrays, caches)
    first_val = math.ceil(len(rows) / 2)
    start, stop = {"train": (0, len(rows)), "test": (0, first_val),
                   "val": (first_val, len(rows))}[split]
    for part, day in enumerate(days):
        check_from_elsewhere(rows, part, paths.reordered_day(day), start, stop, counts)
    return CriteoSplit(rows, start, stop, None, counts, cfg.max_ind_range)


# --------------------------------------------------------------------------------------------------
# Preprocessing hook and loader selection
# --------------------------------------------------------------------------------------------------

def _ensure_processed(cfg: PreprocessConfig, log: Callable[[str], None],
                      rng: Optional[np.random.RandomState] = None) -> str:
    """Run the preprocessing stages whose files cannot be reused (none draws when everything is
    done); the processed file to read: --processed-data-file when given (the preprocessing also
    writes that name, which the reference never did, so first and later runs read the same
    file), else the preprocessing's own output name."""
    return preprocess.preprocess_criteo(cfg, log, rng)


def load_criteo_split(cfg: PreprocessConfig, split: str, rng: np.random.RandomState,
                      log: Callable[[str], None]) -> CriteoSplit:
    """Build one split as the reference's ``CriteoDataset(split)`` does: preprocess if needed (from
    its own stream, seeded with ``cfg.seed``), then read the processed file (drawing the
    randomization from ``rng``) or, with memory-map, the reordered day files (no draws)."""
    return _load_split(cfg, _ensure_processed(cfg, log), split, rng, log)


def _load_split(cfg: PreprocessConfig, processed_file: str, split: str,
                rng: np.random.RandomState, log: Callable[[str], None]) -> CriteoSplit:
    """One split of already preprocessed data (see ``load_criteo_split``)."""
    paths = cfg.paths
    if cfg.memory_map:
        return _day_files_split(cfg, paths, split, log)
    return _processed_file_split(cfg, paths, processed_file, split, rng, log)


def _table_sizes(counts: np.ndarray, max_ind_range: int) -> Tuple[int, ...]:
    """The T table sizes: the counts, each capped at max_ind_range when > 0."""
    if max_ind_range > 0:
        counts = np.minimum(counts, max_ind_range)
    return tuple(int(c) for c in counts)


def _torch_loader(dataset: Dataset, num_workers: int,
                  sampler: Optional[RandomSampler] = None) -> DataLoader:
    """A DataLoader over a dataset whose items are whole batches (no shuffling, no drop_last)."""
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers,
                      collate_fn=_keep_batch, pin_memory=False, drop_last=False)


def _bin_data(cfg: CriteoLoaderConfig, log: Callable[[str], None]) -> CriteoData:
    """Datasets and loaders over the MLPerf binary files, (re)written first unless their
    provenance records say they were made from the reordered day files as they are now."""
    data = cfg.preprocess
    files = bin_file_paths(data.processed_data_file)
    counts_file = data.raw_data_file + "_fea_count.npz"
    paths = data.paths
    day_files = [paths.reordered_day(d) for d in range(paths.days)]
    if bins_alone(data, day_files, [files["train"], files["test"], counts_file]):
        log(f"note: the raw data and the reordered day files are missing; using {files['train']} "
            f"and {files['test']} as they are (what they were made from cannot be checked)")
    else:
        _ensure_processed(data, log)
        write_stale_bins(day_files, files, data.progress, log)
    counts = _feature_counts(counts_file)
    test_batch_size = cfg.test_batch_size if cfg.test_batch_size > 0 else cfg.batch_size
    train, test = (CriteoBinDataset(files[split], size, data.max_ind_range,
                                    counts if unchecked(files[split], days) else None)
                   for split, size, days in (("train", cfg.batch_size, day_files[:-1]),
                                             ("test", test_batch_size, day_files[-1:])))
    sampler = RandomSampler(train) if cfg.mlperf_bin_shuffle else None
    return CriteoData(train, _torch_loader(train, 0, sampler), test, _torch_loader(test, 0),
                      _table_sizes(counts, data.max_ind_range), NUM_DENSE)


def make_criteo_data_and_loaders(cfg: CriteoLoaderConfig, rng: np.random.RandomState,
                                 log: Callable[[str], None],
                                 preprocess_rng: Optional[np.random.RandomState] = None) -> CriteoData:
    """The reference's ``make_criteo_data_and_loaders``: train then test dataset, and loaders.

    Preprocessing (when needed) draws from a stream seeded with --numpy-rand-seed
    (``cfg.preprocess.seed``): the reference's preprocessing was the first consumer of its global
    stream, so these are the reference's draws. ``preprocess_rng`` is that stream when given (it
    must be freshly seeded); passing the run's own ``rng`` continues it after the preprocessing
    draws, as the reference's one global stream does (so a run that preprocesses differs from later
    runs). By default it is a separate stream, and ``rng`` (the datasets' randomization and later
    the model) is the same whether or not preprocessing ran.

    mlperf + memory-map + terabyte reads the MLPerf binary files (``--mlperf-bin-loader``) or streams
    the day files; everything else serves batches of a ``CriteoSplit`` through a torch
    DataLoader with ``--num-workers`` / ``--test-num-workers`` workers.
    """
    data = cfg.preprocess
    if cfg.mlperf_bin_loader:
        return _bin_data(cfg, log)
    # the reference checks twice, once per dataset; the second check is a no-op
    processed_file = _ensure_processed(data, log, preprocess_rng)
    train = _load_split(data, processed_file, "train", rng, log)
    if len(train) == 0:  # (the tables would have no rows either)
        source = f"{processed_file}_*_reordered.npz" if data.memory_map else processed_file
        after = f" after --data-sub-sample-rate={data.sub_sample_rate}" if data.sub_sample_rate else ""
        raise DataError(f"{source}: no training samples{after}")
    test = _load_split(data, processed_file, "test", rng, log)
    test_batch_size = cfg.test_batch_size if cfg.test_batch_size > 0 else cfg.batch_size
    test_workers = cfg.test_num_workers if cfg.test_num_workers >= 0 else cfg.num_workers
    if cfg.mlperf_logging and data.memory_map and data.data_set == "terabyte":
        train_loader = CriteoDayStream(train, cfg.batch_size)
        test_loader = CriteoDayStream(test, test_batch_size)
    else:
        train_loader = _torch_loader(CriteoBatches(train, cfg.batch_size), cfg.num_workers)
        test_loader = _torch_loader(CriteoBatches(test, test_batch_size), test_workers)
    return CriteoData(train, train_loader, test, test_loader,
                      _table_sizes(train.counts, data.max_ind_range), train.dense_dim)
