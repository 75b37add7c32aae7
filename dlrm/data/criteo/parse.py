"""Parsing blocks of raw Criteo lines with pyarrow into labels, dense values and categorical codes.

Hex hashes are converted only for each block's distinct values. A malformed line is an error
naming its file and line: the wrong number of fields, a value that is no 32-bit integer or no
hexadecimal category of at most 8 digits, a label other than 0 or 1 (an empty label reads as 0,
as in the reference), an empty line (skipping it would move the day boundaries, which come from
the line count).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from dlrm.common import DataError, first_line
from dlrm.data.criteo.schema import FIELD_NAMES, NUM_DENSE, NUM_FIELDS


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


def parse_text_block(path: str, first_line: int, block: bytes) -> pa.Table:
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
    """pyarrow's reason for rejecting these raw lines (as parse_text_block parses them), or None
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
class Codes:
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
               field_no: int, modulo: int) -> Codes:
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
    return Codes(index, values)


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
class Block:
    """Rows of one day read from text or from a parsed day file.

    Attributes:
        labels: (b,) int32.
        dense: (b, 13) int32, unclamped.
        codes: 26 Codes, one per categorical column.
    """

    labels: np.ndarray
    dense: np.ndarray
    codes: List[Codes]


def _int_column(table: pa.Table, k: int) -> np.ndarray:
    return table.column(k).fill_null(0).to_numpy()


def block_from_table(path: str, first_line: int, table: pa.Table, uniforms: Optional[np.ndarray],
                     rate: float, modulo: int) -> Block:
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
    return Block(labels, dense, codes)
