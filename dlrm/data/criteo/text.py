"""Raw Criteo text: the line ranges of the days, blocks of whole lines, and each day read as blocks.

Kaggle's ``train.txt`` is cut into 7 consecutive days (N//7 lines, the first N%7 days one longer);
Terabyte has one file per day. Days are read from their byte ranges of the raw files (the
reference's text part files are not written), in blocks of about TEXT_BLOCK_BYTES: a second
thread parses a block (:mod:`.parse`) while the caller maps the previous one to ids and writes it.
A missing, empty or not regular raw file is an error naming it, with a download hint.
"""
from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from dlrm.common import DataError, first_line, non_regular_kind
from dlrm.data.criteo.config import ROWS_PER_CHUNK, CriteoPaths, PreprocessConfig, progress_bar
from dlrm.data.criteo.parse import Block, Codes, block_from_table, parse_text_block
from dlrm.data.criteo.schema import KAGGLE_HINT, NUM_SPARSE, TERABYTE_HINT
from dlrm.io.npz import NpzReader

TEXT_BLOCK_BYTES = 8 << 20  # raw text per block (measured best among 2-32 MiB)


@dataclass(frozen=True)
class TextRange:
    """Lines of one day inside a raw text file.

    Attributes:
        path: the raw file the user gave (Kaggle's train.txt or a Terabyte day file).
        start, stop: byte range, starting at a line start.
        first_line: 1-based line number of the range's first line in ``path``.
        lines: number of lines in the range.
    """

    path: str
    start: int
    stop: int
    first_line: int
    lines: int


_COUNT_PIECE = 1 << 20


def _count_lines(path: str, bar: tqdm) -> Tuple[int, List[Tuple[int, int]]]:
    """Count the lines of ``path``; also return (byte offset, newlines) per 1 MiB piece."""
    pieces, total, last = [], 0, b"\n"
    buffer = bytearray(64 << 20)
    with open(path, "rb", buffering=0) as src:
        offset = 0
        while True:
            size = src.readinto(buffer)
            if not size:
                break
            for start in range(0, size, _COUNT_PIECE):
                newlines = buffer.count(b"\n", start, min(size, start + _COUNT_PIECE))
                pieces.append((offset + start, newlines))
                total += newlines
            offset, last = offset + size, buffer[size - 1: size]
            bar.update(size)
    return total + (last != b"\n"), pieces


def _line_offset(path: str, blocks: List[Tuple[int, int]], line: int, size: int) -> int:
    """Byte offset where 0-based ``line`` starts, i.e. just after the line-th newline
    (``size`` when there are fewer newlines)."""
    if line == 0:
        return 0
    seen = 0
    for offset, newlines in blocks:
        if seen + newlines >= line:
            with open(path, "rb") as src:
                src.seek(offset)
                data = np.frombuffer(src.read(_COUNT_PIECE), dtype=np.uint8)
            return offset + int(np.flatnonzero(data == 10)[line - seen - 1]) + 1
        seen += newlines
    return size


