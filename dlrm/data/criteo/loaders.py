"""Criteo Kaggle / Terabyte datasets and loaders.

Every loader yields ``dlrm_common.Batch`` objects that are whole mini-batches cut from arrays: no
per-sample Python work and no per-row Python objects (the reference indexes one sample at a time,
holds every row as a Python object and collates each batch in Python).

Dimension vocabulary: B samples in a batch, T = 26 tables (sparse features), M = 13 dense features,
R = 1 + M + T = 40 columns of a packed row.

Files read and written (any integer dtype, or floats holding integers, is accepted: the reference
stores ids as float64, preprocess.py as int32):
    processed npz: ``X_int`` (n, M), ``X_cat`` (n, T), ``y`` (n,), ``counts`` (T,);
        one file holding all days in order.
    reordered day npz (--memory-map): ``X_int``, ``X_cat``, ``y``, one file per day.
    Uncompressed npz files (preprocess.py writes them, with np.savez-style "stored" members) are
        read in place: ``X_int``, ``X_cat`` and ``y`` are memory-mapped at their offsets inside the
        zip file, whatever their dtype, and nothing else is written. Values are checked to be exact
        32-bit integers per block read (per batch), so a bad value raises DataError when a batch
        holding it is read.
    row cache (ours), only for npz files that cannot be mapped in place (the reference's
        np.savez_compressed files): ``<npz path without .npz>.rows.npy``, an (n, R) int32 array of
        rows [y, X_int(M), X_cat(T)] (the MLPerf record layout), 160 B per sample, built
        once from the npz (written to a temporary name, then renamed; every value checked then) and
        memory-mapped afterwards. It is rebuilt unless its provenance record says it was made from
        the npz as it is now (size, time and content digest; see provenance.py).
    MLPerf binary files: the same rows as little-endian int32, no header,
        ``<processed stem>_{train,test,val}.bin``; rewritten unless their records say they were
        made from the reordered day files as they are now.

Files from elsewhere (without a provenance record: the reference's, or named by the user) are
checked once, when a split is opened, so a bad value is an error naming the file and row before
training starts, never an IndexError in its middle: labels 0 or 1, dense values >= 0, sparse ids
within the counts stored with the data (``check_values``, vectorised over blocks of rows). Files
this version wrote were checked as they were made, and cost no pass at open.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from typing import (Callable, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional,
                    Sequence, Tuple)

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm import tqdm

from dlrm.common import (Batch, ConfigError, DataError, WriteError, first_line,
                         non_regular_kind)
from dlrm.data.criteo import preprocess
from dlrm.data.criteo.preprocess import PreprocessConfig
from dlrm.io import provenance
from dlrm.io.atomic import remove_stale_temps, writing
from dlrm.io.npz import AppendWriter, NpyWriter, NpzReader, StoredArray, load_npz_array
from dlrm.outputs.metrics import stderr_is_terminal

DENSE_FEATURES = 13
SPARSE_FEATURES = 26
ROW_COLUMNS = 1 + DENSE_FEATURES + SPARSE_FEATURES
RECORD_BYTES = ROW_COLUMNS * 4
SPLITS = ("train", "test", "val")
_NPZ_ARRAYS = (("y", 1), ("X_int", DENSE_FEATURES), ("X_cat", SPARSE_FEATURES))
_CHUNK_ROWS = 1 << 18


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


class CriteoData(NamedTuple):
    """Datasets and loaders of one run. ``len(loader)`` is its number of batches."""

    train_data: object
    train_loader: Iterable[Batch]
    test_data: object
    test_loader: Iterable[Batch]
    table_sizes: Tuple[int, ...]   # the T counts, each capped at max_ind_range when > 0
    dense_dim: int                 # M


# --------------------------------------------------------------------------------------------------
# Rows -> Batch
# --------------------------------------------------------------------------------------------------

def rows_to_batch(rows: np.ndarray, max_ind_range: int = -1) -> Batch:
    """Turn packed rows into a Batch, as the reference's Criteo collate does.

    Args:
        rows: (B, R) integer rows [label, dense(M), sparse(T)].
        max_ind_range: when > 0, sparse ids are taken modulo it.
    Returns:
        the Batch of ``columns_to_batch``.
    """
    return columns_to_batch(rows[:, 0], rows[:, 1:1 + DENSE_FEATURES],
                            rows[:, 1 + DENSE_FEATURES:], max_ind_range)


def columns_to_batch(labels: np.ndarray, dense: np.ndarray, sparse: np.ndarray,
                     max_ind_range: int = -1) -> Batch:
    """Turn the three arrays of B samples into a Batch, as the reference's collate does.

    Args:
        labels: (B,) integer labels.
        dense: (B, M) integer dense features.
        sparse: (B, T) integer sparse ids.
        max_ind_range: when > 0, sparse ids are taken modulo it.
    Returns:
        Batch with dense_x = log(x + 1) (B, M) float32 (cast to float32 first, as the reference),
        offsets (T, B) int64 = arange(B) per table, indices (T, B) int64, labels (B, 1) float32.
    """
    size = labels.shape[0]
    dense_x = torch.from_numpy(dense.astype(np.float32, order="C"))
    dense_x.add_(1).log_()
    indices = np.ascontiguousarray(sparse.T, dtype=np.int64)  # (T, B)
    if max_ind_range > 0:
        np.remainder(indices, max_ind_range, out=indices)
    batch_labels = torch.from_numpy(labels.reshape(size, 1).astype(np.float32))  # (B, 1)
    offsets = torch.arange(size, dtype=torch.int64).repeat(indices.shape[0], 1)  # (T, B)
    return Batch(dense_x, offsets, torch.from_numpy(indices), batch_labels)


def _keep_batch(item: Batch) -> Batch:
    """DataLoader conversion for datasets whose items are already whole batches."""
    return item


# --------------------------------------------------------------------------------------------------
# Reading npz files as packed rows
# --------------------------------------------------------------------------------------------------

def npz_row_count(path: str) -> int:
    """Rows n of a processed / reordered npz, checking from the headers only that ``y`` is (n,),
    ``X_int`` (n, M) and ``X_cat`` (n, T)."""
    with NpzReader(path) as reader:
        shapes = {key: reader.shape(key) for key, _ in _NPZ_ARRAYS}
    n_rows = shapes["y"][0] if len(shapes["y"]) == 1 else -1
    for key, width in _NPZ_ARRAYS:
        expected = (n_rows,) if key == "y" else (n_rows, width)
        if n_rows < 0 or shapes[key] != expected:
            raise DataError(f"{path}: array '{key}' has shape {shapes[key]}, expected "
                            f"{expected if n_rows >= 0 else '(n,)'}")
    return n_rows


def _exact_int32(values: np.ndarray, path: str, key: str) -> np.ndarray:
    """``values`` as int32, raising DataError if that changes any value (fractions, NaN, overflow)."""
    if values.dtype == np.int32:
        return values
    if values.dtype.kind not in "biuf":
        raise DataError(f"{path}: array '{key}' has dtype {values.dtype}, expected numbers")
    with np.errstate(invalid="ignore"):
        converted = values.astype(np.int32)
    bad = converted != values
    if bad.any():
        raise DataError(f"{path}: array '{key}' holds {values[bad][0].item()!r}, "
                        "which is not a 32-bit integer")
    return converted


def read_npz_rows(path: str, chunk_rows: int = _CHUNK_ROWS) -> Iterator[np.ndarray]:
    """Stream a processed / reordered npz as packed rows, without holding it in memory.

    Yields:
        (r, R) int32 blocks of rows [y, X_int(M), X_cat(T)], r <= chunk_rows, in file order.
    """
    npz_row_count(path)
    with NpzReader(path) as reader:
        streams = [reader.chunks(key, chunk_rows) for key, _ in _NPZ_ARRAYS]
        for labels, dense, sparse in zip(*streams):
            rows = np.empty((labels.shape[0], ROW_COLUMNS), np.int32)
            rows[:, 0] = _exact_int32(labels, path, "y")
            rows[:, 1:1 + DENSE_FEATURES] = _exact_int32(dense, path, "X_int")
            rows[:, 1 + DENSE_FEATURES:] = _exact_int32(sparse, path, "X_cat")
            yield rows


# --------------------------------------------------------------------------------------------------
# Row caches
# --------------------------------------------------------------------------------------------------

def row_cache_path(npz_path: str) -> str:
    """Where the row cache of an npz lives: ``x.npz`` -> ``x.rows.npy``."""
    root, ext = os.path.splitext(npz_path)
    return (root if ext == ".npz" else npz_path) + ".rows.npy"


def derived_record(inputs: Sequence[str]) -> dict:
    """The provenance record of a file made from the files ``inputs`` alone (a row cache, the
    MLPerf binary files): it is reused only while they are unchanged."""
    return provenance.expected([provenance.identity(path) for path in inputs], {})


def _fresh_cache(cache: str, wanted: dict, n_rows: int,
                 log: Callable[[str], None]) -> Optional[np.ndarray]:
    """The memory-mapped row cache if it exists, was made from its npz as it is now, and has n
    rows; else None (with a note saying why an existing cache is rebuilt)."""
    if not os.path.exists(cache):
        return None
    reason = provenance.mismatch(cache, wanted)
    if reason is None:
        try:
            rows = np.load(cache, mmap_mode="r")
        except (OSError, ValueError) as err:
            reason = f"cannot be read ({err})"
        else:
            if rows.shape == (n_rows, ROW_COLUMNS) and rows.dtype == np.int32:
                return rows
            reason = f"holds {rows.shape} {rows.dtype} rows, expected ({n_rows}, {ROW_COLUMNS}) int32"
    log(f"note: {cache} {reason}; rebuilding it")
    return None


def _write_row_cache(npz_path: str, cache: str, n_rows: int, progress: bool,
                     wanted: dict) -> None:
    """Write the (n, R) int32 row cache of an npz as a .npy file, atomically, then its record."""
    bar = tqdm(total=n_rows, unit="rows", desc=f"caching {os.path.basename(npz_path)}",
               disable=not (progress and stderr_is_terminal()), file=sys.stderr)
    with writing(cache):
        remove_stale_temps(cache)
        remove_stale_temps(provenance.record_path(cache))
    writer = NpyWriter(cache, "<i4", (n_rows, ROW_COLUMNS))
    with bar, provenance.recording(cache, wanted), writer as out:
        written = 0
        for rows in read_npz_rows(npz_path):
            out.write(written, rows)
            written += rows.shape[0]
            bar.update(rows.shape[0])


def open_rows(npz_path: str, log: Callable[[str], None], progress: bool = True,
              why: str = "") -> Tuple[np.ndarray, Optional[str]]:
    """Packed rows of a processed / reordered npz, memory-mapped from its row cache.

    The loaders use this only for files that cannot be mapped in place (``open_npz_rows``). The
    cache is built on first use, with a note ``why`` to ``log`` when one is given, and rebuilt
    (with a note) unless its provenance record says it was made from the npz as it is now. If it
    cannot be written (for example a read-only data directory) the rows are read into memory
    instead, with a note to ``log``.

    Returns:
        (rows, cache path or None): rows is (n, R) int32 [y, X_int(M), X_cat(T)].
    """
    n_rows = npz_row_count(npz_path)
    cache = row_cache_path(npz_path)
    wanted = derived_record([npz_path])
    rows = _fresh_cache(cache, wanted, n_rows, log)
    if rows is None:
        if why:
            log(f"note: {why}; caching its rows in {cache} ({RECORD_BYTES} B per sample)")
        try:
            _write_row_cache(npz_path, cache, n_rows, progress, wanted)
        except WriteError as err:
            log(f"note: {err}; reading {npz_path} into memory")
            return _read_rows_into_memory(npz_path, n_rows), None
        rows = np.load(cache, mmap_mode="r")
    return rows, cache


def _read_rows_into_memory(npz_path: str, n_rows: int) -> np.ndarray:
    """All packed rows of an npz as one (n, R) int32 array in memory."""
    rows = np.empty((n_rows, ROW_COLUMNS), np.int32)
    start = 0
    for block in read_npz_rows(npz_path):
        rows[start:start + block.shape[0]] = block
        start += block.shape[0]
    return rows


# --------------------------------------------------------------------------------------------------
# Mapping uncompressed npz members in place
# --------------------------------------------------------------------------------------------------

def map_npz_in_place(path: str) -> Optional[Tuple[StoredArray, StoredArray, StoredArray]]:
    """The (y, X_int, X_cat) arrays of a processed / reordered npz located for mapping in place,
    after checking their shapes; None when one of them cannot be (compressed, for example)."""
    npz_row_count(path)
    with NpzReader(path) as reader:
        found = tuple(reader.stored(key) for key, _ in _NPZ_ARRAYS)
    return None if any(member is None for member in found) else found


class NpzColumns:
    """The rows of one npz read from its three arrays, memory-mapped in place.

    The file is mapped at construction (start-up), so a file removed or replaced during training
    is still read as it was when the run started. Values are checked to be exact 32-bit integers
    as they are read, block by block (a few microseconds per batch), so opening costs no pass
    over the data. Pickles as the file layout only: a DataLoader worker started by spawning maps
    the file again (a forked one shares the parent's map).
    """

    def __init__(self, members: Sequence[StoredArray]):
        self.members = tuple(members)               # y (n,), X_int (n, M), X_cat (n, T)
        self._arrays: Optional[Tuple[np.ndarray, ...]] = self._open()

    def _open(self) -> Tuple[np.ndarray, ...]:
        try:
            return tuple(member.open() for member in self.members)
        except OSError as err:
            raise DataError(f"{self.members[0].path}: cannot read ({first_line(err)})") from None

    def __len__(self) -> int:
        return self.members[0].shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def read(self, index) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``index`` (a slice or (P,) positions) as int32 labels (P,), dense (P, M) and
        sparse (P, T); DataError naming the file if a value is not a 32-bit integer."""
        if self._arrays is None:
            self._arrays = self._open()
        return tuple(_exact_int32(array[index], member.path, member.key)
                     for member, array in zip(self.members, self._arrays))


def open_npz_rows(npz_path: str, log: Callable[[str], None], progress: bool = True
                  ) -> Tuple[object, Optional[str]]:
    """The rows of a processed / reordered npz for the loaders, without copying them.

    Uncompressed files (preprocess.py writes them) are mapped in place (an ``NpzColumns``); a row
    cache left there by an earlier version is removed. Others (the reference's compressed files)
    are read through the row cache of ``open_rows``, with a note to ``log`` when it is built.

    Returns:
        (rows, cache path or None): an ``NpzColumns`` or an (n, R) int32 packed-row array, as
        ``PackedRows`` takes them.
    """
    members = map_npz_in_place(npz_path)
    if members is None:
        return open_rows(npz_path, log, progress,
                         why=f"{npz_path} is compressed or otherwise cannot be mapped in place")
    stale = row_cache_path(npz_path)
    if os.path.exists(stale):
        with contextlib.suppress(OSError):
            os.remove(stale)
            provenance.forget(stale)
            log(f"note: removed {stale}, not needed any more ({npz_path} is mapped in place)")
    return NpzColumns(members), None


def check_values(read: Callable[[int, int], Tuple[np.ndarray, np.ndarray, np.ndarray]],
                 start: int, stop: int, counts: np.ndarray, path: str) -> None:
    """Check rows [start, stop) of a file from elsewhere before training reads them.

    ``read(a, b)`` returns rows [a, b) as int32 labels (P,), dense (P, M) and sparse (P, T); they
    are read in blocks and checked with one maximum per column: viewed as unsigned, a negative
    value is larger than every bound. Raises DataError naming ``path`` and the row for a label
    other than 0 or 1, a negative dense value (the model takes log(x + 1)) or a sparse id outside
    [0, counts[t]) (the table size stored with the data).
    """
    counts = np.asarray(counts, dtype=np.int64)
    for first in range(start, stop, _CHUNK_ROWS):
        labels, dense, sparse = read(first, min(stop, first + _CHUNK_ROWS))
        if len(labels) and not (labels.view(np.uint32).max() <= 1
                                and dense.view(np.uint32).max() < 2**31
                                and np.all(sparse.view(np.uint32).max(axis=0) < counts)):
            raise _bad_value(labels, dense, sparse, counts, f"{path}: row", first)


def _bad_value(labels: np.ndarray, dense: np.ndarray, sparse: np.ndarray, counts: np.ndarray,
               where: str, first: int) -> DataError:
    """The error about the first bad value of a block that ``check_values`` refused."""
    if labels.min() < 0 or labels.max() > 1:
        row = int(np.flatnonzero((labels != 0) & (labels != 1))[0])
        return DataError(f"{where} {first + row}: label {labels[row]}, expected 0 or 1")
    if dense.min() < 0:
        row, k = (int(i[0]) for i in np.nonzero(dense < 0))
        return DataError(f"{where} {first + row}: dense feature I{k + 1} is {dense[row, k]}, "
                         "expected >= 0")
    row, t = (int(i[0]) for i in np.nonzero((sparse < 0) | (sparse >= counts)))
    return DataError(f"{where} {first + row}: sparse feature C{t + 1} has id {sparse[row, t]}, "
                     f"outside the {counts[t]} of its table (the count stored with the data)")


def _check_from_elsewhere(rows: "PackedRows", part: int, path: str, start: int, stop: int,
                          counts: np.ndarray) -> None:
    """``check_values`` on the rows of split [start, stop) in part ``part`` of ``rows``, read
    from ``path``, unless ``path`` carries a provenance record (then this version made it)."""
    if provenance.read(path) is not None:
        return
    base, end = int(rows.offsets[part]), int(rows.offsets[part + 1])
    first, last = max(start, base) - base, min(stop, end) - base
    if first < last:
        check_values(lambda a, b: rows.read_part(part, slice(a, b)), first, last, counts, path)


def _split_rows(rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed (P, R) rows as views: labels (P,), dense (P, M), sparse (P, T)."""
    return rows[:, 0], rows[:, 1:1 + DENSE_FEATURES], rows[:, 1 + DENSE_FEATURES:]


def _pack_rows(labels: np.ndarray, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """The three arrays of P samples as (P, R) int32 packed rows."""
    rows = np.empty((labels.shape[0], ROW_COLUMNS), np.int32)
    rows[:, 0], rows[:, 1:1 + DENSE_FEATURES], rows[:, 1 + DENSE_FEATURES:] = labels, dense, sparse
    return rows


class PackedRows:
    """Several files' rows (e.g. one per day) read as one array of n rows, days in order.

    Each part is either an (n_i, R) int32 packed-row array (a row cache, or rows in memory) or an
    ``NpzColumns`` (an npz mapped in place). Parts with a cache path are reopened from it after
    pickling and ``NpzColumns`` pickle as their layout, so a DataLoader worker never receives a
    copy of the data.
    """

    def __init__(self, arrays: Sequence[object], cache_paths: Sequence[Optional[str]]):
        self._arrays: List[object] = list(arrays)
        self._cache_paths = list(cache_paths)
        self.offsets = np.concatenate(([0], np.cumsum([len(a) for a in arrays]))).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = [None if path else array
                            for path, array in zip(self._cache_paths, self._arrays)]
        return state

    def read_part(self, part: int, index) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``index`` (slice or positions) of one part as int32 (labels, dense, sparse)."""
        if self._arrays[part] is None:
            self._arrays[part] = np.load(self._cache_paths[part], mmap_mode="r")
        array = self._arrays[part]
        if isinstance(array, NpzColumns):
            return array.read(index)
        return _split_rows(array[index])

    def columns(self, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [start, stop) as int32 labels (P,), dense (P, M), sparse (P, T), P = stop - start."""
        part = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        while start < stop:
            end = min(stop, int(self.offsets[part + 1]))
            base = int(self.offsets[part])
            pieces.append(self.read_part(part, slice(start - base, end - base)))
            start, part = end, part + 1
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            return _split_rows(np.empty((0, ROW_COLUMNS), np.int32))
        return tuple(np.concatenate(arrays) for arrays in zip(*pieces))

    def take_columns(self, positions: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows at arbitrary ``positions`` (P,), as ``columns`` returns them."""
        if len(self._arrays) == 1:
            return self.read_part(0, positions)
        part = np.searchsorted(self.offsets, positions, side="right") - 1
        out = _split_rows(np.empty((positions.shape[0], ROW_COLUMNS), np.int32))
        for p in np.unique(part):
            mask = part == p
            for target, values in zip(out, self.read_part(int(p), positions[mask] - self.offsets[p])):
                target[mask] = values
        return out

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as (stop - start, R) int32 packed rows."""
        return _pack_rows(*self.columns(start, stop))

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Rows at arbitrary ``positions`` (P,) as (P, R) int32 packed rows."""
        return _pack_rows(*self.take_columns(positions))


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------

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
        self.dense_dim = DENSE_FEATURES
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


class CriteoBinDataset(Dataset):
    """MLPerf binary file reader: item k is batch k, read through a memory map.

    Args:
        path: file of 160-byte records [y, X_int(M), X_cat(T)] as little-endian int32, no header.
        batch_size: B; the last batch is partial.
        max_ind_range: sparse ids are taken modulo it when > 0.
        counts: (T,) table sizes stored with the data; when given, every record is checked once,
            here (``check_values``), so a bad value is an error at open, never an IndexError in
            the middle of training. Give it for files from elsewhere (without a provenance
            record); the files ``write_criteo_bins`` writes hold checked values.
    Attributes:
        num_samples: records in the file (the reference's class has no such attribute, though its
            callers read one).
    """

    def __init__(self, path: str, batch_size: int, max_ind_range: int = -1,
                 counts: Optional[np.ndarray] = None):
        try:
            status = os.stat(path)
        except OSError:
            raise DataError(f"{path}: file not found") from None
        size, kind = status.st_size, non_regular_kind(status.st_mode)
        if kind is not None:
            raise DataError(f"{path}: is {kind}, not a binary data file")
        if size % RECORD_BYTES:
            raise DataError(f"{path}: size {size} bytes is not a multiple of the "
                            f"{RECORD_BYTES}-byte record")
        self.path = path
        self.batch_size = batch_size
        self.max_ind_range = max_ind_range
        self.num_samples = size // RECORD_BYTES
        self._records: Optional[np.ndarray] = None
        records = self.records()  # mapped now: a file removed during training is still read
        if counts is not None:
            check_values(lambda start, stop: _split_rows(records[start:stop]), 0,
                         self.num_samples, counts, path)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_records": None}

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def records(self) -> np.ndarray:
        """All records as a read-only (n, R) int32 memory map."""
        if self._records is None:
            if self.num_samples == 0:
                self._records = np.empty((0, ROW_COLUMNS), "<i4")
            else:
                try:
                    self._records = np.memmap(self.path, dtype="<i4", mode="r",
                                              shape=(self.num_samples, ROW_COLUMNS))
                except OSError as err:
                    raise DataError(f"{self.path}: cannot read ({first_line(err)})") from None
        return self._records

    def __getitem__(self, k: int) -> Batch:
        if not 0 <= k < len(self):
            raise IndexError(f"batch {k} out of range 0..{len(self) - 1}")
        rows = self.records()[k * self.batch_size:(k + 1) * self.batch_size]
        return rows_to_batch(rows, self.max_ind_range)


def bin_record(day_files: Sequence[str], split: str) -> dict:
    """The provenance record of a binary file: train is made from days 0..D-2, test and val from
    day D-1."""
    return derived_record(day_files[:-1] if split == "train" else day_files[-1:])


def write_criteo_bins(day_files: Sequence[str], outputs: Mapping[str, str],
                      progress: bool = True) -> None:
    """Write MLPerf binary files from the reordered day files, each atomically.

    Args:
        day_files: the D reordered npz files, in day order.
        outputs: split -> path for the files to write: "train" = days 0..D-2 concatenated,
            "test" = the first ceil(n/2) rows of day D-1, "val" = its remaining rows. Each gets
            a provenance record naming the day files it was made from (``bin_record``).
    """
    bar = tqdm(unit="rows", desc="writing binary files", disable=not (progress and stderr_is_terminal()),
               file=sys.stderr)
    with bar, contextlib.ExitStack() as stack:
        files = {}
        for split, path in outputs.items():
            with writing(path):
                remove_stale_temps(path)
            stack.enter_context(provenance.recording(path, bin_record(day_files, split)))
            files[split] = stack.enter_context(AppendWriter(path))
        if "train" in files:
            for day_file in day_files[:-1]:
                for rows in read_npz_rows(day_file):
                    files["train"].append(rows.astype("<i4", copy=False))
                    bar.update(rows.shape[0])
        if "test" in files or "val" in files:
            n_test = math.ceil(npz_row_count(day_files[-1]) / 2)
            written = 0
            for rows in read_npz_rows(day_files[-1]):
                cut = min(max(n_test - written, 0), rows.shape[0])
                for split, part in (("test", rows[:cut]), ("val", rows[cut:])):
                    if split in files:
                        files[split].append(part.astype("<i4", copy=False))
                written += rows.shape[0]
                bar.update(rows.shape[0])


# --------------------------------------------------------------------------------------------------
# Splits, as the reference defines them
# --------------------------------------------------------------------------------------------------

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
    if counts.shape != (SPARSE_FEATURES,):
        raise DataError(f"{path}: counts has shape {counts.shape}, expected ({SPARSE_FEATURES},)")
    return counts.astype(np.int64)


def _processed_file_split(cfg: PreprocessConfig, paths, processed_file: str, split: str,
                          rng: np.random.RandomState, log: Callable[[str], None]) -> CriteoSplit:
    """A split of the all-days processed npz (the reference's non-memory-map CriteoDataset)."""
    rows, cache = open_npz_rows(processed_file, log, cfg.progress)
    counts = _feature_counts(processed_file)
    log(f"Sparse fea = {len(counts)}, Dense fea = {DENSE_FEATURES}")
    day_counts = _day_counts(paths.day_count_file(), paths.days)
    if day_counts.sum() != len(rows):
        raise DataError(f"{processed_file}: {len(rows)} samples, but "
                        f"{paths.day_count_file()} counts {day_counts.sum()}")
    start, stop, order = reference_split(day_counts, split, cfg.randomize, rng, log)
    log("Split data according to indices...")
    packed = PackedRows([rows], [cache])
    _check_from_elsewhere(packed, 0, processed_file, start, stop, counts)
    return CriteoSplit(packed, start, stop, order, counts, cfg.max_ind_range)


def _day_files_split(cfg: PreprocessConfig, paths, split: str,
                     log: Callable[[str], None]) -> CriteoSplit:
    """A split of the reordered day files (the reference's memory-map CriteoDataset); no draws.

    Train = days 0..D-2 in order; test / val = first ceil(n/2) / remaining rows of day D-1.
    """
    day_counts = _day_counts(paths.day_count_file(), paths.days)
    counts = _feature_counts(paths.fea_count_file())
    log(f"Sparse features= {len(counts)}, Dense features= {DENSE_FEATURES}")
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
        _check_from_elsewhere(rows, part, paths.reordered_day(day), start, stop, counts)
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
    paths = preprocess.criteo_paths(cfg.data_set, cfg.raw_data_file)
    if cfg.memory_map:
        return _day_files_split(cfg, paths, split, log)
    return _processed_file_split(cfg, paths, processed_file, split, rng, log)


def _check_config(cfg: CriteoLoaderConfig) -> None:
    """Raise ConfigError for flag values the loaders cannot honour."""
    data = cfg.preprocess
    preprocess.check_config(data)
    checks = [
        (cfg.batch_size >= 1, f"--mini-batch-size must be at least 1, got {cfg.batch_size}"),
        (cfg.test_batch_size != 0, "--test-mini-batch-size must not be 0"),
        (cfg.num_workers >= 0, f"--num-workers must be >= 0, got {cfg.num_workers}"),
        (not cfg.mlperf_bin_loader or (cfg.mlperf_logging and data.memory_map
                                       and data.data_set == "terabyte"),
         "--mlperf-bin-loader needs --data-set=terabyte, --memory-map and --mlperf-logging"),
        (not cfg.mlperf_bin_loader or bool(data.processed_data_file),
         "--mlperf-bin-loader needs --processed-data-file (the .bin files are named after it)"),
        (not cfg.mlperf_bin_shuffle or cfg.mlperf_bin_loader,
         "--mlperf-bin-shuffle needs --mlperf-bin-loader"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


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


def bin_file_paths(processed_data_file: str) -> Dict[str, str]:
    """split -> ``<dir(processed)>/<stem(processed)>_<split>.bin``, the reference's names."""
    stem = os.path.splitext(processed_data_file)[0]
    return {split: f"{stem}_{split}.bin" for split in SPLITS}


def _bin_data(cfg: CriteoLoaderConfig, log: Callable[[str], None]) -> CriteoData:
    """Datasets and loaders over the MLPerf binary files, (re)written first unless their
    provenance records say they were made from the reordered day files as they are now."""
    data = cfg.preprocess
    files = bin_file_paths(data.processed_data_file)
    counts_file = data.raw_data_file + "_fea_count.npz"
    paths = preprocess.criteo_paths(data.data_set, data.raw_data_file)
    day_files = [paths.reordered_day(d) for d in range(paths.days)]
    if _bins_alone(data, day_files, [files["train"], files["test"], counts_file]):
        log(f"note: the raw data and the reordered day files are missing; using {files['train']} "
            f"and {files['test']} as they are (what they were made from cannot be checked)")
    else:
        _ensure_processed(data, log)
        _write_stale_bins(day_files, files, data.progress, log)
    counts = _feature_counts(counts_file)
    test_batch_size = cfg.test_batch_size if cfg.test_batch_size > 0 else cfg.batch_size
    train, test = (CriteoBinDataset(files[split], size, data.max_ind_range,
                                    counts if _unchecked(files[split], days) else None)
                   for split, size, days in (("train", cfg.batch_size, day_files[:-1]),
                                             ("test", test_batch_size, day_files[-1:])))
    sampler = RandomSampler(train) if cfg.mlperf_bin_shuffle else None
    return CriteoData(train, _torch_loader(train, 0, sampler), test, _torch_loader(test, 0),
                      _table_sizes(counts, data.max_ind_range), DENSE_FEATURES)


def _unchecked(path: str, sources: Sequence[str]) -> bool:
    """Whether the values of ``path`` were never checked: it has no provenance record, or was
    made from ``sources`` of which one has none (a binary file written from reference-made day
    files)."""
    return provenance.read(path) is None or any(
        os.path.exists(source) and provenance.read(source) is None for source in sources)


def _bins_alone(cfg: PreprocessConfig, day_files: Sequence[str], needed: Sequence[str]) -> bool:
    """Whether the binary files (and counts) are all there is: no raw data, no day files."""
    return (preprocess.missing_raw_data(cfg) is not None
            and not all(os.path.exists(path) for path in day_files)
            and all(os.path.exists(path) for path in needed))


def _write_stale_bins(day_files: Sequence[str], files: Mapping[str, str], progress: bool,
                      log: Callable[[str], None]) -> None:
    """Write the binary files that are missing or were not made from ``day_files`` as they are."""
    stale = {}
    for split, path in files.items():
        reason = (provenance.mismatch(path, bin_record(day_files, split))
                  if os.path.exists(path) else None)
        if reason:
            log(f"note: {path} {reason}; writing it again")
        if reason or not os.path.exists(path):
            stale[split] = path
    if stale:
        log(f"Writing binary files {', '.join(stale.values())}")
        write_criteo_bins(day_files, stale, progress)


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
    _check_config(cfg)
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
