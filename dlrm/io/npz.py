"""Reading and writing .npz and .npy files array by array: the one place that knows their layout.

An .npz file is a zip archive of .npy members. Members stored uncompressed (``np.savez``, and every
file the preprocessing writes) are located once and then memory-mapped where they lie, so a reader
never copies a whole array; compressed members (``np.savez_compressed``, the reference's files)
are streamed in chunks or, where that cannot work, read whole on first use.

Writers:
    NpzStreamWriter  an uncompressed .npz written chunk by chunk (zip64, deterministic bytes)
    NpyWriter        an .npy whose rows are written at any position
    AppendWriter     any file written front to back (the MLPerf binary files)
    save_npz         small arrays at once (``np.savez``)
Each writes under ``atomic_io``'s temporary name and renames it when complete, and reports an
``OSError`` of its own writes (a full disk, a read-only directory) as a ``WriteError`` (a
``DataError``) naming the file. Readers: ``NpzReader`` (members mapped in place, or streamed) and ``load_npz_array``.
"""
from __future__ import annotations

import contextlib
import io
import os
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from dlrm.common import DataError, non_regular_kind
from dlrm.io.atomic import atomic_open, atomic_path, writing

NPY_HEADER_BYTES = 128
_ZIP64_LIMIT = 0xFFFFFFFF
_DOS_DATE_1980 = (0 << 9) | (1 << 5) | 1  # 1980-01-01, so identical runs give identical bytes
_LOCAL_HEADER_BYTES = 30


# ------------------------------------------------------------------------------------------------
# CRC-32 of concatenated data
# ------------------------------------------------------------------------------------------------

def _gf2_times(matrix: Sequence[int], vector: int) -> int:
    total, k = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[k]
        vector >>= 1
        k += 1
    return total


def _gf2_square(matrix: Sequence[int]) -> Tuple[int, ...]:
    return tuple(_gf2_times(matrix, row) for row in matrix)


def _zero_operators() -> Tuple[Tuple[int, ...], ...]:
    """CRC-32 operators for appending 2**k zero bytes, k = 0..63."""
    operator = (0xEDB88320,) + tuple(1 << k for k in range(31))  # one zero bit
    for _ in range(3):
        operator = _gf2_square(operator)  # 2, 4, 8 bits
    operators = []
    for _ in range(64):
        operators.append(operator)
        operator = _gf2_square(operator)
    return tuple(operators)


