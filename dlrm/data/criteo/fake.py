"""Realistic fake Criteo raw files, for tests and benchmarks.

Each line is ``label \\t I1..I13 \\t C1..C26 \\n``: a 0/1 label (about 25% positives), 13 integer
counts (log-normal, some empty, a few negative in I2 as in the real data) and 26 categorical
8-hex-digit hashes drawn with a Zipf-like skew from per-column vocabularies of very different
sizes, some empty.

Two layouts:
    Kaggle    one file ``train.txt``                    -> ``write_fake_kaggle(path, n_lines, seed)``
    Terabyte  ``<prefix>_0`` .. ``<prefix>_{days-1}``   -> ``write_fake_terabyte(prefix, days, lines_per_day, seed)``

Lines are assembled with NumPy into one byte buffer per chunk (no per-value Python). Files are
written to a temporary name and renamed when complete. The command line is
``python -m bench.make_fake_criteo``.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np

from dlrm.data.criteo.schema import NUM_DENSE, NUM_SPARSE
from dlrm.io.atomic import atomic_open

CHUNK_LINES = 200_000

# Per-column vocabulary sizes, as fractions of the line count (floored at small absolute sizes),
# shaped like the real Kaggle table sizes: a few huge columns, many small ones.
_VOCAB_FRACTION = (0.001, 0.0005, 0.3, 0.1, 0.0002, 0.0, 0.005, 0.0004, 0.0, 0.02, 0.003, 0.25,
                   0.002, 0.0, 0.006, 0.15, 0.0, 0.003, 0.001, 0.0, 0.2, 0.0, 0.0, 0.05, 0.0, 0.03)
_VOCAB_FLOOR = (300, 200, 50, 50, 100, 24, 500, 300, 3, 100, 100, 50, 300, 27, 500, 50, 10, 500,
                300, 4, 50, 18, 15, 100, 105, 100)
_SPARSE_MISSING = (0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0, 0.0,
                   0.03, 0.0, 0.0, 0.44, 0.44, 0.03, 0.0, 0.76, 0.03, 0.44, 0.44)
_DENSE_MISSING = (0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.77, 0.22)
_DENSE_LOG_MEAN = (0.5, 2.0, 1.5, 1.2, 7.0, 3.0, 1.2, 2.0, 3.5, 0.3, 1.0, 0.3, 1.5)
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


class _FakeColumns:
    """The per-column vocabularies (random 32-bit hashes) for one generated data set."""

    def __init__(self, total_lines: int, rng: np.random.Generator):
        self.vocab: List[np.ndarray] = []
        for frac, floor in zip(_VOCAB_FRACTION, _VOCAB_FLOOR):
            size = max(floor, int(frac * total_lines))
            self.vocab.append(rng.integers(0, 2**32, size=size, dtype=np.uint64))


def _int_field(values: np.ndarray, missing: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Decimal text of int values as ((n, W) uint8 chars, (n,) lengths); missing -> length 0."""
    text = values.astype("S11")
    width = text.dtype.itemsize
    chars = text.view(np.uint8).reshape(len(values), width)
    lengths = (chars != 0).sum(axis=1)
    lengths[missing] = 0
    return chars, lengths


def _hex_field(values: np.ndarray, missing: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """8-hex-digit text of uint32 values as ((n, 8) uint8 chars, (n,) lengths); missing -> 0."""
    shifts = np.arange(28, -1, -4, dtype=np.uint64)
    chars = _HEX[(values[:, None] >> shifts) & np.uint64(15)]
    lengths = np.where(missing, 0, 8)
    return chars, lengths


def _chunk_fields(n: int, cols: _FakeColumns, rng: np.random.Generator):
    """The 40 fields of ``n`` lines, each as (chars, lengths)."""
    label = (rng.random(n) < 0.25).astype(np.int64)
    fields = [_int_field(label, np.zeros(n, dtype=bool))]
    for j in range(NUM_DENSE):
        values = np.floor(np.exp(rng.normal(_DENSE_LOG_MEAN[j], 1.3, size=n))).astype(np.int64)
        if j == 1:  # I2 holds small negative values in the real data
            values = values - (rng.random(n) < 0.1) * rng.integers(1, 4, size=n)
        values = np.minimum(values, 10**7)
        fields.append(_int_field(values, rng.random(n) < _DENSE_MISSING[j]))
    for j in range(NUM_SPARSE):
        vocab = cols.vocab[j]
        rank = (rng.zipf(1.15, size=n) - 1) % len(vocab)
        fields.append(_hex_field(vocab[rank], rng.random(n) < _SPARSE_MISSING[j]))
    return fields


def _assemble_lines(fields) -> bytes:
    """Join the fields with tabs, one line each, ending with a newline."""
    n = len(fields[0][1])
    lengths = np.stack([length for _, length in fields], axis=1)  # (n, 40)
    line_len = lengths.sum(axis=1) + len(fields)  # 39 tabs + newline
    line_start = np.concatenate(([0], np.cumsum(line_len)[:-1]))
    field_start = line_start[:, None] + np.concatenate(
        (np.zeros((n, 1), dtype=np.int64), np.cumsum(lengths + 1, axis=1)[:, :-1]), axis=1)
    buf = np.full(int(line_len.sum()), ord("\t"), dtype=np.uint8)
    buf[line_start + line_len - 1] = ord("\n")
    for j, (chars, length) in enumerate(fields):
        width = chars.shape[1]
        keep = np.arange(width) < length[:, None]
        buf[(field_start[:, j, None] + np.arange(width))[keep]] = chars[keep]
    return buf.tobytes()


def _write_lines(path: str, n_lines: int, cols: _FakeColumns, rng: np.random.Generator) -> None:
    """Write ``n_lines`` fake lines to ``path`` (atomically)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path) as out:
        for start in range(0, n_lines, CHUNK_LINES):
            n = min(CHUNK_LINES, n_lines - start)
            out.write(_assemble_lines(_chunk_fields(n, cols, rng)))


def write_fake_kaggle(path: str, n_lines: int, seed: int = 0) -> str:
    """Write a Kaggle-layout ``train.txt`` of ``n_lines`` fake lines; return its path."""
    rng = np.random.default_rng(seed)
    _write_lines(path, n_lines, _FakeColumns(n_lines, rng), rng)
    return path


def write_fake_terabyte(prefix: str, days: int, lines_per_day: int, seed: int = 0) -> List[str]:
    """Write Terabyte-layout day files ``<prefix>_0`` .. ``<prefix>_{days-1}``; return their paths.

    The vocabularies are shared by all days, so later days mostly repeat earlier values.
    """
    rng = np.random.default_rng(seed)
    cols = _FakeColumns(days * lines_per_day, rng)
    paths = [f"{prefix}_{day}" for day in range(days)]
    for path in paths:
        _write_lines(path, lines_per_day, cols, rng)
    return paths

