"""Tests of npz_io.py: streaming .npz writing, reading members in place or streamed."""
from __future__ import annotations

import os
import zipfile
import zlib

import numpy as np
import pytest

from dlrm.io import npz as npz_io


def test_crc32_combine_matches_zlib():
    gen = np.random.default_rng(0)
    for la, lb in [(0, 0), (0, 5), (9, 0), (1, 1), (128, 1000), (77, 1 << 20)]:
        a, b = gen.bytes(la), gen.bytes(lb)
        assert npz_io.crc32_combine(zlib.crc32(a), zlib.crc32(b), lb) == zlib.crc32(a + b)


@pytest.mark.parametrize("written", [10, 7, 0])
def test_npz_stream_writer_round_trip(tmp_path, written):
    """Chunks appended, fewer rows than reserved allowed; np.load and zipfile see a valid npz."""
    gen = np.random.default_rng(1)
    cols = gen.integers(0, 2**32, size=(26, written), dtype=np.uint32)
    rows = gen.integers(-5, 5, size=(written, 13)).astype(np.int32)
    labels = gen.integers(0, 2, size=written).astype(np.int32)
    path = tmp_path / "a.npz"
    members = [npz_io.Member("X_cat_t", np.dtype(np.uint32), 26, by_column=True),
               npz_io.Member("X_int", np.dtype(np.int32), 13), npz_io.Member("y", np.dtype(np.int32))]
    with npz_io.NpzStreamWriter(str(path), members, 10, extras={"counts": np.arange(3)}) as writer:
        for start in range(0, written, 3):
            writer.append(cols[:, start:start + 3], rows[start:start + 3], labels[start:start + 3])
    assert zipfile.ZipFile(path).testzip() is None
    with np.load(path) as data:
        np.testing.assert_array_equal(data["X_cat_t"], cols)
        np.testing.assert_array_equal(data["X_int"], rows)
        np.testing.assert_array_equal(data["y"], labels)
        np.testing.assert_array_equal(data["counts"], np.arange(3))
    with npz_io.NpzReader(str(path)) as reader:
        stop = min(5, written)
        np.testing.assert_array_equal(reader.rows("X_cat_t", 0, stop, transposed=True),
                                      cols[:, :stop].T)
        np.testing.assert_array_equal(reader.rows("X_int", 0, stop), rows[:stop])
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]  # no temporary left


def test_npz_reader_reads_compressed_reference_files(tmp_path):
    x_cat_t = np.arange(26 * 5, dtype=np.int32).reshape(26, 5)
    np.savez_compressed(tmp_path / "r.npz", X_cat_t=x_cat_t, y=np.arange(5))
    with npz_io.NpzReader(str(tmp_path / "r.npz")) as reader:
        np.testing.assert_array_equal(reader.rows("X_cat_t", 1, 4, transposed=True), x_cat_t[:, 1:4].T)
        assert reader.shape("y") == (5,)


@pytest.mark.parametrize("make, kind", [(os.mkfifo, "a named pipe"),
                                        (lambda path: path.mkdir(), "a directory")])
def test_reader_names_a_path_that_is_no_regular_file(tmp_path, make, kind):
    """A FIFO given as a processed file is refused at once (opening it would wait for a writer)."""
    path = tmp_path / "processed.npz"
    make(path)
    with pytest.raises(npz_io.DataError, match=f"^{path}: is {kind}.*, not an npz file$"):
        npz_io.NpzReader(str(path))