_CRC_ZERO_BYTES = _zero_operators()


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A+B from crc32(A), crc32(B) and len(B), as zlib's crc32_combine."""
    k = 0
    while len2 > 0:
        if len2 & 1:
            crc1 = _gf2_times(_CRC_ZERO_BYTES[k], crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


# ------------------------------------------------------------------------------------------------
# Headers
# ------------------------------------------------------------------------------------------------

def npy_header(dtype: np.dtype, shape: Tuple[int, ...], fortran: bool = False) -> bytes:
    """A version-1.0 .npy header padded to exactly NPY_HEADER_BYTES (the bytes ``np.save``
    writes for the shapes used here)."""
    text = f"{{'descr': {dtype.str!r}, 'fortran_order': {fortran}, 'shape': {shape!r}, }}"
    text = text.ljust(NPY_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def _read_npy_header(stream) -> Optional[tuple]:
    """Read the .npy header at the stream's position as (shape, fortran_order, dtype).

    None for a format version that cannot be streamed (the caller then reads the array whole)."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    return None


def _member_name(key: str) -> bytes:
    return (key + ".npy").encode()


def _local_header(name: bytes, crc: int, size: int) -> bytes:
    """Zip local file header of a stored (uncompressed) member with a zip64 size field."""
    fixed = struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 45, 0, 0, 0, 0, _DOS_DATE_1980, crc,
                        _ZIP64_LIMIT, _ZIP64_LIMIT, len(name), 20)
    return fixed + name + struct.pack("<2H2Q", 1, 16, size, size)


def _central_header(name: bytes, crc: int, size: int, offset: int) -> bytes:
    fixed = struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 45, 3, 45, 0, 0, 0, 0, _DOS_DATE_1980,
                        crc, _ZIP64_LIMIT, _ZIP64_LIMIT, len(name), 28, 0, 0, 0, 0o644 << 16,
                        _ZIP64_LIMIT)
    return fixed + name + struct.pack("<2H3Q", 1, 24, size, size, offset)


def _end_records(entries: int, cd_offset: int, cd_size: int) -> bytes:
    """Zip64 end-of-central-directory record and locator, then the classic end record."""
    eocd64_offset = cd_offset + cd_size
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries,
                         cd_size, cd_offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, eocd64_offset, 1)
    classic = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, min(entries, 0xFFFF),
                          min(entries, 0xFFFF), min(cd_size, _ZIP64_LIMIT),
                          min(cd_offset, _ZIP64_LIMIT), 0)
    return record + locator + classic


# ------------------------------------------------------------------------------------------------
# Low-level file I/O
# ------------------------------------------------------------------------------------------------

def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    if view.nbytes == 0:  # (a cast of an empty array's view fails)
        return
    view = view.cast("B")
    while len(view):
        written = os.pwrite(fd, view[: 1 << 30], offset)
        view, offset = view[written:], offset + written


def _copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    """Copy bytes between (or within) files, in the kernel where it can."""
    while nbytes > 0:
        try:
            done = os.copy_file_range(src_fd, dst_fd, min(nbytes, 1 << 30), src_offset, dst_offset)
        except OSError:
            done = 0
        if done <= 0:  # not supported here, or overlapping ranges: copy through memory
            chunk = os.pread(src_fd, min(nbytes, 64 << 20), src_offset)
            if not chunk:
                raise DataError(f"unexpected end of file while copying {nbytes} bytes")
            _pwrite_all(dst_fd, chunk, dst_offset)
            done = len(chunk)
        src_offset, dst_offset, nbytes = src_offset + done, dst_offset + done, nbytes - done


class _AtomicWriter:
    """A file written through a descriptor on ``atomic_path``'s temporary name.

    As a context manager: the file appears under ``path`` only if the block and ``_finish()``
    succeed; otherwise the temporary file is removed. OSErrors of the writer's own operations
    become DataErrors naming ``path``; exceptions of the block pass unchanged.
    """

    def __init__(self, path: str):
        self.path = path
        self._fd = -1
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        with writing(self.path):
            tmp = self._stack.enter_context(atomic_path(self.path))
            try:
                self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                self._start()
            except BaseException:
                self._discard(*sys.exc_info())
                raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard(exc_type, exc, tb)
            return
        try:
            with writing(self.path):
                self._finish()
                os.close(self._fd)  # a network file system may report a full disk only here
                self._fd = -1
        except BaseException:
            self._discard(*sys.exc_info())
            raise
        with writing(self.path):
            self._stack.close()  # the rename

    def _discard(self, exc_type, exc, tb) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._stack.__exit__(exc_type, exc, tb)  # removes the temporary file

    def _start(self) -> None:
        """Write what goes first (headers); called once the temporary file is open."""

    def _finish(self) -> None:
        """Write what goes last (headers, directory); called before the rename."""


# ------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    """One array of an npz written chunk by chunk.

    Args:
        key: npz key.
        dtype: stored dtype.
        width: 0 for a (n,) array, k for a 2-D one.
        by_column: the array is (k, n) C-order (the reference's ``X_cat_t``) and chunks are given
            as (k, b); otherwise it is (n,) or (n, k) and chunks are (b,) or (b, k).
    """

    key: str
    dtype: np.dtype
    width: int = 0
    by_column: bool = False

    @property
    def segments(self) -> int:
        """Contiguous runs of samples: k for by-column arrays, else 1."""
        return self.width if self.by_column else 1

    @property
    def segment_row_bytes(self) -> int:
        width = 1 if self.by_column else max(self.width, 1)
        return np.dtype(self.dtype).itemsize * width

    def header(self, n: int) -> bytes:
        if self.width == 0:
            shape = (n,)
        else:
            shape = (self.width, n) if self.by_column else (n, self.width)
        return npy_header(np.dtype(self.dtype), shape, False)


@dataclass
class _Segment:
    """A reserved run of bytes of one member in the file being written."""

    start: int
    row_bytes: int
    crc: int = 0


class NpzStreamWriter(_AtomicWriter):
    """Write an uncompressed .npz chunk by chunk, without holding the arrays.

    Every member gets space for ``max_rows`` rows (a by-column member one run per column);
    chunks are appended to all members in lockstep; when the ``with`` block ends, the .npy headers
    are written for the rows actually written, data is moved down over unused space, the zip
    directory is written and the file renamed to ``path``. ``extras`` are small whole arrays
    stored last. Use as a context manager only.
    """

    def __init__(self, path: str, members: Sequence[Member], max_rows: int,
                 extras: Optional[Dict[str, np.ndarray]] = None):
        super().__init__(path)
        self.members, self.max_rows = list(members), int(max_rows)
        self.extras = dict(extras or {})
        self.rows = 0
        self._segments: List[List[_Segment]] = []
        offset = 0
        for member in self.members:
            offset += len(_local_header(_member_name(member.key), 0, 0)) + NPY_HEADER_BYTES
            runs = []
            for _ in range(member.segments):
                runs.append(_Segment(offset, member.segment_row_bytes))
                offset += self.max_rows * member.segment_row_bytes
            self._segments.append(runs)

    def __enter__(self) -> "NpzStreamWriter":
        return super().__enter__()

    def _reserve(self, count: int) -> None:
        if self.rows + count > self.max_rows:
            raise DataError(f"{self.path}: more than the {self.max_rows} rows reserved")

    def append(self, *arrays: np.ndarray) -> None:
        """Append b rows: one array per member, in member order ((k, b) for by-column ones)."""
        member = self.members[0]
        count = arrays[0].shape[1] if member.by_column else len(arrays[0])
        self._reserve(count)
        if count == 0:  # a block whose every line was sub-sampled away
            return
        with writing(self.path):
            for member, runs, array in zip(self.members, self._segments, arrays):
                data = np.ascontiguousarray(array, dtype=member.dtype)
                parts = data if member.by_column else [data]
                for run, part in zip(runs, parts):
                    _pwrite_all(self._fd, part, run.start + self.rows * run.row_bytes)
                    run.crc = zlib.crc32(memoryview(part).cast("B"), run.crc)
        self.rows += count

    def copy_members(self, sources: Sequence["StoredArray"], count: int) -> None:
        """Append ``count`` rows copied from uncompressed members of another npz, one source per
        member (no by-column members), with the source's dtype and width."""
        self._reserve(count)
        with open(sources[0].path, "rb") as src, writing(self.path):
            for runs, source in zip(self._segments, sources):
                run = runs[0]
                nbytes = count * run.row_bytes
                _copy_range(src.fileno(), source.offset, self._fd,
                            run.start + self.rows * run.row_bytes, nbytes)
                run.crc = crc32_combine(run.crc, source.data_crc, nbytes)
        self.rows += count

    def _finish(self) -> None:
        entries, offset = [], 0
        for member, runs in zip(self.members, self._segments):
            name = _member_name(member.key)
            header_at = offset + len(_local_header(name, 0, 0))
            crc, position = zlib.crc32(member.header(self.rows)), header_at + NPY_HEADER_BYTES
            for run in runs:
                nbytes = self.rows * run.row_bytes
                if position != run.start:
                    _copy_range(self._fd, run.start, self._fd, position, nbytes)
                crc, position = crc32_combine(crc, run.crc, nbytes), position + nbytes
            size = position - header_at
            _pwrite_all(self._fd, _local_header(name, crc, size) + member.header(self.rows), offset)
            entries.append((name, crc, size, offset))
            offset = position
        for key, array in self.extras.items():
            entry, offset = self._write_small(key, array, offset)
            entries.append(entry)
        directory = b"".join(_central_header(*entry) for entry in entries)
        ending = _end_records(len(entries), offset, len(directory))
        _pwrite_all(self._fd, directory + ending, offset)
        os.ftruncate(self._fd, offset + len(directory) + len(ending))

    def _write_small(self, key: str, array: np.ndarray, offset: int):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
        name, data = _member_name(key), buffer.getvalue()
        crc = zlib.crc32(data)
        header = _local_header(name, crc, len(data))
        _pwrite_all(self._fd, header + data, offset)
        return (name, crc, len(data), offset), offset + len(header) + len(data)


class NpyWriter(_AtomicWriter):
    """Write an .npy file of a fixed shape whose rows are written at any position (rows never
    written read as zeros). Use as a context manager only."""

    def __init__(self, path: str, dtype, shape: Tuple[int, ...]):
        super().__init__(path)
        self.dtype, self.shape = np.dtype(dtype), tuple(int(n) for n in shape)
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))

    def __enter__(self) -> "NpyWriter":
        return super().__enter__()

    def _start(self) -> None:
        _pwrite_all(self._fd, npy_header(self.dtype, self.shape), 0)
        os.ftruncate(self._fd, NPY_HEADER_BYTES + self.shape[0] * self.row_bytes)

    def write(self, first: int, rows: np.ndarray) -> None:
        """Write ``rows`` as rows first, first + 1, ... of the array."""
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        with writing(self.path):
            _pwrite_all(self._fd, data, NPY_HEADER_BYTES + first * self.row_bytes)


class AppendWriter(_AtomicWriter):
    """Write a file front to back: each ``append`` adds an array's bytes as they lie in memory.
    Use as a context manager only."""

    def __init__(self, path: str):
        super().__init__(path)
        self.size = 0

    def __enter__(self) -> "AppendWriter":
        return super().__enter__()

    def append(self, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data)
        with writing(self.path):
            _pwrite_all(self._fd, data, self.size)
        self.size += data.nbytes


def save_npz(path: str, compressed: bool = False, **arrays: np.ndarray) -> None:
    """Save whole arrays with ``np.savez`` (or ``np.savez_compressed``), through a temporary name."""
    with writing(path), atomic_open(path) as out:
        (np.savez_compressed if compressed else np.savez)(out, **arrays)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredArray:
    """Where the array of an uncompressed ("stored") npz member lies in its file, to map it."""

    path: str
    key: str
    offset: int                     # first byte of the array data in the file
    dtype: np.dtype
    shape: Tuple[int, ...]
    fortran_order: bool
    member_crc: int = 0             # CRC-32 of the member (.npy header and data), from the zip
    header_crc: int = 0             # CRC-32 of the .npy header alone

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def data_crc(self) -> int:
        """CRC-32 of the array data alone (without the .npy header)."""
        return self.member_crc ^ crc32_combine(self.header_crc, 0, self.data_bytes)

    def open(self) -> np.ndarray:
        """The array, memory-mapped read-only (an empty array when it has no elements)."""
        if 0 in self.shape:
            return np.empty(self.shape, self.dtype)
        mapped = np.memmap(self.path, self.dtype, "r", self.offset, self.shape,
                           "F" if self.fortran_order else "C")
        return mapped.view(np.ndarray)


def _open_archive(path: str) -> zipfile.ZipFile:
    try:
        kind = non_regular_kind(os.stat(path).st_mode)
        if kind is not None:
            raise DataError(f"{path}: is {kind}, not an npz file")
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path}: not a readable npz archive ({err})") from None