def _kaggle_ranges(path: str, days: int, progress: bool) -> List[TextRange]:
    """Split train.txt into ``days`` consecutive line ranges (N//days lines, the first N%days
    parts one longer), as the reference's part files."""
    size = os.path.getsize(path)
    with progress_bar(progress, size, "count lines", unit="B") as bar:
        total, blocks = _count_lines(path, bar)
    sizes = [total // days + (1 if i < total % days else 0) for i in range(days)]
    starts = np.concatenate(([0], np.cumsum(sizes))).astype(int)
    offsets = [_line_offset(path, blocks, int(line), size) for line in starts]
    return [TextRange(path, offsets[i], offsets[i + 1], int(starts[i]) + 1, sizes[i])
            for i in range(days)]


def _terabyte_ranges(raw: str, days: int, progress: bool) -> List[TextRange]:
    """One range per day file ``<raw>_<i>``."""
    ranges = []
    for i in range(days):
        path = f"{raw}_{i}"
        size = os.path.getsize(path)
        with progress_bar(progress, size, f"count lines day {i}", unit="B") as bar:
            ranges.append(TextRange(path, 0, size, 1, _count_lines(path, bar)[0]))
    return ranges


def missing_raw_data(cfg: PreprocessConfig) -> Optional[DataError]:
    """A DataError with a download hint naming the first raw file that is missing; None when
    every raw file is there."""
    if cfg.data_set == "kaggle":
        return _raw_file_missing(cfg.raw_data_file, "raw Criteo Kaggle data", KAGGLE_HINT)
    for i in range(cfg.paths.days):
        missing = _raw_file_missing(f"{cfg.raw_data_file}_{i}", "raw Criteo Terabyte day file",
                                    TERABYTE_HINT)
        if missing is not None:
            return missing
    return None


def _raw_file_missing(path: str, what: str, hint: str) -> Optional[DataError]:
    """The "not found" DataError (with the download ``hint``) when ``path`` does not exist; None
    when it is a regular file. Raises DataError saying what ``path`` is when it exists but is no
    regular file (a directory, a FIFO, a device) or cannot be looked at."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        dangling = " (a symbolic link to a missing file)" if os.path.islink(path) else ""
        return DataError(f"{path}: {what} not found{dangling}; {hint}")
    except OSError as err:
        raise DataError(f"{path}: cannot read the {what} ({first_line(err)})") from None
    kind = non_regular_kind(mode)
    if kind is not None:
        raise DataError(f"{path}: the {what} is {kind}, not a regular file")
    return None


def day_ranges(cfg: PreprocessConfig, paths: CriteoPaths) -> List[TextRange]:
    """Line ranges of every day, lines counted (the writers reserve space for them)."""
    missing = missing_raw_data(cfg)
    if missing is not None:
        raise missing
    for path in raw_files(cfg, paths):
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: the raw data file is empty")
    if cfg.data_set == "kaggle":
        return _kaggle_ranges(cfg.raw_data_file, paths.days, cfg.progress)
    return _terabyte_ranges(cfg.raw_data_file, paths.days, cfg.progress)


def _iter_text_blocks(text: TextRange) -> Iterator[bytes]:
    """Blocks of whole lines of about TEXT_BLOCK_BYTES. DataError when the file ends before the
    range does (it shrank since its lines were counted)."""
    carry = b""
    with open(text.path, "rb") as src:
        src.seek(text.start)
        left = text.stop - text.start
        while left > 0 or carry:
            read = src.read(min(TEXT_BLOCK_BYTES, left)) if left > 0 else b""
            if left > 0 and not read:
                raise DataError(f"{text.path}: ends at byte {text.stop - left}, before byte "
                                f"{text.stop} where its lines were counted (it changed while "
                                "being read)")
            data = carry + read
            left -= len(read)
            cut = data.rfind(b"\n") + 1 if left > 0 else len(data)
            if cut == 0:  # a line longer than a block: read on
                carry = data
                continue
            carry = data[cut:]
            yield data[:cut]


def iter_text_day(text: TextRange, rng: Optional[np.random.RandomState], rate: float,
                  modulo: int) -> Iterator[Tuple[int, Block]]:
    """(raw lines read, block) for one day of raw text. Draws one uniform per line when ``rng``.

    A second thread reads, parses and converts the next block while the caller maps this one
    to ids and writes it (pyarrow and most NumPy work run without the GIL). Only that thread
    draws from ``rng`` during the day, one block after the other, so the draws stay in order.
    """
    blocks = _iter_text_blocks(text)
    next_line = [text.first_line]

    def convert_next():
        block = next(blocks, None)
        if block is None:
            return None
        first_line = next_line[0]
        table = parse_text_block(text.path, first_line, block)
        next_line[0] += table.num_rows
        uniforms = rng.random_sample(table.num_rows) if rng is not None else None
        converted = block_from_table(text.path, first_line, table, uniforms, rate, modulo)
        return table.num_rows, converted

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(convert_next)
        while True:
            item = future.result()
            if item is None:
                return
            future = pool.submit(convert_next)
            yield item


def iter_parsed_day(path: str) -> Iterator[Tuple[int, Block]]:
    """(rows, block) of a parsed day file ``<npzfile>_<i>.npz``, ROWS_PER_CHUNK at a time."""
    with NpzReader(path) as reader:
        total = int(reader.shape("y")[0])
        for start in range(0, total, ROWS_PER_CHUNK):
            stop = min(total, start + ROWS_PER_CHUNK)
            raw = reader.rows("X_cat_t", start, stop, transposed=True).astype(np.int64)
            codes = []
            for k in range(NUM_SPARSE):
                encoded = pa.array(np.ascontiguousarray(raw[:, k])).dictionary_encode()
                codes.append(Codes(encoded.indices.to_numpy(), encoded.dictionary.to_numpy()))
            block = Block(reader.rows("y", start, stop).astype(np.int32),
                          reader.rows("X_int", start, stop).astype(np.int32), codes)
            yield stop - start, block


def raw_files(cfg: PreprocessConfig, paths: CriteoPaths) -> List[str]:
    """The raw files: Kaggle's train.txt, or Terabyte's day files."""
    if cfg.data_set == "kaggle":
        return [cfg.raw_data_file]
    return [f"{cfg.raw_data_file}_{i}" for i in range(paths.days)]
