"""Criteo preprocessing: raw tab-separated text to the reference's npz files.

Its command line is the front door ``data_utils.py`` (:func:`main` here).

Stages, each resumable (its outputs are written under a temporary name and renamed when
complete, so a file with a final name is always whole, and then get a provenance record; see
"Reuse" below):

    1. split    day line ranges: Kaggle's ``train.txt`` is cut into 7 consecutive parts (N//7
                lines, the first N%7 parts one longer); Terabyte has one file per day
    2. parse    ``<npzfile>_<i>.npz``            X_cat_t (26,n) raw hashes, X_int (n,13) int32, y (n,) int32
    3. counts   ``<d_file>_day_count.npz``      total_per_file (lines kept per day)
    4. dicts    ``<d_file>_fea_dict_<j>.npz``   unique: raw values in id order (first seen, days in order)
                ``<d_file>_fea_count.npz``      counts (26,) int32
    5. ids      ``<npzfile>_<i>_processed.npz`` X_cat (n,26) int32 ids, X_int clamped at 0, y
    6. concat   ``<o_filename>.npz``            X_cat, X_int, y, counts   (not with --memory-map)
    7. shuffle  ``<npzfile>_<j>_intermediate_{y,d,s}.npy`` then ``<npzfile>_<j>_reordered.npz``
                (--memory-map only; the reference's two-pass "Fisher-Yates-Rao" shuffle)

Sequentially, stages 2, 4 and 5 run fused: ids are given in first-seen order, so day i's ids are
final as soon as days 0..i have been read, and each day is read once. With
``--dataset-multiprocessing`` days are parsed in parallel, the per-day first-seen values are merged
in day order, and days are then mapped to ids in parallel; the files are the same.

Speed: raw text is read in 8 MiB blocks; a second thread parses a block with pyarrow's CSV reader
and converts it while the main thread maps the previous one to ids and writes it. Hex hashes are
converted only for each block's distinct values; ids come from a sorted-array dictionary (binary
search); npz files are written uncompressed and streamed straight into their zip members, so no
day is ever held in memory; the concatenation copies the day files' bytes in the kernel.

Memory (peak, sequential): about 110 MB above the imports for block buffers, plus about 40 bytes
per distinct categorical value (the dictionaries, with merge temporaries). Stage 7 adds a
permutation of 8 bytes per row of the largest day, and pass 2 reads its bucket through a
read-only memory map (page cache the kernel can reclaim, but counted in RSS: up to 216 bytes per
row of the largest day). With --dataset-multiprocessing each worker holds block buffers and, while
mapping ids, its own copy of the dictionaries.

Disk, per kept line: parsed days 160 B, processed days 160 B, concatenated output 160 B; with
--memory-map instead of the output, intermediates 216 B and reordered days 216 B. Dictionaries:
4 B per distinct value. Raw hashes are stored as uint32 (int32, as the reference, when
0 < --max-ind-range <= 2**31). The text part files of the reference (``<npzfile>_0`` .. ``_6``)
are not written: days are read from their byte ranges of ``train.txt``.

The NumPy random stream (seeded with --numpy-rand-seed) is drawn from in the reference's order:
one uniform per raw line of each day when sub-sampling, then (memory-map, randomize total) each
day's bucket draws (one per row, the last day's too, then the re-draws of rows whose bucket was
full), then one permutation per shuffled bucket. When
a run resumes, draws of stages that already completed are replayed, so a resumed run writes the
same files as an uninterrupted one; when everything is complete nothing is drawn.

Reuse: the reference reuses any file that has the right name. Here every file gets a provenance
record (``<file>.provenance.json``, see provenance.py: the raw files' identity, the options that
change the file, the format version), and a stage's file is reused only when its record matches
this run; otherwise the stage is redone, with one note per stage saying why. Two runs on one directory
take turns: the second waits for the first (a lock on ``.dlrm-preprocess.lock`` there, removed
when the first is done) and then reuses its files, so no run removes another's files in flight. Files without a
record (made by the reference or an older version) are never reused, except an existing
--processed-data-file (the user named it; the loaders check its values when they open it) and,
when the raw data is missing, the final files (they are all there is). Raw values the model cannot
take are errors naming the file and line: a label other than 0 or 1 (an empty label reads as 0,
as in the reference), an empty line (the reference crashes on one; skipping it would move the
day boundaries, which come from the line count), an empty file.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import concurrent.futures.process
import contextlib
import ctypes
import dataclasses
import fcntl
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
from tqdm import tqdm

from dlrm.cli import FlagParser, run_command
from dlrm.common import ConfigError, DataError, DLRMError, Interrupted, first_line, non_regular_kind
from dlrm.io import interrupts, provenance
from dlrm.io.atomic import atomic_open, atomic_path, remove_stale_temps, remove_temps_of, writing
from dlrm.io.npz import Member, NpyWriter, NpzReader, NpzStreamWriter, load_npz_array, npz_rows, save_npz
from dlrm.outputs.metrics import stderr_is_terminal

NUM_DENSE = 13
NUM_SPARSE = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
FIELD_NAMES = ("label",) + tuple(f"I{k}" for k in range(1, NUM_DENSE + 1)) + tuple(
    f"C{k}" for k in range(1, NUM_SPARSE + 1))

KAGGLE_HINT = ("download train.txt of the Criteo Display Advertising Challenge dataset "
               "(https://ailab.criteo.com/ressources/) and put it there")
TERABYTE_HINT = ("download day_0 .. day_23 of the Criteo 1TB Click Logs "
                 "(https://labs.criteo.com/2013/12/download-terabyte-click-logs/), unzip them and "
                 "pass their common prefix (e.g. ./input/day) as --raw-data-file")

TEXT_BLOCK_BYTES = 8 << 20  # raw text per block (measured best among 2-32 MiB)
ROWS_PER_CHUNK = 1 << 18  # rows per read/write of npz data
RANDOMIZE_CHOICES = ("total", "day", "none")
SPLIT_CHOICES = ("train", "test", "val", "none")


# ------------------------------------------------------------------------------------------------
# Paths and configuration
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CriteoPaths:
    """File names derived from (--data-set, --raw-data-file), as the reference derives them.

    Attributes:
        d_path: directory of the raw file, with a trailing "/" ("./" for a bare file name).
        d_file: Kaggle: the raw basename up to its first "."; Terabyte: the whole basename.
        npzfile: stem of the per-day files (Kaggle: d_path + d_file + "_day"; Terabyte: d_path + d_file).
        days: 7 (Kaggle) or 24 (Terabyte).
        o_filename: base name of the concatenated output.
    """

    d_path: str
    d_file: str
    npzfile: str
    days: int
    o_filename: str

    def day_count_file(self) -> str:
        return f"{self.d_path}{self.d_file}_day_count.npz"

    def fea_count_file(self) -> str:
        return f"{self.d_path}{self.d_file}_fea_count.npz"

    def fea_dict_file(self, j: int) -> str:
        return f"{self.d_path}{self.d_file}_fea_dict_{j}.npz"

    def parsed_day(self, i: int) -> str:
        return f"{self.npzfile}_{i}.npz"

    def processed_day(self, i: int) -> str:
        return f"{self.npzfile}_{i}_processed.npz"

    def intermediate_day(self, j: int, part: str) -> str:
        """``part`` is "y" (labels), "d" (dense) or "s" (sparse ids)."""
        return f"{self.npzfile}_{j}_intermediate_{part}.npy"

    def reordered_day(self, i: int) -> str:
        return f"{self.npzfile}_{i}_reordered.npz"

    def output_file(self) -> str:
        return f"{self.d_path}{self.o_filename}.npz"


def criteo_paths(data_set: str, raw_data_file: str) -> CriteoPaths:
    """Derive every file name of the pipeline from the data set and the raw file.

    ``./input/train.txt`` (kaggle) gives day files ``./input/train_day_<i>...``; ``./input/day``
    (terabyte) gives ``./input/day_<i>...``.
    """
    if data_set not in ("kaggle", "terabyte"):
        raise ConfigError(f"--data-set must be kaggle or terabyte, got {data_set!r}")
    if not raw_data_file:
        raise ConfigError("--raw-data-file is required for the Criteo data sets")
    d_path = (os.path.dirname(raw_data_file) or ".") + "/"
    base = os.path.basename(raw_data_file)
    if data_set == "kaggle":
        d_file = base.split(".")[0]
        return CriteoPaths(d_path, d_file, d_path + d_file + "_day", 7,
                           "kaggleAdDisplayChallenge_processed")
    return CriteoPaths(d_path, base, d_path + base, 24, "terabyte_processed")


@dataclass(frozen=True)
class PreprocessConfig:
    """What to preprocess and how (the reference's data flags).

    ``data_split`` is the reference's internal split argument; only "none" changes anything
    (memory-map shuffle: every day, the last included, is shuffled across all days). ``seed``
    (--numpy-rand-seed) seeds the NumPy stream that sub-sampling and the memory-map shuffle draw
    from.
    """

    data_set: str
    raw_data_file: str
    processed_data_file: str = ""
    max_ind_range: int = -1
    sub_sample_rate: float = 0.0
    randomize: str = "total"
    memory_map: bool = False
    multiprocessing: bool = False
    progress: bool = True
    data_split: str = "train"
    seed: int = 123


def check_config(cfg: PreprocessConfig) -> CriteoPaths:
    """Check flag values; return the derived paths. Raises ConfigError naming the flag."""
    if cfg.randomize not in RANDOMIZE_CHOICES:
        raise ConfigError(f"--data-randomize must be total, day or none, got {cfg.randomize!r}")
    if not 0.0 <= cfg.sub_sample_rate <= 1.0:
        raise ConfigError(f"--data-sub-sample-rate must be in [0, 1], got {cfg.sub_sample_rate}")
    if cfg.data_split not in SPLIT_CHOICES:
        raise ConfigError(f"data_split must be one of {', '.join(SPLIT_CHOICES)}, got {cfg.data_split!r}")
    return criteo_paths(cfg.data_set, cfg.raw_data_file)


def _raw_dtype(cfg: PreprocessConfig) -> np.dtype:
    """dtype of raw hashes in parsed days and dictionaries: int32 (as the reference) when
    --max-ind-range keeps them below 2**31, else uint32, which holds every 8-hex-digit hash
    (the reference stores int32, which overflows, or on NumPy 2 raises, for hashes >= 2**31)."""
    return np.dtype(np.int32 if 0 < cfg.max_ind_range <= 2**31 else np.uint32)


def _bar(progress: bool, total: Optional[int], desc: str, unit: str = "lines") -> tqdm:
    """A tqdm progress bar on stderr when it is a terminal, or a disabled one."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True,
                disable=not (progress and stderr_is_terminal()),
                file=sys.stderr, dynamic_ncols=True, leave=False)