def _locate(path: str, stream, info: zipfile.ZipInfo, key: str) -> Optional[StoredArray]:
    """Locate the array of npz member ``info`` in ``stream`` (the npz opened for reading).

    The member data starts after its local file header (30 bytes + file name + extra field, the
    lengths read from that header, not from the central directory), with the .npy header first.
    None when the member cannot be mapped: compressed, encrypted, an unusual .npy version,
    non-numeric values, or shorter than its header says.
    """
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    stream.seek(info.header_offset)
    local = stream.read(_LOCAL_HEADER_BYTES)
    if len(local) != _LOCAL_HEADER_BYTES or local[:4] != b"PK\x03\x04":
        return None
    name_length, extra_length = struct.unpack("<2H", local[26:30])
    start = info.header_offset + _LOCAL_HEADER_BYTES + name_length + extra_length
    stream.seek(start)
    try:
        header = _read_npy_header(stream)
    except ValueError:
        return None
    if header is None or header[2].kind not in "biuf":
        return None
    shape, fortran_order, dtype = header
    offset = stream.tell()
    end = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end > start + info.compress_size or end > os.fstat(stream.fileno()).st_size:
        return None
    stream.seek(start)
    header_crc = zlib.crc32(stream.read(offset - start))
    return StoredArray(path, key, offset, dtype, tuple(shape), bool(fortran_order), info.CRC,
                       header_crc)


