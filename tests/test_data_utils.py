"""Tests of the Criteo preprocessing (data_utils.py) against a plain, line-by-line
re-statement of the reference pipeline written here, on small generated raw files."""
from __future__ import annotations

import errno
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from dlrm.cli import describe
from dlrm.common import ConfigError, DataError
from dlrm.data.criteo import command, shuffle
from dlrm.data.criteo import preprocess as du
from dlrm.data.criteo.config import criteo_paths
from dlrm.io import npz as npz_io
from helpers.criteo import fake_kaggle_fixture, write_fake_terabyte
from helpers.plain_criteo import (assert_matches_plain, interrupted_run, kaggle_cfg,
                          plain_pipeline, plain_shuffle, plain_split, read_lines, run)

KAGGLE_LINES = 2000


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def npz_files(directory):
    """name -> bytes of every npz/npy file in a directory."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())
            if p.suffix in (".npz", ".npy")}


kaggle_raw = fake_kaggle_fixture(KAGGLE_LINES, seed=3)


@pytest.fixture
def kaggle_dir(tmp_path, kaggle_raw):
    shutil.copy(kaggle_raw, tmp_path / "train.txt")
    return tmp_path


# ------------------------------------------------------------------------------------------------
# Paths, configuration
# ------------------------------------------------------------------------------------------------

def test_paths_follow_the_reference_examples():
    kaggle = criteo_paths("kaggle", "./input/train.txt")
    assert (kaggle.d_path, kaggle.d_file, kaggle.npzfile, kaggle.days) == (
        "./input/", "train", "./input/train_day", 7)
    assert kaggle.processed_day(3) == "./input/train_day_3_processed.npz"
    assert kaggle.reordered_day(0) == "./input/train_day_0_reordered.npz"
    assert kaggle.day_count_file() == "./input/train_day_count.npz"
    assert kaggle.fea_count_file() == "./input/train_fea_count.npz"
    assert kaggle.output_file() == "./input/kaggleAdDisplayChallenge_processed.npz"
    tera = criteo_paths("terabyte", "./input/day")
    assert (tera.d_path, tera.d_file, tera.npzfile, tera.days) == ("./input/", "day", "./input/day", 24)
    assert tera.parsed_day(5) == "./input/day_5.npz"
    assert tera.output_file() == "./input/terabyte_processed.npz"
    assert criteo_paths("kaggle", "train.txt").d_path == "./"


@pytest.mark.parametrize("changes, flag", [({"randomize": "rows"}, "--data-randomize"),
                                           ({"sub_sample_rate": 1.5}, "--data-sub-sample-rate"),
                                           ({"sub_sample_rate": float("nan")}, "--data-sub-sample-rate"),
                                           ({"sub_sample_rate": -0.5}, "--data-sub-sample-rate"),
                                           ({"data_set": "avazu"}, "--data-set"),
                                           ({"raw_data_file": ""}, "--raw-data-file")])
def test_bad_config_names_the_flag(changes, flag):
    with pytest.raises(ConfigError) as refused:
        kaggle_cfg("x/train.txt", **changes)
    assert describe(refused.value, command.build_parser()).startswith(flag)


# ------------------------------------------------------------------------------------------------
# The pipeline against the plain implementation
# ------------------------------------------------------------------------------------------------

def test_kaggle_matches_plain_implementation(kaggle_dir):
    raw = kaggle_dir / "train.txt"
    output, _ = run(kaggle_cfg(raw))
    paths = criteo_paths("kaggle", str(raw))
    assert output == paths.output_file()
    parsed, dictionaries, processed, _ = plain_pipeline(plain_split(read_lines(raw), 7))
    assert [len(p[0]) for p in parsed] == [286, 286, 286, 286, 286, 285, 285]
    assert_matches_plain(paths, parsed, dictionaries, processed)
    with np.load(output) as data:
        assert set(data.keys()) == {"X_cat", "X_int", "y", "counts"}
        np.testing.assert_array_equal(data["X_cat"], np.concatenate([p[0] for p in processed]))
        np.testing.assert_array_equal(data["X_int"], np.concatenate([p[1] for p in processed]))
        np.testing.assert_array_equal(data["y"], np.concatenate([p[2] for p in processed]))
        np.testing.assert_array_equal(data["counts"], [len(d) for d in dictionaries])
        assert data["X_cat"].dtype == np.int32
    assert not list(kaggle_dir.glob("*.tmp"))


def test_sub_sampling_and_max_ind_range(kaggle_dir):
    raw = kaggle_dir / "train.txt"
    _, rng = run(kaggle_cfg(raw, sub_sample_rate=0.6, max_ind_range=1000))
    parsed, dictionaries, processed, plain_rng = plain_pipeline(
        plain_split(read_lines(raw), 7), rate=0.6, max_ind=1000)
    paths = criteo_paths("kaggle", str(raw))
    assert_matches_plain(paths, parsed, dictionaries, processed)
    with np.load(paths.parsed_day(0)) as day:
        assert day["X_cat_t"].dtype == np.int32  # as the reference when the range fits
        assert day["X_cat_t"].max() < 1000
    kept = sum(len(p[0]) for p in parsed)
    assert 0.45 * KAGGLE_LINES < kept < 0.65 * KAGGLE_LINES  # 75% negatives, 60% of them dropped
    assert rng.random_sample() == plain_rng.random_sample()  # same number of draws


@pytest.mark.parametrize("memory_map", [False, True])
def test_a_day_that_sub_sampling_empties(kaggle_dir, memory_map):
    """Every line of day 3 a negative, every negative dropped: the day has no rows left (its
    files hold empty arrays) and the other days are as the plain pipeline makes them."""
    raw = kaggle_dir / "train.txt"
    lines = read_lines(raw)
    for k in range(3 * 286, 4 * 286):  # day 3 of 2000 lines: 286 lines from line 859
        lines[k] = "0" + lines[k][lines[k].index("\t"):]
    raw.write_text("".join(lines))
    run(kaggle_cfg(raw, sub_sample_rate=1.0, memory_map=memory_map))
    parsed, dictionaries, processed, _ = plain_pipeline(plain_split(lines, 7), rate=1.0)
    assert len(parsed[3][0]) == 0 and all(len(p[0]) for i, p in enumerate(parsed) if i != 3)
    paths = criteo_paths("kaggle", str(raw))
    assert_matches_plain(paths, parsed, dictionaries, processed)
    if memory_map:
        with np.load(paths.reordered_day(3)) as day:
            assert day["X_cat"].shape == (0, 26) and day["y"].shape == (0,)
    assert not list(kaggle_dir.glob("*.tmp"))


def test_hex_case_short_and_empty_fields(tmp_path):
    """'ABCDEF12' and 'abcdef12' are one value; short hex parses; empty fields are 0."""
    base = ["1"] + ["3"] * 13 + ["0000000a"] * 26
    variants = []
    for k in range(14):
        fields = list(base)
        fields[14] = ["ABCDEF12", "abcdef12", "1a", "", "0000001a"][k % 5]
        fields[3] = "" if k % 2 else "-4"
        variants.append("\t".join(fields) + "\n")
    raw = tmp_path / "train.txt"
    raw.write_text("".join(variants))
    run(kaggle_cfg(raw))
    parsed, dictionaries, processed, _ = plain_pipeline(plain_split(read_lines(raw), 7))
    assert_matches_plain(criteo_paths("kaggle", str(raw)), parsed, dictionaries, processed)
    assert list(dictionaries[0]) == [0xABCDEF12, 0x1A, 0]


def test_terabyte_layout(tmp_path):
    write_fake_terabyte(str(tmp_path / "day"), 24, 40, seed=5)
    cfg = du.PreprocessConfig("terabyte", str(tmp_path / "day"), progress=False)
    output, _ = run(cfg)
    assert output == str(tmp_path / "terabyte_processed.npz")
    day_lines = [read_lines(tmp_path / f"day_{i}") for i in range(24)]
    parsed, dictionaries, processed, _ = plain_pipeline(day_lines)
    assert_matches_plain(criteo_paths("terabyte", str(tmp_path / "day")), parsed, dictionaries,
                         processed)


@pytest.mark.slow
def test_multiprocessing_gives_the_same_files(tmp_path, kaggle_raw):
    for name, parallel in (("seq", False), ("par", True)):
        (tmp_path / name).mkdir()
        shutil.copy(kaggle_raw, tmp_path / name / "train.txt")
        run(kaggle_cfg(tmp_path / name / "train.txt", sub_sample_rate=0.3, multiprocessing=parallel))
    assert npz_files(tmp_path / "seq") == npz_files(tmp_path / "par")


# ------------------------------------------------------------------------------------------------
# Memory-map shuffle
# ------------------------------------------------------------------------------------------------

def _plain_pass1(capacity, counts, choices, split_none, rng):
    """Pass 1's buckets as the spec describes the reference's loop: per day, every row's bucket in
    one draw (the last day's too); then row by row, a full bucket is drawn again, one value at a time."""
    days = len(counts)
    fill = [0] * days
    assigned = []
    for day, rows in enumerate(counts):
        drawn = rng.randint(0, choices, size=rows)
        for k in range(rows):
            if split_none or day < days - 1:
                target = drawn[k]
                while fill[target] >= capacity[target]:
                    target = rng.randint(0, choices)
            else:
                target = days - 1
            assigned.append((day, int(target), fill[target]))
            fill[target] += 1
    return assigned


@pytest.mark.parametrize("trial", range(24))
def test_pass1_buckets_and_stream_match_the_per_row_loop(trial, monkeypatch):
    gen = np.random.default_rng(trial)
    days = int(gen.integers(2, 7))
    capacity = gen.integers(0, 60, size=days)
    split_none = bool(trial % 2)
    choices = days if split_none else days - 1
    monkeypatch.setattr(shuffle, "ROWS_PER_CHUNK", int(gen.integers(1, 40)))  # days span several chunks
    rng, plain = np.random.RandomState(trial), np.random.RandomState(trial)
    assigner = shuffle.BucketAssigner(capacity, choices)
    ours = []
    for day, rows in enumerate(capacity):  # each day holds as many rows as its bucket
        placer = shuffle._day_placer(assigner, rng, day, int(rows), days, "total", split_none)
        for start in range(0, int(rows), shuffle.ROWS_PER_CHUNK):
            bucket, position = placer.place(min(shuffle.ROWS_PER_CHUNK, int(rows) - start))
            ours += [(day, int(b), int(p)) for b, p in zip(bucket, position)]
        placer.finish()
    assert ours == _plain_pass1(capacity, capacity, choices, split_none, plain)
    assert rng.random_sample() == plain.random_sample()  # the stream is left where the loop leaves it


def test_full_buckets_draw_again_after_the_days_draws():
    # two buckets of one row each and a third that takes the last day: day 0's two rows draw
    # [0, 0] at once; the second row's bucket is full, so it draws again from what follows
    seed = next(s for s in range(1000) if list(np.random.RandomState(s).randint(0, 2, size=2)) == [0, 0])
    rng = np.random.RandomState(seed)
    assigner = shuffle.BucketAssigner(np.array([1, 1, 2]), 2)
    placer = shuffle._day_placer(assigner, rng, 0, 2, 3, "total", False)
    bucket, position = placer.place(2)
    placer.finish()
    assert list(bucket) == [0, 1] and list(position) == [0, 0]
    expected = np.random.RandomState(seed)
    expected.randint(0, 2, size=2)
    while expected.randint(0, 2) != 1:  # the re-draws, after the bulk draw
        pass
    assert rng.random_sample() == expected.random_sample()


@pytest.mark.parametrize("randomize, split", [("total", "train"), ("total", "none"),
                                              ("day", "train"), ("none", "train")])
def test_memory_map_shuffle_matches_plain(kaggle_dir, randomize, split):
    raw = kaggle_dir / "train.txt"
    cfg = kaggle_cfg(raw, memory_map=True, randomize=randomize, data_split=split)
    output, rng = run(cfg)
    paths = criteo_paths("kaggle", str(raw))
    assert output == paths.npzfile
    assert du.processed_data_ready(cfg)
    _, _, processed, plain_rng = plain_pipeline(plain_split(read_lines(raw), 7))
    inter, reordered = plain_shuffle(processed, randomize, split == "none", plain_rng)
    for j in range(7):
        for part, expected in zip("yds", inter[j]):
            np.testing.assert_array_equal(np.load(paths.intermediate_day(j, part)), expected)
        with np.load(paths.reordered_day(j)) as day:
            assert set(day.keys()) == {"X_cat", "X_int", "y"}
            for key, expected in zip(("X_cat", "X_int", "y"), reordered[j]):
                np.testing.assert_array_equal(day[key], expected)
    assert rng.random_sample() == plain_rng.random_sample()
    last = reordered[6]
    if split != "none":  # the last day stays put
        np.testing.assert_array_equal(last[0], processed[6][0])
    if randomize != "total":  # rows stay within their day
        for j in range(7):
            assert sorted(map(tuple, reordered[j][0])) == sorted(map(tuple, processed[j][0]))


def test_shuffle_files_of_the_earlier_draw_order_are_redone(kaggle_dir):
    import json

    from dlrm.io import provenance

    raw = kaggle_dir / "train.txt"
    cfg = kaggle_cfg(raw, memory_map=True, randomize="total")
    run(cfg)
    paths = criteo_paths("kaggle", str(raw))
    before = npz_files(kaggle_dir)
    for j in range(7):  # as an earlier version recorded them: without the draw order
        for path in [paths.reordered_day(j)] + [paths.intermediate_day(j, part) for part in "yds"]:
            with open(provenance.record_path(path)) as src:
                record = json.load(src)
            del record["options"]["bucket draws"]
            with open(provenance.record_path(path), "w") as out:
                json.dump(record, out)
    notes = []
    run(cfg, log=notes.append)
    assert any("bucket draws=None" in note and "redoing" in note for note in notes)
    assert npz_files(kaggle_dir) == before


# ------------------------------------------------------------------------------------------------
# Resuming
# ------------------------------------------------------------------------------------------------

def test_interrupted_parse_resumes_to_identical_files(tmp_path, kaggle_raw, monkeypatch):
    for name in ("once", "twice"):
        (tmp_path / name).mkdir()
        shutil.copy(kaggle_raw, tmp_path / name / "train.txt")
    run(kaggle_cfg(tmp_path / "once" / "train.txt", sub_sample_rate=0.4))
    interrupted_run(kaggle_cfg(tmp_path / "twice" / "train.txt", sub_sample_rate=0.4), monkeypatch)
    left = npz_files(tmp_path / "twice")
    assert "train_day_3_processed.npz" in left and "train_day_4.npz" not in left
    assert not list((tmp_path / "twice").glob("*.tmp"))
    run(kaggle_cfg(tmp_path / "twice" / "train.txt", sub_sample_rate=0.4))
    assert npz_files(tmp_path / "once") == npz_files(tmp_path / "twice")


def test_deleted_files_are_rebuilt_identically(kaggle_dir):
    raw = kaggle_dir / "train.txt"
    run(kaggle_cfg(raw))
    before = npz_files(kaggle_dir)
    paths = criteo_paths("kaggle", str(raw))
    for name in (paths.processed_day(2), paths.parsed_day(5), paths.fea_dict_file(7),
                 paths.output_file()):
        os.remove(name)
    run(kaggle_cfg(raw))
    assert npz_files(kaggle_dir) == before


def test_interrupted_shuffle_resumes_to_identical_files(tmp_path, kaggle_raw, monkeypatch):
    for name in ("once", "twice"):
        (tmp_path / name).mkdir()
        shutil.copy(kaggle_raw, tmp_path / name / "train.txt")
    cfg = dict(memory_map=True, sub_sample_rate=0.2)
    run(kaggle_cfg(tmp_path / "once" / "train.txt", **cfg))

    real_write = shuffle._write_reordered

    def failing_write(paths, j, *args):
        if j == 3:
            raise KeyboardInterrupt("interrupted")
        return real_write(paths, j, *args)

    monkeypatch.setattr(shuffle, "_write_reordered", failing_write)
    with pytest.raises(KeyboardInterrupt):
        run(kaggle_cfg(tmp_path / "twice" / "train.txt", **cfg))
    assert (tmp_path / "twice" / "train_day_2_reordered.npz").exists()
    assert not (tmp_path / "twice" / "train_day_3_reordered.npz").exists()
    monkeypatch.setattr(shuffle, "_write_reordered", real_write)
    run(kaggle_cfg(tmp_path / "twice" / "train.txt", **cfg))  # replays the draws of done stages
    assert npz_files(tmp_path / "once") == npz_files(tmp_path / "twice")


def test_complete_run_draws_nothing_and_processed_name_is_written(kaggle_dir):
    raw = kaggle_dir / "train.txt"
    named = kaggle_dir / "mine.npz"
    cfg = kaggle_cfg(raw, processed_data_file=str(named))
    assert not du.processed_data_ready(cfg)
    output, _ = run(cfg)
    assert named.read_bytes() == Path(output).read_bytes()  # the reference never wrote this name
    assert du.processed_data_ready(cfg)
    _, rng = run(cfg)
    assert rng.random_sample() == np.random.RandomState(7).random_sample()


def write_reference_days(paths):
    """Processed days, dictionaries and counts in the reference's format (compressed, X_cat
    float64), holding other data than the raw file, and without provenance records."""
    gen = np.random.default_rng(2)
    for i in range(7):
        n = 5 + i
        np.savez_compressed(paths.processed_day(i), X_cat=gen.integers(0, 9, (n, 26)).astype(np.float64),
                            X_int=gen.integers(0, 9, (n, 13)).astype(np.int32),
                            y=gen.integers(0, 2, n).astype(np.int32))
    np.savez_compressed(paths.fea_count_file(), counts=np.full(26, 9, dtype=np.int32))
    for j in range(26):
        np.savez_compressed(paths.fea_dict_file(j), unique=np.arange(9, dtype=np.int32))


def test_intermediate_files_without_provenance_are_never_reused(kaggle_dir, tmp_path):
    raw = kaggle_dir / "train.txt"
    paths = criteo_paths("kaggle", str(raw))
    write_reference_days(paths)
    logs = []
    run(kaggle_cfg(raw), log=logs.append)
    parsed, dictionaries, processed, _ = plain_pipeline(plain_split(read_lines(raw), 7))
    assert_matches_plain(paths, parsed, dictionaries, processed)  # made from train.txt
    assert f"note: {paths.fea_dict_file(0)} has no provenance record (made by the reference or " \
           "by an older version); redoing the dictionaries" in logs
    assert any(line.startswith(f"note: {paths.processed_day(0)} has no provenance") for line in logs)

    (tmp_path / "alone").mkdir()  # without the raw file they cannot be trusted, nor redone
    alone = criteo_paths("kaggle", str(tmp_path / "alone" / "train.txt"))
    write_reference_days(alone)
    with pytest.raises(DataError, match="train.txt: raw Criteo Kaggle data not found"):
        run(kaggle_cfg(tmp_path / "alone" / "train.txt"))


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def _corrupt(raw, line_no, column, value=None, drop_from=None):
    lines = read_lines(raw)
    fields = lines[line_no - 1].rstrip("\n").split("\t")
    if drop_from is not None:
        fields = fields[:drop_from]
    else:
        fields[column] = value
    lines[line_no - 1] = "\t".join(fields) + "\n"
    raw.write_text("".join(lines))


@pytest.mark.parametrize("column, value, drop_from, message", [
    (None, None, 12, "expected 40 tab-separated fields, got 12"),
    (4, "12x", None, r"field 5 \(I4\) is not a 32-bit integer: '12x'"),
    (20, "zz00ff00", None, r"field 21 \(C7\) is not a hexadecimal category .*'zz00ff00'"),
    (39, "123456789", None, r"field 40 \(C26\) is not a hexadecimal category .*'123456789'"),
    # pyarrow rejects what a Python int() reads: the file's line, not the block's range
    (1, "+1", None, r"field 2 \(I1\) cannot be read: CSV conversion error to int32: invalid "
                    r"value '\+1'$"),
])
def test_malformed_line_names_file_and_line(kaggle_dir, column, value, drop_from, message):
    raw = kaggle_dir / "train.txt"
    _corrupt(raw, 1500, column, value, drop_from)  # line 1500 lies in day 5
    with pytest.raises(DataError, match=f"^{raw}:1500: {message}"):
        run(kaggle_cfg(raw))
    assert not list(kaggle_dir.glob("*.tmp"))


def test_terabyte_error_names_the_day_file(tmp_path):
    write_fake_terabyte(str(tmp_path / "day"), 24, 10, seed=1)
    _corrupt(tmp_path / "day_17", 4, 2, "nan")
    with pytest.raises(DataError, match=f"^{tmp_path / 'day_17'}:4: field 3 \\(I2\\)"):
        run(du.PreprocessConfig("terabyte", str(tmp_path / "day"), progress=False))


@pytest.mark.parametrize("label", ["2", "-1", "10"])
def test_label_other_than_0_or_1_names_the_line(kaggle_dir, label):
    raw = kaggle_dir / "train.txt"
    _corrupt(raw, 1234, 0, label)
    with pytest.raises(DataError, match=f"^{raw}:1234: field 1 \\(label\\) must be 0 or 1, "
                                        f"got {label}$"):
        run(kaggle_cfg(raw, sub_sample_rate=0.5))


@pytest.mark.parametrize("line", [1, 700, KAGGLE_LINES + 1])
@pytest.mark.parametrize("empty", ["\n", "\r\n"])
def test_empty_line_is_an_error_naming_it(kaggle_dir, line, empty):
    """The reference crashes on an empty line; skipping it would move the day boundaries."""
    raw = kaggle_dir / "train.txt"
    lines = read_lines(raw)
    lines.insert(line - 1, empty)
    raw.write_text("".join(lines), newline="")
    with pytest.raises(DataError, match=f"^{raw}:{line}: empty line \\(expected 40 "
                                        "tab-separated fields\\)$"):
        run(kaggle_cfg(raw))


def test_empty_raw_file_is_an_error(tmp_path):
    (tmp_path / "train.txt").write_bytes(b"")
    with pytest.raises(DataError, match=f"^{tmp_path / 'train.txt'}: the raw data file is empty$"):
        run(kaggle_cfg(tmp_path / "train.txt"))
    write_fake_terabyte(str(tmp_path / "day"), 24, 3, seed=1)
    (tmp_path / "day_5").write_bytes(b"")
    with pytest.raises(DataError, match=f"^{tmp_path / 'day_5'}: the raw data file is empty$"):
        run(du.PreprocessConfig("terabyte", str(tmp_path / "day"), progress=False))


def test_missing_raw_files_give_download_hints(tmp_path):
    with pytest.raises(DataError, match="train.txt: .*not found.*Criteo Display Advertising "
                                        r"Challenge.*https://ailab.criteo.com/ressources/"):
        run(kaggle_cfg(tmp_path / "train.txt"))
    write_fake_terabyte(str(tmp_path / "day"), 3, 5, seed=1)
    with pytest.raises(DataError, match=r"day_3: .*not found.*1TB Click Logs.*"
                                        r"https://labs.criteo.com/2013/12/download-terabyte"):
        run(du.PreprocessConfig("terabyte", str(tmp_path / "day"), progress=False))


@pytest.mark.parametrize("make, kind", [
    (os.mkfifo, "a named pipe \\(FIFO\\)"),
    (os.mkdir, "a directory"),
    (lambda path: os.symlink("/dev/null", path), "a character device"),
])
def test_raw_path_that_is_no_regular_file_says_what_it_is(tmp_path, make, kind):
    """Not "not found ... download": the path is there, it is just not a file to read (a FIFO
    would also block the run when opened)."""
    make(str(tmp_path / "train.txt"))
    with pytest.raises(DataError, match=f"^{tmp_path / 'train.txt'}: the raw Criteo Kaggle data "
                                        f"is {kind}, not a regular file$"):
        run(kaggle_cfg(tmp_path / "train.txt"))
    write_fake_terabyte(str(tmp_path / "day"), 24, 3, seed=1)
    os.remove(tmp_path / "day_7")
    make(str(tmp_path / "day_7"))
    with pytest.raises(DataError, match=f"^{tmp_path / 'day_7'}: the raw Criteo Terabyte day "
                                        f"file is {kind}, not a regular file$"):
        run(du.PreprocessConfig("terabyte", str(tmp_path / "day"), progress=False))


def test_dangling_link_as_raw_path_is_named(tmp_path):
    os.symlink(tmp_path / "gone.txt", tmp_path / "train.txt")
    with pytest.raises(DataError, match=f"^{tmp_path / 'train.txt'}: raw Criteo Kaggle data not "
                                        r"found \(a symbolic link to a missing file\); download"):
        run(kaggle_cfg(tmp_path / "train.txt"))


def test_raw_file_that_shrinks_while_read_is_an_error(kaggle_dir, monkeypatch):
    """Cut to half after its lines were counted: an error naming it (the reader used to wait
    for the missing bytes forever)."""
    raw = kaggle_dir / "train.txt"
    half = raw.stat().st_size // 2
    count_lines = du.day_ranges

    def count_then_shrink(cfg, paths):
        ranges = count_lines(cfg, paths)
        os.truncate(raw, half)
        return ranges

    monkeypatch.setattr(du, "day_ranges", count_then_shrink)
    outcome = []

    def attempt():
        try:
            run(kaggle_cfg(raw))
        except DataError as err:
            outcome.append(str(err))

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "preprocessing waits forever for the missing bytes"
    assert len(outcome) == 1 and re.match(f"^{raw}: ends at byte {half}, before byte \\d+ where "
                                          "its lines were counted", outcome[0])


def test_not_enough_disk_space(kaggle_dir, monkeypatch):
    monkeypatch.setattr(du.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(DataError, match=f"{kaggle_dir}: not enough free disk space .*need about "
                                        r"\d+ bytes, 1000 free"):
        run(kaggle_cfg(kaggle_dir / "train.txt"))


def test_a_full_disk_is_an_error_naming_the_file(kaggle_dir, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(npz_io, "_pwrite_all", full)
    with pytest.raises(DataError, match=f"^{kaggle_dir / 'train_day_0.npz'}: cannot write "
                                        r"\(No space left on device\)$"):
        run(kaggle_cfg(kaggle_dir / "train.txt"))
    assert sorted(os.listdir(kaggle_dir)) == ["train.txt"]  # no temporary file, no record


def test_read_only_data_directory_fails_before_parsing(kaggle_dir, monkeypatch):
    def refuse(path, mode="wb"):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(du, "atomic_open", refuse)
    monkeypatch.setattr(du, "day_ranges", lambda *args: pytest.fail("the raw data was read"))
    with pytest.raises(DataError, match=f"^{kaggle_dir}: cannot write there \\(Read-only file "
                                        r"system\); preprocessing writes its files beside the raw "
                                        "data$"):
        run(kaggle_cfg(kaggle_dir / "train.txt"))


def test_processed_name_that_cannot_be_written_is_an_error_naming_it(kaggle_dir):
    (kaggle_dir / "a_file").write_text("not a directory")
    named = kaggle_dir / "a_file" / "processed.npz"
    with pytest.raises(DataError, match=f"^{named}: cannot write: {kaggle_dir / 'a_file'} is not "
                                        "a directory$"):
        run(kaggle_cfg(kaggle_dir / "train.txt", processed_data_file=str(named)))


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def test_cli_runs_and_prints_output(kaggle_dir, capsys):
    raw = kaggle_dir / "train.txt"
    code = command.main([f"--raw-data-file={raw}", "--data-set=kaggle", "--max-ind-range=100",
                    "--data-randomize=day", "--memory-map", "--numpy-rand-seed=3", "--no-progress"])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(kaggle_dir / "train_day")
    assert (kaggle_dir / "train_day_6_reordered.npz").exists()


@pytest.mark.parametrize("argv_tail, message", [
    (["--data-randomize=rows"], "--data-randomize=rows is not supported (choose from total, day, none)"),
    (["--raw-data-file=BAD"], "expected 40 tab-separated fields"),
])
def test_cli_bad_input_is_one_error_line(kaggle_dir, capsys, argv_tail, message):
    raw = kaggle_dir / "train.txt"
    _corrupt(raw, 3, None, drop_from=5)
    argv = [f"--raw-data-file={raw}", "--no-progress"] + [a for a in argv_tail if "BAD" not in a]
    assert command.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