# ------------------------------------------------------------------------------------------------
# Raw text: day ranges, blocks, parsing
# ------------------------------------------------------------------------------------------------

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
    with _bar(progress, size, "count lines", unit="B") as bar:
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
        with _bar(progress, size, f"count lines day {i}", unit="B") as bar:
            ranges.append(TextRange(path, 0, size, 1, _count_lines(path, bar)[0]))
    return ranges


def missing_raw_data(cfg: PreprocessConfig) -> Optional[DataError]:
    """A DataError with a download hint naming the first raw file that is missing; None when
    every raw file is there."""
    return _missing_raw_data(cfg, criteo_paths(cfg.data_set, cfg.raw_data_file))


def _missing_raw_data(cfg: PreprocessConfig, paths: CriteoPaths) -> Optional[DataError]:
    if cfg.data_set == "kaggle":
        return _raw_file_missing(cfg.raw_data_file, "raw Criteo Kaggle data", KAGGLE_HINT)
    for i in range(paths.days):
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


def _day_ranges(cfg: PreprocessConfig, paths: CriteoPaths) -> List[TextRange]:
    """Line ranges of every day, lines counted (the writers reserve space for them)."""
    missing = _missing_raw_data(cfg, paths)
    if missing is not None:
        raise missing
    for path in _raw_files(cfg, paths):
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


_COLUMN_NAMES = [f"f{k}" for k in range(NUM_FIELDS)]
_COLUMN_TYPES = {name: (pa.int32() if k <= NUM_DENSE else pa.binary())
                 for k, name in enumerate(_COLUMN_NAMES)}
_PARSE_OPTIONS = pa_csv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                     double_quote=False, newlines_in_values=False,
                                     ignore_empty_lines=False)
_CONVERT_OPTIONS = pa_csv.ConvertOptions(column_types=_COLUMN_TYPES, null_values=[""],
                                         strings_can_be_null=False, check_utf8=False)
_INT_RE = re.compile(rb"[+-]?[0-9]+")
_HEX_RE = re.compile(rb"[0-9a-fA-F]{1,8}")


def _blank_line(block: bytes) -> int:
    """0-based number of the first empty line of ``block`` (a line of its own carriage return
    counts: pyarrow takes that for a line break too), -1 when there is none."""
    if block[:1] in (b"\n", b"\r"):
        return 0
    found = [at for at in (block.find(b"\n\n"), block.find(b"\n\r")) if at >= 0]
    return block.count(b"\n", 0, min(found) + 1) if found else -1


def _parse_text_block(path: str, first_line: int, block: bytes) -> pa.Table:
    """Parse one block of raw lines with pyarrow; a malformed line raises DataError naming it.

    An empty line is an error too: pyarrow would read it as a sample of zeros, and skipping it
    would move the day boundaries, which the reference derives from the number of lines. (Any
    line break pyarrow sees that is not a newline, e.g. a stray carriage return, splits a line
    into pieces with too few fields, so rows and lines correspond.)"""
    blank = _blank_line(block)
    if blank >= 0:
        raise DataError(f"{path}:{first_line + blank}: empty line (expected {NUM_FIELDS} "
                        "tab-separated fields)")
    options = pa_csv.ReadOptions(column_names=_COLUMN_NAMES, use_threads=False,
                                 block_size=1 << 20)  # larger blocks parse slower
    try:
        table = pa_csv.read_csv(pa.BufferReader(pa.py_buffer(block)), read_options=options,
                                parse_options=_PARSE_OPTIONS, convert_options=_CONVERT_OPTIONS)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise _malformed_line_error(path, first_line, bytes(block), str(exc)) from None
    return table


def _malformed_line_error(path: str, first_line: int, block: bytes, reason: str) -> DataError:
    """Find the first malformed line of ``block`` and describe it (slow; only on errors)."""
    lines = block.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for k, line in enumerate(lines):
        fields = line.rstrip(b"\r").split(b"\t")
        where = f"{path}:{first_line + k}"
        if len(fields) != NUM_FIELDS:
            return DataError(f"{where}: expected {NUM_FIELDS} tab-separated fields, got {len(fields)}")
        for f, value in enumerate(fields):
            if not value:
                continue
            if f <= NUM_DENSE and not (_INT_RE.fullmatch(value) and -2**31 <= int(value) < 2**31):
                return DataError(f"{where}: field {f + 1} ({FIELD_NAMES[f]}) is not a 32-bit "
                                 f"integer: {value.decode('latin1')!r}")
            if f > NUM_DENSE and not _HEX_RE.fullmatch(value):
                return DataError(f"{where}: field {f + 1} ({FIELD_NAMES[f]}) is not a hexadecimal "
                                 f"category of at most 8 digits: {value.decode('latin1')!r}")
    rejected, why = _first_rejected_line(lines)
    if rejected < 0:  # no single line fails alone (not seen): name the block
        return DataError(f"{path}:{first_line}-{first_line + len(lines) - 1}: "
                         f"{_arrow_reason(reason)}")
    return DataError(f"{path}:{first_line + rejected}: {why}")


def _arrow_rejects(lines: Sequence[bytes]) -> Optional[str]:
    """pyarrow's reason for rejecting these raw lines (as _parse_text_block parses them), or None
    when it reads them."""
    options = pa_csv.ReadOptions(column_names=_COLUMN_NAMES, use_threads=False)
    try:
        pa_csv.read_csv(pa.BufferReader(b"\n".join(lines) + b"\n"), read_options=options,
                        parse_options=_PARSE_OPTIONS, convert_options=_CONVERT_OPTIONS)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        return str(exc)
    return None


def _first_rejected_line(lines: Sequence[bytes]) -> Tuple[int, str]:
    """(index of the first line pyarrow rejects, why) by bisection over ``lines`` (lines are
    independent: no quoting, no line breaks in values); (-1, "") when none fails alone."""
    low, high = 0, len(lines)  # the first rejected line lies in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if _arrow_rejects(lines[low:middle]) is not None:
            high = middle
        else:
            low = middle
    reason = _arrow_rejects(lines[low:high]) if high > low else None
    return (low, _arrow_reason(reason)) if reason is not None else (-1, "")


_ARROW_COLUMN = re.compile(r"In CSV column #(\d+): (?:Row #\d+: )?(.*)", re.DOTALL)


def _arrow_reason(reason: str) -> str:
    """pyarrow's message in one line, with its column number as the field it is ("field 2 (I1)
    cannot be read: ...") and without its row number (which counts from a block's start)."""
    found = _ARROW_COLUMN.match(reason.strip())
    if found and int(found.group(1)) < NUM_FIELDS:
        column = int(found.group(1))
        return first_line(f"field {column + 1} ({FIELD_NAMES[column]}) cannot be read: "
                          f"{found.group(2)}")
    return f"cannot parse: {first_line(reason)}"


_HEX_NIBBLE = np.full(256, 255, dtype=np.uint8)
for _k, _c in enumerate(b"0123456789abcdef"):
    _HEX_NIBBLE[_c] = _k
for _k, _c in enumerate(b"ABCDEF"):
    _HEX_NIBBLE[_c] = 10 + _k


def _nibbles_to_values(nibbles: np.ndarray) -> np.ndarray:
    """(m, 8) hex digit values (most significant first) -> (m,) int64."""
    packed = np.ascontiguousarray((nibbles[:, 0::2] << 4) | nibbles[:, 1::2])  # big-endian bytes
    return packed.view(">u4").ravel().astype(np.int64)


@dataclass
class _Codes:
    """A column of a block as (index into distinct values, distinct values).

    ``values[index]`` is the column; ``values`` may repeat a value (upper/lower case hex,
    --max-ind-range collisions).
    """

    index: np.ndarray
    values: np.ndarray


