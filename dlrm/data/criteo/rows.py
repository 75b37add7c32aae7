"""The rows the Criteo loaders read: npz files mapped in place, several files as one array, values
checked, and rows turned into Batches.

Uncompressed npz files (the preprocessing writes them, with np.savez-style "stored" members) are
read in place: ``X_int``, ``X_cat`` and ``y`` are memory-mapped at their offsets inside the zip
file, whatever their dtype, and nothing else is written. Values are checked to be exact 32-bit
integers per block read (per batch). Other files go through the row cache (:mod:`.row_cache`).

Files from elsewhere (without a provenance record: the reference's, or named by the user) are
checked once, when a split is opened, so a bad value is an error naming the file and row before
training starts, never an IndexError in its middle: labels 0 or 1, dense values >= 0, sparse ids
within the counts stored with the data (``check_values``, vectorised over blocks of rows). Files
this version wrote were checked as they were made, and cost no pass at open.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dlrm.common import Batch, DataError, first_line
from dlrm.data.criteo.config import ROWS_PER_CHUNK
from dlrm.data.criteo.row_cache import NPZ_ARRAYS, exact_int32, npz_row_count, open_rows, row_cache_path
from dlrm.data.criteo.schema import NUM_DENSE, NUM_FIELDS
from dlrm.io import provenance
from dlrm.io.npz import NpzReader, StoredArray


def rows_to_batch(rows: np.ndarray, max_ind_range: int = -1) -> Batch:
    """Turn packed rows into a Batch, as the reference's Criteo collate does.

    Args:
        rows: (B, R) integer rows [label, dense(M), sparse(T)].
        max_ind_range: when > 0, sparse ids are taken modulo it.
    Returns:
        the Batch of ``columns_to_batch``.
    """
    return columns_to_batch(rows[:, 0], rows[:, 1:1 + NUM_DENSE],
                            rows[:, 1 + NUM_DENSE:], max_ind_range)


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


def map_npz_in_place(path: str) -> Optional[Tuple[StoredArray, StoredArray, StoredArray]]:
    """The (y, X_int, X_cat) arrays of a processed / reordered npz located for mapping in place,
    after checking their shapes; None when one of them cannot be (compressed, for example)."""
    npz_row_count(path)
    with NpzReader(path) as reader:
        found = tuple(reader.stored(key) for key, _ in NPZ_ARRAYS)
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
        return tuple(exact_int32(array[index], member.path, member.key)
                     for member, array in zip(self.members, self._arrays))


def open_npz_rows(npz_path: str, log: Callable[[str], None], progress: bool = True
                  ) -> Tuple[object, Optional[str]]:
    """The rows of a processed / reordered npz for the loaders, without copying them.

    Uncompressed files (the preprocessing writes them) are mapped in place (an ``NpzColumns``); a row
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
    for first in range(start, stop, ROWS_PER_CHUNK):
        labels, dense, sparse = read(first, min(stop, first + ROWS_PER_CHUNK))
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


def check_from_elsewhere(rows: "PackedRows", part: int, path: str, start: int, stop: int,
                         counts: np.ndarray) -> None:
    """``check_values`` on the rows of split [start, stop) in part ``part`` of ``rows``, read
    from ``path``, unless ``path`` carries a provenance record (then this version made it)."""
    if provenance.read(path) is not None:
        return
    base, end = int(rows.offsets[part]), int(rows.offsets[part + 1])
    first, last = max(start, base) - base, min(stop, end) - base
    if first < last:
        check_values(lambda a, b: rows.read_part(part, slice(a, b)), first, last, counts, path)


def split_rows(rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed (P, R) rows as views: labels (P,), dense (P, M), sparse (P, T)."""
    return rows[:, 0], rows[:, 1:1 + NUM_DENSE], rows[:, 1 + NUM_DENSE:]


def pack_rows(labels: np.ndarray, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """The three arrays of P samples as (P, R) int32 packed rows."""
    rows = np.empty((labels.shape[0], NUM_FIELDS), np.int32)
    rows[:, 0], rows[:, 1:1 + NUM_DENSE], rows[:, 1 + NUM_DENSE:] = labels, dense, sparse
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
        return split_rows(array[index])

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
            return split_rows(np.empty((0, NUM_FIELDS), np.int32))
        return tuple(np.concatenate(arrays) for arrays in zip(*pieces))

    def take_columns(self, positions: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows at arbitrary ``positions`` (P,), as ``columns`` returns them."""
        if len(self._arrays) == 1:
            return self.read_part(0, positions)
        part = np.searchsorted(self.offsets, positions, side="right") - 1
        out = split_rows(np.empty((positions.shape[0], NUM_FIELDS), np.int32))
        for p in np.unique(part):
            mask = part == p
            for target, values in zip(out, self.read_part(int(p), positions[mask] - self.offsets[p])):
                target[mask] = values
        return out

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as (stop - start, R) int32 packed rows."""
        return pack_rows(*self.columns(start, stop))

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Rows at arbitrary ``positions`` (P,) as (P, R) int32 packed rows."""
        return pack_rows(*self.take_columns(positions))
