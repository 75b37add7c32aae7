"""Processed and reordered npz files read as packed rows, and the row cache of those that cannot be
mapped in place.

A packed row is [y, X_int(M), X_cat(T)] as int32 (M = 13 dense, T = 26 sparse features), the
MLPerf record layout. Any integer dtype, or floats holding integers, is accepted (the reference
stores ids as float64, the preprocessing here int32); a value that is not an exact 32-bit integer
raises DataError naming the file.

Row cache (ours), only for npz files that cannot be mapped in place (the reference's
np.savez_compressed files): ``<npz path without .npz>.rows.npy``, an (n, R) int32 array of packed
rows, 160 B per sample, built once from the npz (written to a temporary name, then renamed; every
value checked then) and memory-mapped afterwards. It is rebuilt unless its provenance record says
it was made from the npz as it is now (size, time and content digest; see provenance.py).
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from dlrm.common import DataError, WriteError
from dlrm.data.criteo.config import ROWS_PER_CHUNK
from dlrm.data.criteo.schema import NUM_DENSE, NUM_FIELDS, NUM_SPARSE, RECORD_BYTES
from dlrm.io import provenance
from dlrm.io.atomic import remove_stale_temps, writing
from dlrm.io.npz import NpyWriter, NpzReader
from dlrm.outputs.metrics import stderr_is_terminal

NPZ_ARRAYS = (("y", 1), ("X_int", NUM_DENSE), ("X_cat", NUM_SPARSE))  # (key, width) in row order


def npz_row_count(path: str) -> int:
    """Rows n of a processed / reordered npz, checking from the headers only that ``y`` is (n,),
    ``X_int`` (n, M) and ``X_cat`` (n, T)."""
    with NpzReader(path) as reader:
        shapes = {key: reader.shape(key) for key, _ in NPZ_ARRAYS}
    n_rows = shapes["y"][0] if len(shapes["y"]) == 1 else -1
    for key, width in NPZ_ARRAYS:
        expected = (n_rows,) if key == "y" else (n_rows, width)
        if n_rows < 0 or shapes[key] != expected:
            raise DataError(f"{path}: array '{key}' has shape {shapes[key]}, expected "
                            f"{expected if n_rows >= 0 else '(n,)'}")
    return n_rows


def exact_int32(values: np.ndarray, path: str, key: str) -> np.ndarray:
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


def read_npz_rows(path: str, chunk_rows: int = ROWS_PER_CHUNK) -> Iterator[np.ndarray]:
    """Stream a processed / reordered npz as packed rows, without holding it in memory.

    Yields:
        (r, R) int32 blocks of rows [y, X_int(M), X_cat(T)], r <= chunk_rows, in file order.
    """
    npz_row_count(path)
    with NpzReader(path) as reader:
        streams = [reader.chunks(key, chunk_rows) for key, _ in NPZ_ARRAYS]
        for labels, dense, sparse in zip(*streams):
            rows = np.empty((labels.shape[0], NUM_FIELDS), np.int32)
            rows[:, 0] = exact_int32(labels, path, "y")
            rows[:, 1:1 + NUM_DENSE] = exact_int32(dense, path, "X_int")
            rows[:, 1 + NUM_DENSE:] = exact_int32(sparse, path, "X_cat")
            yield rows


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
            if rows.shape == (n_rows, NUM_FIELDS) and rows.dtype == np.int32:
                return rows
            reason = f"holds {rows.shape} {rows.dtype} rows, expected ({n_rows}, {NUM_FIELDS}) int32"
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
    writer = NpyWriter(cache, "<i4", (n_rows, NUM_FIELDS))
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
    rows = np.empty((n_rows, NUM_FIELDS), np.int32)
    start = 0
    for block in read_npz_rows(npz_path):
        rows[start:start + block.shape[0]] = block
        start += block.shape[0]
    return rows