def _binary_chunks(column: pa.ChunkedArray) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(offsets (L+1,), data bytes) of each chunk of a binary column."""
    for array in column.chunks:
        buffers = array.buffers()
        offsets = np.frombuffer(buffers[1], dtype=np.int32)[array.offset: array.offset + len(array) + 1]
        data = (np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None
                else np.zeros(0, dtype=np.uint8))
        yield offsets, data


def _hex_keys(column: pa.ChunkedArray) -> Optional[np.ndarray]:
    """The 8 characters of every field as one uint64 (0 for an empty field), or None when some
    field has another length (then _hex_general parses the column)."""
    keys = np.zeros(len(column), dtype=np.uint64)
    position = 0
    for offsets, data in _binary_chunks(column):
        lengths = np.diff(offsets)
        full = lengths == 8
        if not np.all(full | (lengths == 0)):
            return None
        chars = data[offsets[0]: offsets[-1]].view(np.uint64)
        target = keys[position: position + len(lengths)]
        if len(chars) == len(lengths):
            target[:] = chars
        else:
            target[full] = chars
        position += len(lengths)
    return keys


def _hex_codes(column: pa.ChunkedArray, keep: Optional[np.ndarray], line_of: Callable[[int], str],
               field_no: int, modulo: int) -> _Codes:
    """Distinct-value codes of one categorical column (empty field -> 0, as the reference).

    Fast path (every field empty or 8 digits): the 8 characters are the uint64 key that is
    dictionary-encoded, and only the distinct keys are converted from hex.
    """
    keys = _hex_keys(column)
    if keys is not None:
        if keep is not None:
            keys = keys[keep]
        encoded = pa.array(keys).dictionary_encode()
        index = encoded.indices.to_numpy()
        distinct = encoded.dictionary.to_numpy()
        chars = distinct.view(np.uint8).reshape(len(distinct), 8)
        nibbles = _HEX_NIBBLE[chars]
        bad = (nibbles == 255).any(axis=1) & (distinct != 0)
        if bad.any():
            row = int(np.flatnonzero(index == np.flatnonzero(bad)[0])[0])
            row = int(np.flatnonzero(keep)[row]) if keep is not None else row
            raise _bad_hex(line_of(row), field_no, bytes(chars[np.flatnonzero(bad)[0]]))
        values = np.where(distinct == 0, 0, _nibbles_to_values(nibbles))
    else:
        values = _hex_general(column, line_of, field_no)
        if keep is not None:
            values = values[keep]
        encoded = pa.array(values).dictionary_encode()
        index, values = encoded.indices.to_numpy(), encoded.dictionary.to_numpy()
    if modulo > 0:
        values = values % modulo
    return _Codes(index, values)


def _bad_hex(where: str, field_no: int, text: bytes) -> DataError:
    return DataError(f"{where}: field {field_no + 1} ({FIELD_NAMES[field_no]}) is not a "
                     f"hexadecimal category of at most 8 digits: {text.decode('latin1')!r}")


def _hex_general(column: pa.ChunkedArray, line_of: Callable[[int], str],
                 field_no: int) -> np.ndarray:
    """Hex fields of any length 0..8 -> (b,) int64, right-aligned into 8 digits."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets, data = next(_binary_chunks(pa.chunked_array([array])))
    lengths = np.diff(offsets)
    too_long = np.flatnonzero(lengths > 8)
    if len(too_long):
        row = int(too_long[0])
        raise _bad_hex(line_of(row), field_no, bytes(data[offsets[row]: offsets[row + 1]]))
    count = len(lengths)
    digits = np.full((count, 8), ord("0"), dtype=np.uint8)
    row_of_char = np.repeat(np.arange(count), lengths)
    position = np.arange(offsets[-1] - offsets[0]) - (offsets[row_of_char] - offsets[0])
    digits[row_of_char, 8 - lengths[row_of_char] + position] = data[offsets[0]: offsets[-1]]
    nibbles = _HEX_NIBBLE[digits]
    bad = np.flatnonzero((nibbles == 255).any(axis=1))
    if len(bad):
        row = int(bad[0])
        raise _bad_hex(line_of(row), field_no, bytes(data[offsets[row]: offsets[row + 1]]))
    return _nibbles_to_values(nibbles)


@dataclass
class _Block:
    """Rows of one day read from text or from a parsed day file.

    Attributes:
        labels: (b,) int32.
        dense: (b, 13) int32, unclamped.
        codes: 26 _Codes, one per categorical column.
    """

    labels: np.ndarray
    dense: np.ndarray
    codes: List[_Codes]


def _int_column(table: pa.Table, k: int) -> np.ndarray:
    return table.column(k).fill_null(0).to_numpy()


def _block_from_table(path: str, first_line: int, table: pa.Table, uniforms: Optional[np.ndarray],
                      rate: float, modulo: int) -> _Block:
    """Convert a parsed block: drop sub-sampled negatives, hex -> int, distinct-value codes.
    A label other than 0 or 1 (an empty one reads as 0, as in the reference) raises DataError."""
    labels = _int_column(table, 0)
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if len(bad):
        raise DataError(f"{path}:{first_line + int(bad[0])}: field 1 (label) must be 0 or 1, "
                        f"got {labels[bad[0]]}")
    keep = None
    if uniforms is not None:
        keep = ~((labels == 0) & (uniforms < rate))
        labels = labels[keep]
    dense = np.empty((len(labels), NUM_DENSE), dtype=np.int32)
    for k in range(NUM_DENSE):
        column = _int_column(table, 1 + k)
        dense[:, k] = column[keep] if keep is not None else column

    def line_of(row: int) -> str:
        return f"{path}:{first_line + row}"

    codes = [_hex_codes(table.column(f), keep, line_of, f, modulo)
             for f in range(1 + NUM_DENSE, NUM_FIELDS)]
    return _Block(labels, dense, codes)


def _iter_text_day(text: TextRange, rng: Optional[np.random.RandomState], rate: float,
                   modulo: int) -> Iterator[Tuple[int, _Block]]:
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
        table = _parse_text_block(text.path, first_line, block)
        next_line[0] += table.num_rows
        uniforms = rng.random_sample(table.num_rows) if rng is not None else None
        converted = _block_from_table(text.path, first_line, table, uniforms, rate, modulo)
        return table.num_rows, converted

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(convert_next)
        while True:
            item = future.result()
            if item is None:
                return
            future = pool.submit(convert_next)
            yield item


def _iter_parsed_day(path: str) -> Iterator[Tuple[int, _Block]]:
    """(rows, block) of a parsed day file ``<npzfile>_<i>.npz``, ROWS_PER_CHUNK at a time."""
    with NpzReader(path) as reader:
        total = int(reader.shape("y")[0])
        for start in range(0, total, ROWS_PER_CHUNK):
            stop = min(total, start + ROWS_PER_CHUNK)
            raw = reader.rows("X_cat_t", start, stop, transposed=True).astype(np.int64)
            codes = []
            for k in range(NUM_SPARSE):
                encoded = pa.array(np.ascontiguousarray(raw[:, k])).dictionary_encode()
                codes.append(_Codes(encoded.indices.to_numpy(), encoded.dictionary.to_numpy()))
            block = _Block(reader.rows("y", start, stop).astype(np.int32),
                           reader.rows("X_int", start, stop).astype(np.int32), codes)
            yield stop - start, block


# ------------------------------------------------------------------------------------------------
# Dictionaries: raw value -> id in first-seen order
# ------------------------------------------------------------------------------------------------

