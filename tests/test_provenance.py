"""Provenance: a preprocessing file or cache is reused only when it is known to have been made from
the same input with the same options; otherwise it is redone, with a note saying why.

Each test changes one thing between two runs and checks the note and the arrays the loaders get
(against the plain implementation in plain_criteo.py)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from dlrm.common import ConfigError, DataError
from dlrm.data.criteo import loaders as cd
from dlrm.data.criteo import preprocess as du
from dlrm.data.criteo.config import criteo_paths
from dlrm.data.criteo import row_cache
from dlrm.io import provenance
from helpers.criteo import fake_kaggle_fixture
from helpers.plain_criteo import (interrupted_run, kaggle_cfg, plain_pipeline, plain_shuffle,
                          plain_split, read_lines, run)

LINES = 350


raw_kaggle = fake_kaggle_fixture(LINES, seed=11)


@pytest.fixture(scope="module")
def raw_lines(raw_kaggle):
    return read_lines(raw_kaggle)


@pytest.fixture
def raw(tmp_path, raw_lines):
    path = tmp_path / "train.txt"
    path.write_text("".join(raw_lines))
    return path


def expected_arrays(raw_path, rate=0.0, max_ind=-1, seed=7):
    """(X_cat, X_int, y) of the concatenated output, from the plain implementation."""
    _, _, processed, _ = plain_pipeline(plain_split(read_lines(raw_path), 7), rate, max_ind, seed)
    return tuple(np.concatenate([day[k] for day in processed]) for k in range(3))


def assert_output(path, arrays):
    with np.load(path) as data:
        for key, want in zip(("X_cat", "X_int", "y"), arrays):
            np.testing.assert_array_equal(data[key], want)


def notes_of(cfg, seed=7):
    logs = []
    output, _ = run(cfg, seed, logs.append)
    return output, logs


def test_a_complete_run_reuses_everything_silently(raw):
    run(kaggle_cfg(raw))
    output, logs = notes_of(kaggle_cfg(raw))
    assert logs == []
    assert_output(output, expected_arrays(raw))


def test_raw_content_changed_with_the_same_size_and_time(raw):
    output, _ = run(kaggle_cfg(raw))
    status = os.stat(raw)
    lines = read_lines(raw)
    fields = lines[200].split("\t")
    fields[20] = "%08x" % ((int(fields[20] or "0", 16) + 1) % 2**32)  # same width, new value
    lines[200] = "\t".join(fields)
    raw.write_text("".join(lines))
    os.utime(raw, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert os.stat(raw).st_size == status.st_size
    _, logs = notes_of(kaggle_cfg(raw))
    assert f"note: {output} was made from an earlier train.txt (its content differs now); " \
           "redoing the concatenation" in logs
    assert_output(output, expected_arrays(raw))


def test_raw_size_changed(raw, raw_lines):
    output, _ = run(kaggle_cfg(raw))
    size = os.path.getsize(raw)
    with open(raw, "a") as out:
        out.write(raw_lines[3])
    _, logs = notes_of(kaggle_cfg(raw))
    assert f"note: {output} was made from train.txt of {size} bytes (now " \
           f"{os.path.getsize(raw)}); redoing the concatenation" in logs
    assert_output(output, expected_arrays(raw))


def test_second_raw_file_in_the_directory_gets_its_own_data(raw, raw_lines, tmp_path):
    named = tmp_path / "mine.npz"
    run(kaggle_cfg(raw, processed_data_file=str(named)))
    output = criteo_paths("kaggle", str(raw)).output_file()
    other = tmp_path / "other.txt"
    other.write_text("".join(raw_lines[::-1]))
    read, logs = notes_of(kaggle_cfg(other, processed_data_file=str(named)))
    assert read == str(named)
    # the shared output name, and the --processed-data-file name linked to it
    assert f"note: {output} was made from train.txt, not other.txt; redoing the concatenation" \
           in logs
    assert f"note: {named} was made from train.txt, not other.txt; redoing the link to the " \
           "output" in logs
    assert_output(output, expected_arrays(other))
    assert_output(named, expected_arrays(other))


def test_interrupted_sub_sampled_run_then_a_full_one(raw, monkeypatch):
    interrupted_run(kaggle_cfg(raw, sub_sample_rate=0.5), monkeypatch)
    paths = criteo_paths("kaggle", str(raw))
    assert os.path.exists(paths.processed_day(3))  # days 0-3 were written sub-sampled
    output, logs = notes_of(kaggle_cfg(raw))
    assert f"note: {paths.parsed_day(0)} was made with --data-sub-sample-rate=0.5 (this run: " \
           "0.0); redoing the parsed days" in logs
    assert_output(output, expected_arrays(raw))


def test_output_made_with_max_ind_range_is_not_reused_without_it(raw):
    output, _ = run(kaggle_cfg(raw, max_ind_range=1000))
    assert_output(output, expected_arrays(raw, max_ind=1000))
    _, logs = notes_of(kaggle_cfg(raw))
    assert f"note: {output} was made with --max-ind-range=1000 (this run: -1); redoing the " \
           "concatenation" in logs
    assert_output(output, expected_arrays(raw))


def test_the_seed_counts_only_where_it_is_drawn_from(raw):
    output, _ = run(kaggle_cfg(raw, sub_sample_rate=0.4), seed=7)
    _, logs = notes_of(kaggle_cfg(raw, sub_sample_rate=0.4), seed=8)
    assert f"note: {output} was made with --numpy-rand-seed=7 (this run: 8); redoing the " \
           "concatenation" in logs
    assert_output(output, expected_arrays(raw, rate=0.4, seed=8))
    run(kaggle_cfg(raw))  # without sub-sampling nothing is drawn: the seed does not matter
    _, logs = notes_of(kaggle_cfg(raw), seed=9)
    assert logs == []


def test_splits_built_one_after_the_other_preprocess_once(raw):
    """As the reference's train and test datasets: each checks the preprocessing; the second,
    drawing after the first from the same stream, finds it done."""
    cfg = kaggle_cfg(raw, memory_map=True, sub_sample_rate=0.3)
    rng, logs = np.random.RandomState(3), []
    cd.load_criteo_split(cfg, "train", rng, logs.append)
    cd.load_criteo_split(cfg, "test", rng, logs.append)
    assert [line for line in logs if line.startswith("note:")] == []


def test_a_stream_not_freshly_seeded_is_refused(raw):
    used = np.random.RandomState(7)
    used.random_sample()
    with pytest.raises(ConfigError, match="not a fresh one seeded with --numpy-rand-seed=7"):
        du.preprocess_criteo(kaggle_cfg(raw, seed=7), lambda message: None, used)


def test_randomize_redoes_the_shuffle_only(raw):
    run(kaggle_cfg(raw, memory_map=True, randomize="total"))
    paths = criteo_paths("kaggle", str(raw))
    _, logs = notes_of(kaggle_cfg(raw, memory_map=True, randomize="day"))
    assert logs == [f"note: {paths.reordered_day(0)} was made with --data-randomize=total (this "
                    "run: day); redoing the reordered days",
                    f"note: {paths.intermediate_day(0, 'y')} was made with --data-randomize=total "
                    "(this run: day); redoing shuffle pass 1"]
    _, _, processed, plain_rng = plain_pipeline(plain_split(read_lines(raw), 7))
    _, reordered = plain_shuffle(processed, "day", False, plain_rng)
    for j in range(7):
        with np.load(paths.reordered_day(j)) as day:
            for key, want in zip(("X_cat", "X_int", "y"), reordered[j]):
                np.testing.assert_array_equal(day[key], want)
    # without memory-map randomize is drawn when loading: the output does not depend on it
    run(kaggle_cfg(raw, randomize="total"))
    assert notes_of(kaggle_cfg(raw, randomize="none"))[1] == []


def test_another_format_version_is_redone(raw, monkeypatch):
    output, _ = run(kaggle_cfg(raw))
    before = Path(output).read_bytes()
    monkeypatch.setattr(provenance, "FORMAT_VERSION", provenance.FORMAT_VERSION + 1)
    _, logs = notes_of(kaggle_cfg(raw))
    version = provenance.FORMAT_VERSION
    assert f"note: {output} was made in data format version {version - 1} (this version writes " \
           f"{version}); redoing the concatenation" in logs
    assert Path(output).read_bytes() == before
    assert provenance.read(output)["format"] == version


def test_a_file_replaced_after_it_was_made_is_redone(raw):
    output, _ = run(kaggle_cfg(raw))
    x_cat, x_int, y = expected_arrays(raw)
    np.savez(output, X_cat=x_cat[:10], X_int=x_int[:10], y=y[:10])  # e.g. the reference's file
    _, logs = notes_of(kaggle_cfg(raw))
    assert f"note: {output} was changed after it was made; redoing the concatenation" in logs
    assert_output(output, expected_arrays(raw))


def test_stale_temporary_files_are_removed_when_a_run_starts(raw):
    paths = criteo_paths("kaggle", str(raw))
    left = [paths.processed_day(2) + ".4194305-0badcafe.tmp",  # a pid no process has
            provenance.record_path(paths.output_file()) + ".4194305-0badcafe.tmp"]
    for _ in range(2):  # before the first run, and again once everything is done
        for name in left:
            Path(name).write_bytes(b"half")
        run(kaggle_cfg(raw))
        assert not [name for name in left if os.path.exists(name)]


# ------------------------------------------------------------------------------------------------
# Files without provenance, and without the raw data
# ------------------------------------------------------------------------------------------------

def test_without_raw_data_our_files_are_used_if_made_with_these_options(raw):
    output, _ = run(kaggle_cfg(raw))
    os.remove(raw)
    read, logs = notes_of(kaggle_cfg(raw))
    assert read == output
    assert logs == [f"note: the raw data is missing; using {output} as it is (what it was made "
                    "from cannot be checked)"]
    with pytest.raises(DataError, match=r"kaggleAdDisplayChallenge_processed.npz was made with "
                                        r"--max-ind-range=-1 \(this run: 50\); the raw data to "
                                        r"make it again is missing: .*train.txt: raw Criteo"):
        run(kaggle_cfg(raw, max_ind_range=50))


def test_named_file_without_provenance_is_used_as_it_is(raw, tmp_path):
    x_cat, x_int, y = expected_arrays(raw)
    named = tmp_path / "from_the_reference.npz"
    np.savez_compressed(named, X_cat=x_cat.astype(np.float64), X_int=x_int, y=y,
                        counts=x_cat.max(axis=0) + 1)
    read, logs = notes_of(kaggle_cfg(raw, processed_data_file=str(named)))
    assert read == str(named)
    assert logs == [f"note: using {named} as it is: it has no provenance record (made by the "
                    "reference or by an older version), and you named it with "
                    "--processed-data-file; delete it to preprocess again"]
    assert not (tmp_path / "train_day_0.npz").exists()  # nothing was preprocessed


def test_row_cache_of_a_replaced_compressed_file_is_rebuilt(tmp_path):
    gen = np.random.default_rng(0)
    path = str(tmp_path / "ref.npz")

    def write(n):
        arrays = dict(X_int=gen.integers(0, 9, (n, 13)), X_cat=gen.integers(0, 9, (n, 26)),
                      y=gen.integers(0, 2, n))
        np.savez_compressed(path, **arrays)
        return np.column_stack([arrays["y"], arrays["X_int"], arrays["X_cat"]])

    write(30)
    row_cache.open_rows(path, lambda message: None, progress=False)
    stamp = os.stat(path).st_mtime_ns
    newer = write(30)  # same shape, other values, dated before the cache
    os.utime(path, ns=(stamp - 10**9, stamp - 10**9))
    notes = []
    rows, cache = row_cache.open_rows(path, notes.append, progress=False)
    assert len(notes) == 1 and notes[0].startswith(f"note: {cache} was made from ")
    assert "ref.npz" in notes[0] and notes[0].endswith("; rebuilding it")
    np.testing.assert_array_equal(rows, newer)


def test_records_are_beside_the_file_a_link_names(tmp_path):
    target = tmp_path / "data.npz"
    np.savez(target, y=np.zeros(3))
    wanted = provenance.expected([], {"--max-ind-range": 5})
    provenance.write(str(target), wanted)
    link = tmp_path / "link.npz"
    os.symlink(target, link)
    assert provenance.mismatch(str(link), wanted) is None
    shutil.copy(target, tmp_path / "copy.npz")  # a copy is another file: no record
    assert provenance.mismatch(str(tmp_path / "copy.npz"), wanted) == provenance.NO_RECORD