class NpzReader:
    """An .npz opened for reading arrays, or row ranges of them, without loading them whole.

    Uncompressed members (ours, ``np.savez``) are memory-mapped where they lie; compressed ones
    (the reference's ``np.savez_compressed`` files) are streamed by ``chunks`` and read whole for
    other access. Errors are DataErrors naming the file. Use as a context manager.
    """

    def __init__(self, path: str):
        self.path = path
        self._archive = _open_archive(path)
        self._infos = {info.filename[:-4]: info for info in self._archive.infolist()
                       if info.filename.endswith(".npy")}
        self._stored: Dict[str, StoredArray] = {}
        self._loaded: Dict[str, np.ndarray] = {}
        try:
            with open(path, "rb") as stream:
                for key, info in self._infos.items():
                    found = _locate(path, stream, info, key)
                    if found is not None:
                        self._stored[key] = found
        except OSError as err:
            self.close()
            raise DataError(f"{path}: cannot read ({err.strerror or err})") from None

    def __enter__(self) -> "NpzReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._archive.close()

    def keys(self) -> List[str]:
        return sorted(self._infos)

    def stored(self, key: str) -> Optional[StoredArray]:
        """Layout of a member that can be mapped in place (None for a compressed one)."""
        self._require(key)
        return self._stored.get(key)

    def _require(self, key: str) -> None:
        if key not in self._infos:
            raise DataError(f"{self.path}: no array '{key}' (has {', '.join(self.keys())})")

    def _stream_header(self, key: str) -> Optional[tuple]:
        with self._archive.open(key + ".npy") as stream:
            try:
                return _read_npy_header(stream)
            except ValueError as err:
                raise DataError(f"{self.path}: unreadable array '{key}' ({err})") from None

    def shape(self, key: str) -> Tuple[int, ...]:
        """Shape of array ``key``, from its header when possible."""
        self._require(key)
        if key in self._stored:
            return self._stored[key].shape
        header = self._stream_header(key)
        return tuple(header[0]) if header is not None else self.array(key).shape

    def array(self, key: str) -> np.ndarray:
        """The whole array: memory-mapped if stored, else read (once) into memory."""
        self._require(key)
        if key not in self._loaded:
            if key in self._stored:
                self._loaded[key] = self._stored[key].open()
                return self._loaded[key]
            try:
                with self._archive.open(key + ".npy") as stream:
                    self._loaded[key] = np.lib.format.read_array(stream, allow_pickle=False)
            except (ValueError, zipfile.BadZipFile, zlib.error, EOFError) as err:
                raise DataError(f"{self.path}: unreadable array '{key}' ({err})") from None
        return self._loaded[key]

    def rows(self, key: str, start: int, stop: int, transposed: bool = False) -> np.ndarray:
        """Rows [start, stop) as a C-contiguous (b,) or (b, k) array.

        ``transposed``: the array is stored as (k, n) (samples along axis 1, as ``X_cat_t``).
        """
        whole = self.array(key)
        samples = whole.shape[1] if transposed else whole.shape[0]
        if not 0 <= start <= stop <= samples:
            raise ValueError(f"{self.path}: rows {start}:{stop} of {key} out of range 0:{samples}")
        part = whole[:, start:stop].T if transposed else whole[start:stop]
        return np.ascontiguousarray(part)

    def chunks(self, key: str, chunk_rows: int) -> Iterator[np.ndarray]:
        """Array ``key`` in blocks of at most ``chunk_rows`` rows, in order, streaming compressed
        members instead of reading them whole where their layout allows."""
        self._require(key)
        if key in self._stored or key in self._loaded:
            whole = self.array(key)
            for start in range(0, whole.shape[0], chunk_rows):
                yield whole[start:start + chunk_rows]
            return
        try:
            yield from self._stream_chunks(key, chunk_rows)
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise DataError(f"{self.path}: corrupt npz archive ({err})") from None

    def _stream_chunks(self, key: str, chunk_rows: int) -> Iterator[np.ndarray]:
        header = self._stream_header(key)
        if header is not None and header[2].hasobject:
            raise DataError(f"{self.path}: array '{key}' holds Python objects, expected numbers")
        if header is None or header[1]:  # Fortran order or an unusual header: read it whole
            self.array(key)
            yield from self.chunks(key, chunk_rows)
            return
        shape, _, dtype = header
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        with self._archive.open(key + ".npy") as stream:
            _read_npy_header(stream)
            for start in range(0, shape[0], chunk_rows):
                count = min(chunk_rows, shape[0] - start)
                data = stream.read(count * row_bytes)
                if len(data) != count * row_bytes:
                    raise DataError(f"{self.path}: array '{key}' is truncated")
                yield np.frombuffer(data, dtype).reshape((count,) + tuple(shape[1:]))


def load_npz_array(path: str, key: str) -> np.ndarray:
    """Array ``key`` of a small npz file (counts, dictionaries), read into memory."""
    with NpzReader(path) as reader:
        return np.array(reader.array(key))


def npz_rows(path: str, key: str = "y") -> int:
    """Number of samples in a day file: the length of its array ``key``."""
    with NpzReader(path) as reader:
        return int(reader.shape(key)[0])