class ColumnDictionary:
    """Raw categorical values of one column -> ids 0..c-1 in order of first appearance.

    Stored as sorted (key, id) arrays, a large main part and a small recent part that is merged
    into the main one when it grows past an eighth of it, so a lookup is two binary searches and
    inserting amortises to O(log) moves per value.
    """

    def __init__(self, values_in_id_order: Optional[np.ndarray] = None, source: str = ""):
        values = np.asarray(values_in_id_order if values_in_id_order is not None else [],
                            dtype=np.int64)
        order = np.argsort(values, kind="stable")
        self._keys, self._ids = values[order], order.astype(np.int64)
        if len(values) and np.any(self._keys[1:] == self._keys[:-1]):
            raise DataError(f"{source or 'dictionary'}: holds a value twice")
        self._recent_keys = np.zeros(0, dtype=np.int64)
        self._recent_ids = np.zeros(0, dtype=np.int64)
        self.size = len(values)

    def __len__(self) -> int:
        return self.size

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Ids (int64) of ``values`` (any order, repeats allowed); unseen values get new ids in
        order of first appearance."""
        values = np.asarray(values, dtype=np.int64)
        order = np.argsort(values)
        sorted_values = values[order]
        if len(values) > 1 and np.any(sorted_values[1:] == sorted_values[:-1]):
            encoded = pa.array(values).dictionary_encode()
            return self.encode_distinct(encoded.dictionary.to_numpy())[encoded.indices.to_numpy()]
        return self._encode_sorted(order, sorted_values)

    def encode_distinct(self, distinct: np.ndarray) -> np.ndarray:
        """Ids of distinct values given in first-seen order."""
        distinct = np.asarray(distinct, dtype=np.int64)
        order = np.argsort(distinct)
        return self._encode_sorted(order, distinct[order])

    def _encode_sorted(self, order: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
        found = self._lookup(sorted_values)
        ids = np.empty(len(order), dtype=np.int64)
        ids[order] = found
        missing = found < 0
        if missing.any():
            new_positions = np.sort(order[missing])  # first-seen order of the new values
            ids[new_positions] = self.size + np.arange(len(new_positions))
            self._insert(sorted_values[missing], ids[order[missing]])
            self.size += len(new_positions)
        return ids

    def values_in_id_order(self) -> np.ndarray:
        """(c,) int64: the raw value of each id (the reference's ``unique``)."""
        out = np.empty(self.size, dtype=np.int64)
        out[self._ids] = self._keys
        out[self._recent_ids] = self._recent_keys
        return out

    @staticmethod
    def _find(keys: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> np.ndarray:
        if len(keys) == 0:
            return np.full(len(queries), -1, dtype=np.int64)
        position = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
        return np.where(keys[position] == queries, ids[position], -1)

    def _lookup(self, sorted_queries: np.ndarray) -> np.ndarray:
        found = self._find(self._keys, self._ids, sorted_queries)
        if len(self._recent_keys):
            missing = found < 0
            found[missing] = self._find(self._recent_keys, self._recent_ids,
                                        sorted_queries[missing])
        return found

    @staticmethod
    def _merge(keys, ids, new_keys, new_ids):
        """Merge two sorted (key, id) arrays."""
        at = np.searchsorted(keys, new_keys) + np.arange(len(new_keys))
        merged_keys = np.empty(len(keys) + len(new_keys), dtype=np.int64)
        merged_ids = np.empty_like(merged_keys)
        old = np.ones(len(merged_keys), dtype=bool)
        old[at] = False
        merged_keys[at], merged_ids[at] = new_keys, new_ids
        merged_keys[old], merged_ids[old] = keys, ids
        return merged_keys, merged_ids

    def _insert(self, sorted_keys: np.ndarray, ids: np.ndarray) -> None:
        self._recent_keys, self._recent_ids = self._merge(self._recent_keys, self._recent_ids,
                                                          sorted_keys, ids)
        if len(self._recent_keys) > max(1 << 16, len(self._keys) // 8):
            self._keys, self._ids = self._merge(self._keys, self._ids, self._recent_keys,
                                                self._recent_ids)
            self._recent_keys = self._recent_ids = np.zeros(0, dtype=np.int64)


def _save_dictionaries(paths: CriteoPaths, dictionaries: List[ColumnDictionary],
                       raw_dtype: np.dtype, record: dict) -> np.ndarray:
    """Write ``_fea_dict_<j>.npz`` (unique) and then ``_fea_count.npz`` (counts); return counts."""
    for j, dictionary in enumerate(dictionaries):
        with provenance.recording(paths.fea_dict_file(j), record):
            save_npz(paths.fea_dict_file(j),
                     unique=dictionary.values_in_id_order().astype(raw_dtype))
    counts = np.array([len(d) for d in dictionaries], dtype=np.int32)
    with provenance.recording(paths.fea_count_file(), record):
        save_npz(paths.fea_count_file(), counts=counts)
    return counts


def _load_dictionaries(paths: CriteoPaths) -> List[ColumnDictionary]:
    dictionaries = []
    for j in range(NUM_SPARSE):
        unique = load_npz_array(paths.fea_dict_file(j), "unique")
        dictionaries.append(ColumnDictionary(unique, paths.fea_dict_file(j)))
    return dictionaries


def _dictionary_files(paths: CriteoPaths) -> List[str]:
    return [paths.fea_dict_file(j) for j in range(NUM_SPARSE)] + [paths.fea_count_file()]


# ------------------------------------------------------------------------------------------------
# One day: text or parsed file -> parsed and/or processed files
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _DayJob:
    """What to do for one day (picklable, for worker processes).

    ``text`` set: read the raw text (and write the parsed day when ``write_parsed``); otherwise
    read the parsed day file. ``write_processed``: map to ids and write the processed day.
    ``rng_state``: NumPy RandomState state at this day's first sub-sample draw (workers only).
    ``record``: the provenance record of the files written.
    """

    day: int
    paths: CriteoPaths
    text: Optional[TextRange]
    write_parsed: bool
    write_processed: bool
    raw_dtype: np.dtype
    sub_sample_rate: float
    max_ind_range: int
    record: dict
    rng_state: Optional[tuple] = None
    dictionary_files: bool = False  # worker: load the finished dictionaries from their files


def _parsed_members(raw_dtype: np.dtype) -> List[Member]:
    return [Member("X_cat_t", raw_dtype, NUM_SPARSE, by_column=True),
            Member("X_int", np.dtype(np.int32), NUM_DENSE), Member("y", np.dtype(np.int32))]



_PROCESSED_MEMBERS = [Member("X_cat", np.dtype(np.int32), NUM_SPARSE),
                      Member("X_int", np.dtype(np.int32), NUM_DENSE),
                      Member("y", np.dtype(np.int32))]


def _day_blocks(job: _DayJob, rng: Optional[np.random.RandomState]):
    """(source rows, block) of the day, from text or from the parsed day file."""
    if job.text is not None:
        draws = rng if job.sub_sample_rate > 0 else None
        return _iter_text_day(job.text, draws, job.sub_sample_rate, job.max_ind_range)
    return _iter_parsed_day(job.paths.parsed_day(job.day))


def run_day(job: _DayJob, dictionaries: List[ColumnDictionary],
            rng: Optional[np.random.RandomState], on_rows: Callable[[int], None]) -> int:
    """Read one day, grow/use ``dictionaries``, write the files ``job`` asks for; return the
    number of rows kept."""
    max_rows = job.text.lines if job.text is not None else npz_rows(job.paths.parsed_day(job.day))
    outputs = []
    if job.write_parsed:
        outputs.append((job.paths.parsed_day(job.day), _parsed_members(job.raw_dtype)))
    if job.write_processed:
        outputs.append((job.paths.processed_day(job.day), _PROCESSED_MEMBERS))
    kept = 0
    with contextlib.ExitStack() as stack:
        # entered last to first, so that they are completed (renamed) first to last
        writers = []
        for path, members in reversed(outputs):
            stack.enter_context(provenance.recording(path, job.record))
            writers.insert(0, stack.enter_context(NpzStreamWriter(path, members, max_rows)))
        for source_rows, block in _day_blocks(job, rng):
            _write_block(job, block, dictionaries, writers)
            kept += len(block.labels)
            on_rows(source_rows)
    return kept


def _write_block(job: _DayJob, block: _Block, dictionaries: List[ColumnDictionary],
                 writers: List[NpzStreamWriter]) -> None:
    """Map a block to ids (growing the dictionaries) and append it to the day's writers."""
    count = len(block.labels)
    ids = np.empty((NUM_SPARSE, count), dtype=np.int32)
    raw = np.empty((NUM_SPARSE, count), dtype=job.raw_dtype) if job.write_parsed else None
    for k, codes in enumerate(block.codes):
        np.take(dictionaries[k].encode(codes.values).astype(np.int32), codes.index, out=ids[k])
        if raw is not None:
            np.take(codes.values.astype(job.raw_dtype), codes.index, out=raw[k])
    position = 0
    if job.write_parsed:
        writers[0].append(raw, block.dense, block.labels)
        position = 1
    if job.write_processed:
        writers[position].append(ids.T, np.maximum(block.dense, 0), block.labels)


def _worker_run_day(job: _DayJob) -> Tuple[int, Optional[List[np.ndarray]]]:
    """Process-pool entry: run one day; return (rows kept, first-seen values per column when the
    day was read with its own dictionaries)."""
    rng = None
    if job.rng_state is not None:
        rng = np.random.RandomState()
        rng.set_state(job.rng_state)
    if job.dictionary_files:
        dictionaries = _load_dictionaries(job.paths)
        sizes = [len(d) for d in dictionaries]
        kept = run_day(job, dictionaries, rng, lambda rows: None)
        _check_no_growth(job.paths, dictionaries, sizes)
        return kept, None
    dictionaries = [ColumnDictionary() for _ in range(NUM_SPARSE)]
    kept = run_day(job, dictionaries, rng, lambda rows: None)
    return kept, [d.values_in_id_order() for d in dictionaries]


def _check_no_growth(paths: CriteoPaths, dictionaries: List[ColumnDictionary],
                     sizes: List[int]) -> None:
    for j, (dictionary, size) in enumerate(zip(dictionaries, sizes)):
        if len(dictionary) != size:
            raise DataError(f"{paths.fea_dict_file(j)}: the data holds values this dictionary "
                            "lacks; delete the _fea_dict_* and _fea_count.npz files to rebuild them")


def _advance_uniforms(rng: np.random.RandomState, count: int) -> None:
    """Draw and drop ``count`` uniforms (a stage that already ran would have drawn them)."""
    for start in range(0, count, 1 << 22):
        rng.random_sample(min(1 << 22, count - start))


# ------------------------------------------------------------------------------------------------
# Stages 2-5: parse, dictionaries, ids
# ------------------------------------------------------------------------------------------------

@dataclass
class _DayPlan:
    """Per-day decisions of the categorify stages, and the record their files get."""

    from_text: List[bool]
    write_parsed: List[bool]
    write_processed: List[bool]
    build_dictionaries: bool
    record: dict

    @property
    def any_text(self) -> bool:
        return any(self.from_text)

    @property
    def any_work(self) -> bool:
        return self.build_dictionaries or any(self.write_processed) or self.any_text


def _plan_days(paths: CriteoPaths, record: dict, log: Callable[[str], None]) -> _DayPlan:
    """Which days must be read from text, which files must be (re)written, whether dictionaries
    must be built; a file counts only if it was made as ``record`` says. A day is read from text
    when its parsed file is missing and either its processed file or the dictionaries (which need
    every day's raw values) are missing."""
    build = not all(_reusable(_dictionary_files(paths), record, "the dictionaries", log))
    parsed = _reusable([paths.parsed_day(i) for i in range(paths.days)], record,
                       "the parsed days", log)
    processed = _reusable([paths.processed_day(i) for i in range(paths.days)], record,
                          "the processed days", log)
    from_text = [not p and (build or not q) for p, q in zip(parsed, processed)]
    return _DayPlan(from_text, [not p for p in parsed], [not q for q in processed], build, record)


def _reusable(files: Sequence[str], record: dict, stage: str,
              log: Callable[[str], None]) -> List[bool]:
    """Which of ``files`` exist and were made as ``record`` says; one note (the first reason) when
    an existing one was not, so the stage is redone."""
    usable, told = [], False
    for path in files:
        reason = provenance.mismatch(path, record) if os.path.exists(path) else None
        usable.append(os.path.exists(path) and reason is None)
        if reason and not told:
            log(f"note: {path} {reason}; redoing {stage}")
            told = True
    return usable


def _day_job(i: int, plan: _DayPlan, paths: CriteoPaths, cfg: PreprocessConfig,
             ranges: Optional[List[TextRange]], processed: bool) -> _DayJob:
    return _DayJob(i, paths, ranges[i] if plan.from_text[i] else None,
                   plan.from_text[i] and plan.write_parsed[i], processed and plan.write_processed[i],
                   _raw_dtype(cfg), cfg.sub_sample_rate, cfg.max_ind_range, plan.record)


def _categorify_sequential(cfg, paths, plan, ranges, rng) -> None:
    """Stages 2, 4, 5 fused: days in order, one shared set of growing dictionaries."""
    dictionaries = ([ColumnDictionary() for _ in range(NUM_SPARSE)] if plan.build_dictionaries
                    else _load_dictionaries(paths))
    sizes = [len(d) for d in dictionaries]
    total = sum(r.lines for r in ranges) if ranges and plan.any_text else None
    with _bar(cfg.progress, total, "parse+categorify") as bar:
        for i in range(paths.days):
            job = _day_job(i, plan, paths, cfg, ranges, processed=True)
            draws = rng if job.text is not None else None
            if job.text is None and plan.any_text and cfg.sub_sample_rate > 0:
                _advance_uniforms(rng, ranges[i].lines)
            if job.text is None and not job.write_processed and not plan.build_dictionaries:
                continue
            run_day(job, dictionaries, draws, bar.update)
    if plan.build_dictionaries:
        _save_dictionaries(paths, dictionaries, _raw_dtype(cfg), plan.record)
    else:
        _check_no_growth(paths, dictionaries, sizes)


def _process_pool(jobs: int) -> concurrent.futures.ProcessPoolExecutor:
    """Worker processes that end when this process ends, however it ends (even SIGKILL), and
    leave SIGINT, SIGTERM and SIGHUP to it."""
    workers = max(1, min(jobs, os.cpu_count() or 1))
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker, initargs=(os.getpid(),))


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _start_worker(parent: int) -> None:
    """Pool worker set-up: ignore SIGINT, SIGTERM and SIGHUP (the parent handles them and stops
    the workers; they are blocked from the worker's start, see ``_run_pool``) and die with the
    parent. On Linux the kernel kills the worker when the parent dies (prctl PR_SET_PDEATHSIG);
    elsewhere a thread watches for the parent to change."""
    interrupts.ignore_in_worker()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent:  # the parent died before the request took effect
                os._exit(1)
            return
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _stop_workers(pool: concurrent.futures.ProcessPoolExecutor, jobs: Sequence[_DayJob]) -> None:
    """Kill the pool's workers now (on an error or a signal): shutting down would wait for the days
    they are working on. Then remove the temporary files they were writing (named with their
    process ids, so no other process's file is touched). The executor has no public call for
    this; its process table is used."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.kill()
    pool.shutdown(wait=True, cancel_futures=True)
    directories = {os.path.dirname(os.path.abspath(path)) for job in jobs
                   for path in (job.paths.parsed_day(job.day), job.paths.processed_day(job.day))}
    for directory in directories:
        remove_temps_of(directory, [process.pid for process in processes])


def _categorify_parallel(cfg, paths, plan, ranges, rng) -> None:
    """Stages 2, 4, 5 with one process per day: read days (own dictionaries), merge their
    first-seen values in day order, then map days to ids from the saved dictionaries."""
    if plan.build_dictionaries:
        jobs = []
        for i in range(paths.days):
            job = _day_job(i, plan, paths, cfg, ranges, processed=False)
            state = None
            if plan.any_text and cfg.sub_sample_rate > 0:
                state = rng.get_state() if job.text is not None else None
                _advance_uniforms(rng, ranges[i].lines)
            jobs.append(dataclasses.replace(job, rng_state=state))
        results = _run_pool(cfg, "parse", jobs)
        dictionaries = [ColumnDictionary() for _ in range(NUM_SPARSE)]
        for _, distinct in results:
            for k in range(NUM_SPARSE):
                dictionaries[k].encode_distinct(distinct[k])
        _save_dictionaries(paths, dictionaries, _raw_dtype(cfg), plan.record)
        plan = _plan_days(paths, plan.record, log=lambda message: None)  # every parsed day exists
    elif plan.any_text and cfg.sub_sample_rate > 0:
        _parallel_text_with_dictionaries(cfg, paths, plan, ranges, rng)
        return
    jobs = [dataclasses.replace(_day_job(i, plan, paths, cfg, ranges, processed=True), dictionary_files=True)
            for i in range(paths.days) if plan.write_processed[i]]
    _run_pool(cfg, "categorify", jobs)


def _parallel_text_with_dictionaries(cfg, paths, plan, ranges, rng) -> None:
    """Dictionaries exist but some days must be read from text with sub-sampling."""
    jobs = []
    for i in range(paths.days):
        job = dataclasses.replace(_day_job(i, plan, paths, cfg, ranges, processed=True), dictionary_files=True)
        state = rng.get_state() if job.text is not None else None
        _advance_uniforms(rng, ranges[i].lines)
        if job.text is not None or job.write_processed:
            jobs.append(dataclasses.replace(job, rng_state=state))
    _run_pool(cfg, "parse+categorify", jobs)


def _run_pool(cfg: PreprocessConfig, desc: str, jobs: List[_DayJob]):
    """Run day jobs in worker processes; results in job order."""
    if not jobs:
        return []
    with interrupts.held():  # the workers (and multiprocessing's tracker) start with the signals blocked
        pool = _process_pool(len(jobs))
    try:
        with _bar(cfg.progress, len(jobs), desc, "days") as bar:
            with interrupts.held():
                futures = [pool.submit(_worker_run_day, job) for job in jobs]
            for future in concurrent.futures.as_completed(futures):
                future.result()
                bar.update(1)
    except concurrent.futures.process.BrokenProcessPool:
        _stop_workers(pool, jobs)
        raise DataError("a preprocessing worker process died (out of memory?); run without "
                        "--dataset-multiprocessing to use less memory") from None
    except BaseException:
        _stop_workers(pool, jobs)
        raise
    pool.shutdown()
    return [future.result() for future in futures]


def _write_day_counts(paths: CriteoPaths, record: dict, log: Callable[[str], None]) -> np.ndarray:
    """Stage 3: ``_day_count.npz`` with the rows kept per day (unless it was made as ``record``
    says); return the counts. Every processed day is complete by now."""
    counts = np.array([npz_rows(paths.processed_day(i)) for i in range(paths.days)],
                      dtype=np.int64)
    if not _reusable([paths.day_count_file()], record, "the day counts", log)[0]:
        with provenance.recording(paths.day_count_file(), record):
            save_npz(paths.day_count_file(), total_per_file=counts)
    return counts


# ------------------------------------------------------------------------------------------------
# Stage 6: concatenation
# ------------------------------------------------------------------------------------------------

def _concatenate(paths: CriteoPaths, day_rows: np.ndarray, progress: bool, record: dict) -> None:
    """Write ``<o_filename>.npz``: processed days one after another, plus ``counts``."""
    counts = load_npz_array(paths.fea_count_file(), "counts").astype(np.int32)
    writer = NpzStreamWriter(paths.output_file(), _PROCESSED_MEMBERS, int(day_rows.sum()),
                             extras={"counts": counts})
    bar = _bar(progress, int(day_rows.sum()), "concatenate")
    with provenance.recording(paths.output_file(), record), writer, bar:
        for i in range(paths.days):
            with NpzReader(paths.processed_day(i)) as reader:
                rows = int(reader.shape("y")[0])
                if _same_layout(reader, _PROCESSED_MEMBERS):
                    writer.copy_members([reader.stored(m.key) for m in _PROCESSED_MEMBERS], rows)
                    bar.update(rows)
                    continue
                for start in range(0, rows, ROWS_PER_CHUNK):
                    stop = min(rows, start + ROWS_PER_CHUNK)
                    writer.append(*(reader.rows(k, start, stop) for k in ("X_cat", "X_int", "y")))
                    bar.update(stop - start)


def _same_layout(reader: NpzReader, members: Sequence[Member]) -> bool:
    """Whether every member is stored uncompressed, C-order, with the dtype and width wanted
    (so its bytes can be copied as they are)."""
    for member in members:
        info = reader.stored(member.key)
        if info is None or info.fortran_order or info.dtype != np.dtype(member.dtype):
            return False
        if info.shape[1:] != ((member.width,) if member.width else ()):
            return False
    return True


def _link_processed_name(cfg: PreprocessConfig, paths: CriteoPaths, record: dict,
                         log: Callable[[str], None]) -> str:
    """Make --processed-data-file name the output too: a hard link, or a copy where links are not
    possible; return the file to read. (The reference never writes that name, so its first run
    trains on its own output name and later runs on --processed-data-file: two different files
    if the names differ.)"""
    target, output = cfg.processed_data_file, paths.output_file()
    if not target or os.path.abspath(target) == os.path.abspath(output):
        return output
    if _reusable([target], record, "the link to the output", log)[0]:
        return target
    with provenance.recording(target, record), writing(target):
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        with atomic_path(target) as tmp:
            try:
                os.link(output, tmp)
            except OSError:
                shutil.copyfile(output, tmp)
    return target


# ------------------------------------------------------------------------------------------------
# Stage 7: memory-map two-pass shuffle
# ------------------------------------------------------------------------------------------------

def occurrence_rank(values: np.ndarray) -> np.ndarray:
    """rank[i] = how many j < i have values[j] == values[i]."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    group_start = np.maximum.accumulate(np.where(starts, np.arange(len(values)), 0))
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(len(values)) - group_start
    return rank


def _copy_stream(rng: np.random.RandomState) -> np.random.RandomState:
    """A second RandomState at ``rng``'s position."""
    copy = np.random.RandomState()
    copy.set_state(rng.get_state())
    return copy


def _skip_randint(rng: np.random.RandomState, high: int, count: int) -> None:
    """Move ``rng`` past ``count`` draws of ``randint(0, high)`` (drawn in chunks and dropped)."""
    for start in range(0, count, ROWS_PER_CHUNK):
        rng.randint(0, high, size=min(ROWS_PER_CHUNK, count - start))


class BucketAssigner:
    """Destination buckets of pass 1 (randomize total), drawn as the reference draws them.

    For each day the reference draws every row's bucket at once, ``randint(0, choices, rows)``, and
    then walks the rows: a row whose bucket is full draws again, one ``randint(0, choices)`` at a time
    until it finds room, and those re-draws follow the day's bulk draw in the stream. :meth:`day`
    reproduces that without the per-row loop (see :class:`_DayDraws`).
    """

    def __init__(self, capacities: np.ndarray, choices: int):
        self.capacity = np.asarray(capacities, dtype=np.int64)
        self.fill = np.zeros(len(self.capacity), dtype=np.int64)
        self.choices = choices

    def place_in(self, bucket: int, count: int) -> np.ndarray:
        """Positions for ``count`` samples that stay in ``bucket`` (no draws)."""
        positions = self.fill[bucket] + np.arange(count)
        self.fill[bucket] += count
        return positions

    def day(self, rng: np.random.RandomState, count: int) -> "_DayDraws":
        """The draws of a day of ``count`` rows that starts at ``rng``'s position."""
        return _DayDraws(self, rng, count)


class _Redraws:
    """The values after a day's bulk draw, which rows with a full bucket draw again from.

    They are read ahead from a copy of the stream; :meth:`finish` moves the stream itself past the
    ones used."""

    def __init__(self, rng: np.random.RandomState, choices: int):
        self.rng = rng
        self.choices = choices
        self._ahead = _copy_stream(rng)
        self._values = np.empty(0, dtype=np.int64)  # read ahead, not used yet
        self.used = 0

    def first_open(self, count: int, full: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The next ``count`` values that are not full buckets, and for each how many values
        (from the first unused one) are used up to and including it."""
        if full[: self.choices].all():
            raise DataError("memory-map shuffle: every bucket is full (inconsistent day counts)")
        size = count
        while True:
            if len(self._values) < size:
                more = self._ahead.randint(0, self.choices, size=size - len(self._values))
                self._values = np.concatenate([self._values, more])
            open_at = np.flatnonzero(~full[self._values[:size]])
            if len(open_at) >= count:
                return self._values[open_at[:count]], open_at[:count] + 1
            size *= 2

    def use(self, count: int) -> None:
        self._values = self._values[count:]
        self.used += count

    def finish(self) -> None:
        _skip_randint(self.rng, self.choices, self.used)


class _DayDraws:
    """One day's buckets, drawn as the reference draws them, ``place(n)`` rows at a time.

    The day's bulk draw is read from a copy of the stream, in chunks; the stream itself is moved
    past it at once, to where the re-draws come from. Rows are then placed in windows over which
    the set of full buckets does not change: every row whose bulk value is a full bucket takes the
    next re-draw that is not, and the window ends at the first row that finds its bucket filled by
    the rows before it (each bucket fills once, so there are at most as many windows as buckets).
    """

    def __init__(self, assigner: BucketAssigner, rng: np.random.RandomState, count: int):
        self.assigner = assigner
        self.bulk = _copy_stream(rng)
        _skip_randint(rng, assigner.choices, count)
        self.redraws = _Redraws(rng, assigner.choices)

    def place(self, count: int) -> Tuple[np.ndarray, np.ndarray]:
        """(bucket, position in bucket) of the next ``count`` rows, in row order."""
        candidates = self.bulk.randint(0, self.assigner.choices, size=count)
        bucket = np.empty(count, dtype=np.int64)
        position = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            done += self._place_window(candidates[done:], bucket[done:], position[done:])
        return bucket, position

    def _place_window(self, candidates: np.ndarray, bucket: np.ndarray, position: np.ndarray) -> int:
        """Place the leading rows of ``candidates`` while no bucket fills; returns how many."""
        fill, capacity = self.assigner.fill, self.assigner.capacity
        full = fill >= capacity
        chosen = candidates.copy()
        redrawn = np.flatnonzero(full[candidates])
        if len(redrawn):
            chosen[redrawn], used = self.redraws.first_open(len(redrawn), full)
        at = fill[chosen] + occurrence_rank(chosen)
        over = np.flatnonzero(at >= capacity[chosen])
        take = int(over[0]) if len(over) else len(chosen)  # at least 1: row 0's bucket has room
        bucket[:take], position[:take] = chosen[:take], at[:take]
        fill += np.bincount(chosen[:take], minlength=len(fill))
        redrawn_taken = int(np.searchsorted(redrawn, take))
        if redrawn_taken:
            self.redraws.use(int(used[redrawn_taken - 1]))
        return take

    def finish(self) -> None:
        """Leave the stream after the day's last re-draw, where the next day's draws begin."""
        self.redraws.finish()


class _StayPut:
    """The rows of a day that keep one bucket: no draws."""

    def __init__(self, assigner: BucketAssigner, target: int):
        self.assigner = assigner
        self.target = target

    def place(self, count: int) -> Tuple[np.ndarray, np.ndarray]:
        return np.full(count, self.target, dtype=np.int64), self.assigner.place_in(self.target, count)

    def finish(self) -> None:
        pass


def _shuffled_bucket(j: int, days: int, randomize: str, split_none: bool) -> bool:
    """Whether pass 2 permutes bucket j (not the last day unless split is none)."""
    return randomize in ("day", "total") and (split_none or j < days - 1)


def _day_placer(assigner: BucketAssigner, rng, day: int, count: int, days: int, randomize: str,
                split_none: bool):
    """Where the ``count`` rows of ``day`` go in pass 1 (an object with ``place(n)`` and ``finish()``).

    With randomize total the reference draws every day's buckets, the last day's too, although
    those rows stay in the last bucket unless split is none."""
    if randomize == "total" and (split_none or day < days - 1):
        return assigner.day(rng, count)
    if randomize == "total":
        _skip_randint(rng, assigner.choices, count)  # drawn, never used
    return _StayPut(assigner, days - 1 if randomize == "total" else day)


def _shuffle_pass1(paths: CriteoPaths, day_rows: np.ndarray, cfg: PreprocessConfig, rng,
                   replay: bool, record: dict) -> None:
    """Pass 1: distribute each processed day's rows into per-day intermediate files.

    With ``replay`` only the draws are made (the files already exist)."""
    split_none = cfg.data_split == "none"
    choices = paths.days if split_none else paths.days - 1
    assigner = BucketAssigner(day_rows, choices)
    if replay:
        for i in range(paths.days):
            rows = int(day_rows[i])
            placer = _day_placer(assigner, rng, i, rows, paths.days, cfg.randomize, split_none)
            for start in range(0, rows, ROWS_PER_CHUNK):
                placer.place(min(ROWS_PER_CHUNK, rows - start))
            placer.finish()
        return
    with contextlib.ExitStack() as stack:
        outputs = _open_intermediates(paths, day_rows, stack, record)
        with _bar(cfg.progress, int(day_rows.sum()), "shuffle pass 1") as bar:
            for i in range(paths.days):
                _scatter_day(paths, i, assigner, rng, outputs, cfg, split_none, bar)


_INTERMEDIATE_PARTS = (("y", np.float64, 0), ("d", np.float64, NUM_DENSE),
                       ("s", np.int32, NUM_SPARSE))


def _open_intermediates(paths: CriteoPaths, day_rows: np.ndarray, stack: contextlib.ExitStack,
                        record: dict) -> List[List[NpyWriter]]:
    """Zero-filled .npy writers per day (y float64 (n,), d float64 (n,13), s int32 (n,26)),
    entered on ``stack``: the files appear together (each then gets ``record``) when it closes
    without an exception."""
    outputs = []
    for j, rows in enumerate(day_rows):
        outputs.append([])
        for part, dtype, width in _INTERMEDIATE_PARTS:
            shape = (int(rows), width) if width else (int(rows),)
            path = paths.intermediate_day(j, part)
            stack.enter_context(provenance.recording(path, record))
            outputs[-1].append(stack.enter_context(NpyWriter(path, dtype, shape)))
    return outputs


def _scatter_day(paths, day, assigner, rng, outputs, cfg, split_none, bar) -> None:
    with NpzReader(paths.processed_day(day)) as reader:
        rows = int(reader.shape("y")[0])
        placer = _day_placer(assigner, rng, day, rows, paths.days, cfg.randomize, split_none)
        for start in range(0, rows, ROWS_PER_CHUNK):
            stop = min(rows, start + ROWS_PER_CHUNK)
            bucket, position = placer.place(stop - start)
            chunk = (reader.rows("y", start, stop), reader.rows("X_int", start, stop),
                     reader.rows("X_cat", start, stop))
            order = np.argsort(bucket, kind="stable")
            bounds = np.searchsorted(bucket[order], np.arange(paths.days + 1))
            for j in range(paths.days):
                rows_j = order[bounds[j]: bounds[j + 1]]
                if len(rows_j):
                    first = int(position[rows_j[0]])
                    for target, values in zip(outputs[j], chunk):
                        target.write(first, values[rows_j])
            bar.update(stop - start)
        placer.finish()


_REORDERED_MEMBERS = [Member("X_cat", np.dtype(np.int32), NUM_SPARSE),
                      Member("X_int", np.dtype(np.float64), NUM_DENSE),
                      Member("y", np.dtype(np.float64))]


def _shuffle_pass2(paths: CriteoPaths, day_rows: np.ndarray, cfg: PreprocessConfig, rng,
                   plan: "_ShufflePlan") -> None:
    """Pass 2: permute each bucket into ``<npzfile>_<j>_reordered.npz``.

    Buckets whose file can be reused only replay their permutation draw (up to the last bucket
    to write)."""
    split_none = cfg.data_split == "none"
    with _bar(cfg.progress, int(day_rows.sum()), "shuffle pass 2") as bar:
        for j in range(plan.last_bucket + 1):
            rows = int(day_rows[j])
            order = None
            if _shuffled_bucket(j, paths.days, cfg.randomize, split_none):
                order = rng.permutation(rows)
            if not plan.reordered[j]:
                _write_reordered(paths, j, rows, order, bar, plan.record)


def _write_reordered(paths: CriteoPaths, j: int, rows: int, order, bar, record: dict) -> None:
    sources = [np.load(paths.intermediate_day(j, part), mmap_mode="r") for part in ("s", "d", "y")]
    path = paths.reordered_day(j)
    with provenance.recording(path, record), \
            NpzStreamWriter(path, _REORDERED_MEMBERS, rows) as writer:
        for start in range(0, rows, ROWS_PER_CHUNK):
            stop = min(rows, start + ROWS_PER_CHUNK)
            take = order[start:stop] if order is not None else slice(start, stop)
            writer.append(*(source[take] for source in sources))
            bar.update(stop - start)


@dataclass
class _ShufflePlan:
    """Per-bucket decisions of the memory-map shuffle, and the record its files get."""

    pass1: bool             # the intermediates must be written
    reordered: List[bool]   # per bucket: its reordered file can be reused
    record: dict

    @property
    def last_bucket(self) -> int:
        """The last bucket whose reordered file must be written (-1: none)."""
        return max((j for j, ok in enumerate(self.reordered) if not ok), default=-1)

    def draws_needed(self, cfg: PreprocessConfig, days: int) -> bool:
        """Whether a stage that draws from the RNG still has to run."""
        split_none = cfg.data_split == "none"
        pass1_draws = cfg.randomize == "total" and self.pass1
        pass2_draws = any(_shuffled_bucket(j, days, cfg.randomize, split_none)
                          for j in range(self.last_bucket + 1))
        return pass1_draws or pass2_draws


def _plan_shuffle(cfg: PreprocessConfig, paths: CriteoPaths, record: dict,
                  log: Callable[[str], None]) -> _ShufflePlan:
    if not cfg.memory_map:
        return _ShufflePlan(False, [True] * paths.days, record)
    reordered = _reusable([paths.reordered_day(j) for j in range(paths.days)], record,
                          "the reordered days", log)
    intermediates = [paths.intermediate_day(j, part)
                     for j in range(paths.days) for part in ("y", "d", "s")]
    pass1 = not all(reordered) and not all(_reusable(intermediates, record, "shuffle pass 1", log))
    return _ShufflePlan(pass1, reordered, record)


# ------------------------------------------------------------------------------------------------
# Disk space
# ------------------------------------------------------------------------------------------------

def _estimate_disk_need(cfg: PreprocessConfig, plan: _DayPlan, lines: List[int],
                        output_done: bool) -> int:
    """Bytes the remaining stages will write (upper bound: every line kept)."""
    parsed_row = 4 + 4 * NUM_DENSE + _raw_dtype(cfg).itemsize * NUM_SPARSE
    processed_row = 4 + 4 * NUM_DENSE + 4 * NUM_SPARSE
    need = 0
    for i, count in enumerate(lines):
        writes_parsed = plan.from_text[i] and plan.write_parsed[i]
        need += count * (parsed_row * writes_parsed + processed_row * plan.write_processed[i])
    total = sum(lines)
    if cfg.memory_map:
        need += total * 2 * (8 + 8 * NUM_DENSE + 4 * NUM_SPARSE)
    elif not output_done:
        need += total * processed_row
    return need + (64 << 20)


def _check_disk_space(cfg, paths, plan, lines: List[int], output_done: bool) -> None:
    directory = os.path.abspath(paths.d_path)
    need = _estimate_disk_need(cfg, plan, lines, output_done)
    free = shutil.disk_usage(directory).free
    if need > free:
        raise DataError(f"{directory}: not enough free disk space for preprocessing: need about "
                        f"{need} bytes, {free} free")


def _line_estimates(ranges: Optional[List[TextRange]], paths: CriteoPaths,
                    plan: _DayPlan) -> List[int]:
    """Lines per day: counted in the raw text, else rows of the reusable day files."""
    if ranges is not None:
        return [text.lines for text in ranges]
    return [npz_rows(paths.parsed_day(i) if plan.write_processed[i] else paths.processed_day(i))
            for i in range(paths.days)]


# ------------------------------------------------------------------------------------------------
# Provenance: what the files of this run must have been made from
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Records:
    """The provenance records this run's files must carry (see provenance.py).

    ``parse``: parsed and processed days, dictionaries, counts, the concatenated output and its
    --processed-data-file name; ``shuffle``: the memory-map intermediates and reordered days.
    """

    parse: dict
    shuffle: dict


def _raw_files(cfg: PreprocessConfig, paths: CriteoPaths) -> List[str]:
    if cfg.data_set == "kaggle":
        return [cfg.raw_data_file]
    return [f"{cfg.raw_data_file}_{i}" for i in range(paths.days)]


def _records(cfg: PreprocessConfig, paths: CriteoPaths,
             source: Optional[List[dict]] = None) -> _Records:
    """The records of this run's files: ``source`` identifies the raw files (computed from them
    when not given). Only options that change a stage's files are part of its record: the seed
    only where that stage draws (sub-sampling; the shuffle unless randomize is none),
    --data-randomize only in the shuffle's."""
    if source is None:
        source = [provenance.identity(path) for path in _raw_files(cfg, paths)]
    parse = {"--data-set": cfg.data_set, "--max-ind-range": cfg.max_ind_range,
             "--data-sub-sample-rate": cfg.sub_sample_rate,
             "--numpy-rand-seed": cfg.seed if cfg.sub_sample_rate > 0 else None}
    shuffle = dict(parse, **{"--data-randomize": cfg.randomize, "data split": cfg.data_split})
    if cfg.randomize != "none":
        shuffle["--numpy-rand-seed"] = cfg.seed
    if cfg.randomize == "total":  # files of versions that drew pass 1 in another order are redone
        shuffle["bucket draws"] = "per day, then re-draws"
    return _Records(provenance.expected(source, parse), provenance.expected(source, shuffle))


def _stream(cfg: PreprocessConfig, rng: Optional[np.random.RandomState]) -> np.random.RandomState:
    """The stream to draw from: a fresh one seeded with --numpy-rand-seed, or ``rng`` if it is
    in that very state (the records name the seed, so the draws must follow from it)."""
    seeded = np.random.RandomState(cfg.seed)
    if rng is None:
        return seeded
    mine, theirs = seeded.get_state(), rng.get_state()
    if not (np.array_equal(mine[1], theirs[1]) and mine[2:] == theirs[2:]):
        raise ConfigError(f"the NumPy stream given to the preprocessing is not a fresh one seeded "
                          f"with --numpy-rand-seed={cfg.seed}")
    return rng


def _final_files(cfg: PreprocessConfig, paths: CriteoPaths,
                 records: _Records) -> List[Tuple[str, dict]]:
    """What the loaders read, each with the record it must carry: memory-map: the reordered days
    and both count files; otherwise the concatenated output and the day counts."""
    if cfg.memory_map:
        return ([(paths.reordered_day(i), records.shuffle) for i in range(paths.days)]
                + [(paths.day_count_file(), records.parse), (paths.fea_count_file(), records.parse)])
    return [(paths.output_file(), records.parse), (paths.day_count_file(), records.parse)]


def _complete(cfg: PreprocessConfig, paths: CriteoPaths, records: _Records) -> bool:
    return all(provenance.reusable(path, wanted)
               for path, wanted in _final_files(cfg, paths, records))


def _named_file_as_it_is(cfg: PreprocessConfig, log: Callable[[str], None]) -> Optional[str]:
    """--processed-data-file when it exists without a provenance record (made by the reference or
    an older version): used as it is, because the user named it (the loaders check its values
    when they open it)."""
    named = cfg.processed_data_file
    if cfg.memory_map or not named or not os.path.exists(named) or provenance.read(named) is not None:
        return None
    log(f"note: using {named} as it is: it {provenance.NO_RECORD}, and you named it with "
        "--processed-data-file; delete it to preprocess again")
    return named


def _without_raw_data(cfg: PreprocessConfig, paths: CriteoPaths, missing: DataError,
                      log: Callable[[str], None]) -> str:
    """The raw data is gone: the final files are used as they are if they all exist and those
    with a record were made with this run's options; else ``missing`` is raised."""
    records = _records(cfg, paths, source=[])
    files = _final_files(cfg, paths, records)
    named = cfg.processed_data_file
    if not cfg.memory_map and named and os.path.exists(named):
        files[0] = (named, records.parse)
    if not all(os.path.exists(path) for path, _ in files):
        raise missing
    for path, wanted in files:
        reason = provenance.mismatch(path, wanted, check_source=False)
        if reason and reason != provenance.NO_RECORD:
            raise DataError(f"{path} {reason}; the raw data to make it again is missing: {missing}")
    read = paths.npzfile + "_*_reordered.npz" if cfg.memory_map else files[0][0]
    log(f"note: the raw data is missing; using {read} as it is (what it was made from cannot be "
        "checked)")
    return paths.npzfile if cfg.memory_map else files[0][0]


def _check_writable(directory: str, why: str) -> None:
    """DataError naming ``directory`` unless a file can be created there."""
    probe = os.path.join(directory, ".dlrm-write-test")
    try:
        remove_stale_temps(probe)
        with atomic_open(probe):
            pass
        os.remove(probe)
    except OSError as err:
        raise DataError(f"{directory}: cannot write there ({err.strerror or err}); {why}") from None


def _pipeline_files(cfg: PreprocessConfig, paths: CriteoPaths) -> List[str]:
    """Every file preprocessing may write."""
    files = [paths.day_count_file(), paths.output_file(), cfg.processed_data_file or None]
    files += _dictionary_files(paths)
    for i in range(paths.days):
        files += [paths.parsed_day(i), paths.processed_day(i), paths.reordered_day(i)]
        files += [paths.intermediate_day(i, part) for part in ("y", "d", "s")]
    return [path for path in files if path]


def _prepare_directory(cfg: PreprocessConfig, paths: CriteoPaths) -> None:
    """Fail at once (before any parsing) when the data directory, or the one of
    --processed-data-file, cannot be written."""
    _check_writable(os.path.abspath(paths.d_path), "preprocessing writes its files beside the "
                                                    "raw data")
    if cfg.processed_data_file and not cfg.memory_map:
        directory = os.path.dirname(os.path.abspath(cfg.processed_data_file))
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise DataError(f"{cfg.processed_data_file}: cannot write: {directory} is not a "
                            "directory")
        with writing(cfg.processed_data_file):
            os.makedirs(directory, exist_ok=True)
        _check_writable(directory, "the output is also written to --processed-data-file")


def _remove_stale_temps(cfg: PreprocessConfig, paths: CriteoPaths) -> None:
    """Remove the temporary files an interrupted run left beside the files it was writing."""
    for path in _pipeline_files(cfg, paths):
        with writing(path):
            remove_stale_temps(path)
            remove_stale_temps(provenance.record_path(path))


# ------------------------------------------------------------------------------------------------
# One run at a time per directory
# ------------------------------------------------------------------------------------------------

LOCK_NAME = ".dlrm-preprocess.lock"


@contextlib.contextmanager
def _preprocessing_lock(cfg: PreprocessConfig, paths: CriteoPaths,
                        log: Callable[[str], None]) -> Iterator[None]:
    """Hold the lock of every directory preprocessing writes in (the data directory, and the one
    of --processed-data-file), so that a second run waits for the first (one note) and then
    reuses what it made, instead of removing its files in flight as stale."""
    directories = {os.path.realpath(paths.d_path)}
    if cfg.processed_data_file and not cfg.memory_map:
        directories.add(os.path.realpath(os.path.dirname(os.path.abspath(cfg.processed_data_file))))
    with contextlib.ExitStack() as stack:
        for directory in sorted(directories):  # one order for every run: no deadlock
            stack.enter_context(_directory_lock(directory, log))
        yield


@contextlib.contextmanager
def _directory_lock(directory: str, log: Callable[[str], None]) -> Iterator[None]:
    """An exclusive ``flock`` on ``<directory>/.dlrm-preprocess.lock``, waited for with a note
    while another process holds it. The holder writes its pid there and removes the file when it
    is done, so nothing is left behind. Where no lock can be taken (a read-only directory, a file
    system without locks) the run goes on without one."""
    path = os.path.join(directory, LOCK_NAME)
    fd = _lock_file(path, directory, log)
    if fd is None:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # only for a waiter's note; the lock is what counts
            os.ftruncate(fd, 0)  # (a killed holder's pid may be there)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)  # while still locked: a waiter then finds its file gone, and retries
        os.close(fd)  # releases the lock


def _lock_file(path: str, directory: str, log: Callable[[str], None]) -> Optional[int]:
    """A descriptor of the lock file ``path``, locked (waiting with one note); None when there is
    none to lock. A file its holder removed while this run waited is not the lock any more: the
    run then locks the next one."""
    told = False
    while True:
        fd = _open_lock_file(path)
        if fd is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not told:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                log(f"note: another run is preprocessing in {directory}"
                    f"{f' (pid {holder})' if holder.isdigit() else ''}; waiting for it to finish")
                told = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks on this file system
            os.close(fd)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        mine, named = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)


def _open_lock_file(path: str) -> Optional[int]:
    """A descriptor of the lock file, created if need be (read-only where it cannot be written);
    None when there is none and it cannot be created."""
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            return os.open(path, flags | os.O_CLOEXEC, 0o666)
        except OSError:
            continue
    return None


# ------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------

def processed_data_ready(cfg: PreprocessConfig) -> bool:
    """Whether ``preprocess_criteo(cfg, ...)`` would find everything done: the final files
    were made from the raw data as it is now, with these options (or --processed-data-file exists
    without a record, see ``preprocess_criteo``)."""
    paths = check_config(cfg)
    if _missing_raw_data(cfg, paths) is not None:
        return False
    named = cfg.processed_data_file
    if not cfg.memory_map and named and os.path.exists(named) and provenance.read(named) is None:
        return True
    records = _records(cfg, paths)
    ready = _complete(cfg, paths, records)
    if ready and named and not cfg.memory_map:
        return provenance.reusable(named, records.parse)
    return ready


def _replay_sub_sample_draws(cfg, paths, ranges, rng) -> None:
    """Draw the sub-sample uniforms of an already completed parse stage, so that later draws
    match an uninterrupted run (the raw files are there: their lines are counted)."""
    for text in ranges or _day_ranges(cfg, paths):
        _advance_uniforms(rng, text.lines)


def preprocess_criteo(cfg: PreprocessConfig, log: Callable[[str], None],
                      rng: Optional[np.random.RandomState] = None) -> str:
    """Run every preprocessing stage whose files cannot be reused; return the file to read.

    That is, without memory-map, --processed-data-file when given (made a name of the output),
    else the concatenated ``<d_path><o_filename>.npz``; with memory-map, the ``npzfile`` stem (as
    the reference's getCriteoAdData returns). Notes go to ``log``. The draws (see the module
    docstring) come from a NumPy stream seeded with ``cfg.seed``, the same draws the reference
    made from its global stream, which preprocessing was the first to use; ``rng``, when given,
    is that stream (a test can then count the draws) and must still be as freshly seeded.

    Reuse: a file is reused only when its provenance record (provenance.py) says it was made from
    the raw files as they are now, with the options of this run that change it, in this format;
    otherwise its stage is redone, with a note saying why. Files without a record (made by the
    reference or an older version) are never reused, with two exceptions: an existing
    --processed-data-file (the user named it), and the final files when the raw data is missing
    (then they are all there is; those with a record must still match the options).
    Resumable; each file appears atomically, its record after it. One run at a time per
    directory: a run that finds another preprocessing there waits for it (one note), then
    reuses what it made. Raises ConfigError for bad settings, DataError for missing, malformed or
    unwritable data, and passes on a signal's Interrupted saying what is kept.
    """
    try:
        return _preprocess(cfg, log, rng)
    except Interrupted as exc:
        raise exc.during(f"preprocessing {cfg.raw_data_file}").keeping(
            "the preprocessed files finished so far (the next run goes on from them)")


def _preprocess(cfg: PreprocessConfig, log: Callable[[str], None],
                rng: Optional[np.random.RandomState]) -> str:
    paths = check_config(cfg)
    rng = _stream(cfg, rng)
    with _preprocessing_lock(cfg, paths, log):
        return _preprocess_locked(cfg, paths, rng, log)


def _preprocess_locked(cfg: PreprocessConfig, paths: CriteoPaths, rng: np.random.RandomState,
                log: Callable[[str], None]) -> str:
    """``preprocess_criteo`` once no other run writes in its directories."""
    _remove_stale_temps(cfg, paths)
    missing = _missing_raw_data(cfg, paths)
    if missing is not None:
        return _without_raw_data(cfg, paths, missing, log)
    named = _named_file_as_it_is(cfg, log)
    if named:
        return named
    records = _records(cfg, paths)
    if _complete(cfg, paths, records):
        return _finish(cfg, paths, records, log)
    _prepare_directory(cfg, paths)
    plan = _plan_days(paths, records.parse, log)
    shuffle = _plan_shuffle(cfg, paths, records.shuffle, log)
    ranges = _day_ranges(cfg, paths) if plan.any_text else None
    output_done = provenance.reusable(paths.output_file(), records.parse)
    _check_disk_space(cfg, paths, plan, _line_estimates(ranges, paths, plan), output_done)
    if plan.any_work:
        categorify = _categorify_parallel if cfg.multiprocessing else _categorify_sequential
        categorify(cfg, paths, plan, ranges, rng)
    if not plan.any_text and cfg.sub_sample_rate > 0 and shuffle.draws_needed(cfg, paths.days):
        _replay_sub_sample_draws(cfg, paths, ranges, rng)
    day_rows = _write_day_counts(paths, records.parse, log)
    if not cfg.memory_map:
        if not _reusable([paths.output_file()], records.parse, "the concatenation", log)[0]:
            _concatenate(paths, day_rows, cfg.progress, records.parse)
        return _finish(cfg, paths, records, log)
    if shuffle.pass1 or (cfg.randomize == "total" and shuffle.draws_needed(cfg, paths.days)):
        _shuffle_pass1(paths, day_rows, cfg, rng, not shuffle.pass1, records.shuffle)
    _shuffle_pass2(paths, day_rows, cfg, rng, shuffle)
    return paths.npzfile


def _finish(cfg: PreprocessConfig, paths: CriteoPaths, records: _Records,
            log: Callable[[str], None]) -> str:
    if cfg.memory_map:
        return paths.npzfile
    return _link_processed_name(cfg, paths, records.parse, log)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(description="Preprocess the Criteo Kaggle/Terabyte raw data.")
    parser.add_argument("--data-set", default="kaggle", choices=["kaggle", "terabyte"])
    parser.add_argument("--raw-data-file", default="",
                        help="Kaggle: path of train.txt; Terabyte: day-file prefix (./input/day)")
    parser.add_argument("--processed-data-file", default="",
                        help="also make the concatenated output available under this name; an "
                             "existing file there without a provenance record (made by the "
                             "reference) is used as it is")
    parser.add_argument("--max-ind-range", type=int, default=-1,
                        help="if > 0, take categorical hashes modulo this (default -1: off)")
    parser.add_argument("--data-sub-sample-rate", type=float, default=0.0,
                        help="drop each negative sample with this probability (default 0)")
    parser.add_argument("--data-randomize", default="total", choices=list(RANDOMIZE_CHOICES))
    parser.add_argument("--memory-map", action="store_true",
                        help="write per-day shuffled files instead of one output")
    parser.add_argument("--dataset-multiprocessing", action="store_true",
                        help="process days in parallel (same output)")
    parser.add_argument("--numpy-rand-seed", type=int, default=123)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def config_from_args(ns: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(
        data_set=ns.data_set, raw_data_file=ns.raw_data_file,
        processed_data_file=ns.processed_data_file, max_ind_range=ns.max_ind_range,
        sub_sample_rate=ns.data_sub_sample_rate, randomize=ns.data_randomize,
        memory_map=ns.memory_map, multiprocessing=ns.dataset_multiprocessing,
        progress=not ns.no_progress, seed=ns.numpy_rand_seed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Preprocess; print the output path (notes go to stderr). What stops it is reported in one line
    (:func:`dlrm.cli.run_command`); an OSError too, with exit code 2."""
    parser = build_parser()

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    def body(signals) -> int:
        output = preprocess_criteo(config_from_args(parser.parse_args(argv)), log)
        print(output)
        return 0

    return run_command(body, parser, errors=(DLRMError, OSError))
