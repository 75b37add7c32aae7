"""Tests of the Criteo preprocessing (data_utils.py) against a plain, line-by-line
re-statement of the reference pipeline written here, on small generated raw files."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import data_utils as du  # noqa: E402
from dlrm_common import ConfigError, DataError  # noqa: E402
from make_fake_criteo import write_fake_kaggle, write_fake_terabyte  # noqa: E402

KAGGLE_LINES = 2000


# ------------------------------------------------------------------------------------------------
# The plain implementation of the reference's pipeline (Python loops, dicts; obviously correct, slow)
# ------------------------------------------------------------------------------------------------

def plain_split(lines, days):
    """Kaggle split: N//days lines per part, the first N%days parts one line longer."""
    n = len(lines)
    sizes = [n // days + (1 if i < n % days else 0) for i in range(days)]
    out, start = [], 0
    for size in sizes:
        out.append(lines[start:start + size])
        start += size
    return out


def plain_parse(day_lines, rate, max_ind, rng):
    """Steps 2: per day (y, dense, cats) lists, drawing one uniform per line when sub-sampling."""
    days = []
    for lines in day_lines:
        draws = rng.uniform(low=0.0, high=1.0, size=len(lines)) if rate else None
        ys, dense, cats = [], [], []
        for k, line in enumerate(lines):
            fields = ["0" if f in ("", "\n") else f for f in line.split("\t")]
            label = int(fields[0])
            if rate and label == 0 and draws[k] < rate:
                continue
            ys.append(label)
            dense.append([int(f) for f in fields[1:14]])
            cats.append([int(f, 16) % max_ind if max_ind > 0 else int(f, 16) for f in fields[14:]])
        days.append((ys, dense, cats))
    return days


def plain_pipeline(day_lines, rate=0.0, max_ind=-1, seed=7):
    """Steps 2-6: parsed days, dictionaries, processed days; and the RNG afterwards."""
    rng = np.random.RandomState(seed)
    parsed = plain_parse(day_lines, rate, max_ind, rng)
    dictionaries = [dict() for _ in range(26)]
    for _, _, cats in parsed:
        for row in cats:
            for j, value in enumerate(row):
                dictionaries[j].setdefault(value, len(dictionaries[j]))
    processed = []
    for ys, dense, cats in parsed:
        x_cat = np.array([[dictionaries[j][v] for j, v in enumerate(row)] for row in cats],
                         dtype=np.int64).reshape(-1, 26)
        x_int = np.maximum(np.array(dense, dtype=np.int64).reshape(-1, 13), 0)
        processed.append((x_cat, x_int, np.array(ys, dtype=np.int64)))
    return parsed, dictionaries, processed, rng


def plain_shuffle(processed, randomize, split_none, rng):
    """Step 7, one sample at a time: pass 1 buckets, pass 2 permutations."""
    days = len(processed)
    counts = [len(y) for _, _, y in processed]
    inter = [(np.zeros(n), np.zeros((n, 13)), np.zeros((n, 26))) for n in counts]
    fill = [0] * days
    for i, (x_cat, x_int, y) in enumerate(processed):
        for k in range(counts[i]):
            if randomize == "total" and (split_none or i < days - 1):
                choices = days if split_none else days - 1
                bucket = rng.randint(0, choices)
                while fill[bucket] >= counts[bucket]:
                    bucket = rng.randint(0, choices)
            elif randomize == "total":
                bucket = days - 1
            else:
                bucket = i
            ys, ds, ss = inter[bucket]
            ys[fill[bucket]], ds[fill[bucket]], ss[fill[bucket]] = y[k], x_int[k], x_cat[k]
            fill[bucket] += 1
    reordered = []
    for j, (ys, ds, ss) in enumerate(inter):
        if randomize in ("day", "total") and (split_none or j < days - 1):
            order = rng.permutation(counts[j])
            ys, ds, ss = ys[order], ds[order], ss[order]
        reordered.append((ss, ds, ys))
    return inter, reordered


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def read_lines(path):
    with open(path, "r", newline="") as src:
        return src.readlines()


def kaggle_cfg(raw, **changes):
    values = dict(data_set="kaggle", raw_data_file=str(raw), progress=False)
    values.update(changes)
    return du.PreprocessConfig(**values)


def run(cfg, seed=7, log=lambda message: None):
    rng = np.random.RandomState(seed)
    return du.preprocess_criteo(cfg, rng, log), rng


def npz_files(directory):
    """name -> bytes of every npz/npy file in a directory."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())
            if p.suffix in (".npz", ".npy")}


@pytest.fixture(scope="module")
def kaggle_raw(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "train.txt"
    write_fake_kaggle(str(path), KAGGLE_LINES, seed=3)
    return path


@pytest.fixture
def kaggle_dir(tmp_path, kaggle_raw):
    shutil.copy(kaggle_raw, tmp_path / "train.txt")
    return tmp_path


def assert_matches_plain(paths, parsed, dictionaries, processed):
    for i, (ys, dense, cats) in enumerate(parsed):
        with np.load(paths.parsed_day(i)) as day:
            assert day["X_cat_t"].shape == (26, len(ys))
            np.testing.assert_array_equal(day["X_cat_t"].T, np.array(cats).reshape(-1, 26))
            np.testing.assert_array_equal(day["X_int"], np.array(dense).reshape(-1, 13))
            np.testing.assert_array_equal(day["y"], ys)
            assert day["X_int"].dtype == np.int32 and day["y"].dtype == np.int32
        with np.load(paths.processed_day(i)) as day:
            x_cat, x_int, y = processed[i]
            np.testing.assert_array_equal(day["X_cat"], x_cat)
            np.testing.assert_array_equal(day["X_int"], x_int)
            np.testing.assert_array_equal(day["y"], y)
    for j in range(26):
        with np.load(paths.fea_dict_file(j)) as data:
            np.testing.assert_array_equal(data["unique"], list(dictionaries[j]))
    with np.load(paths.fea_count_file()) as data:
        assert data["counts"].dtype == np.int32
        np.testing.assert_array_equal(data["counts"], [len(d) for d in dictionaries])
    with np.load(paths.day_count_file()) as data:
        np.testing.assert_array_equal(data["total_per_file"], [len(p[0]) for p in parsed])


# ------------------------------------------------------------------------------------------------
# Paths, configuration
# ------------------------------------------------------------------------------------------------

def test_paths_follow_the_reference_examples():
    kaggle = du.criteo_paths("kaggle", "./input/train.txt")
    assert (kaggle.d_path, kaggle.d_file, kaggle.npzfile, kaggle.days) == (
        "./input/", "train", "./input/train_day", 7)
    assert kaggle.processed_day(3) == "./input/train_day_3_processed.npz"
    assert kaggle.reordered_day(0) == "./input/train_day_0_reordered.npz"
    assert kaggle.day_count_file() == "./input/train_day_count.npz"
    assert kaggle.fea_count_file() == "./input/train_fea_count.npz"
    assert kaggle.output_file() == "./input/kaggleAdDisplayChallenge_processed.npz"
    tera = du.criteo_paths("terabyte", "./input/day")
    assert (tera.d_path, tera.d_file, tera.npzfile, tera.days) == ("./input/", "day", "./input/day", 24)
    assert tera.parsed_day(5) == "./input/day_5.npz"
    assert tera.output_file() == "./input/terabyte_processed.npz"
    assert du.criteo_paths("kaggle", "train.txt").d_path == "./"


@pytest.mark.parametrize("changes, flag", [({"randomize": "rows"}, "--data-randomize"),
                                           ({"sub_sample_rate": 1.5}, "--data-sub-sample-rate"),
                                           ({"data_set": "avazu"}, "--data-set"),
                                           ({"raw_data_file": ""}, "--raw-data-file")])
def test_bad_config_names_the_flag(changes, flag):
    cfg = kaggle_cfg("x/train.txt", **changes)
    with pytest.raises(ConfigError, match=flag):
        du.preprocess_criteo(cfg, np.random.RandomState(0), lambda message: None)


# ------------------------------------------------------------------------------------------------
# The pipeline against the plain implementation
# ------------------------------------------------------------------------------------------------

def test_kaggle_matches_plain_implementation(kaggle_dir):
    raw = kaggle_dir / "train.txt"
    output, _ = run(kaggle_cfg(raw))
    paths = du.criteo_paths("kaggle", str(raw))
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
    paths = du.criteo_paths("kaggle", str(raw))
    assert_matches_plain(paths, parsed, dictionaries, processed)
    with np.load(paths.parsed_day(0)) as day:
        assert day["X_cat_t"].dtype == np.int32  # as the reference when the range fits
        assert day["X_cat_t"].max() < 1000
    kept = sum(len(p[0]) for p in parsed)
    assert 0.45 * KAGGLE_LINES < kept < 0.65 * KAGGLE_LINES  # 75% negatives, 60% of them dropped
    assert rng.random_sample() == plain_rng.random_sample()  # same number of draws


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
    assert_matches_plain(du.criteo_paths("kaggle", str(raw)), parsed, dictionaries, processed)
    assert list(dictionaries[0]) == [0xABCDEF12, 0x1A, 0]


def test_terabyte_layout(tmp_path):
    write_fake_terabyte(str(tmp_path / "day"), 24, 40, seed=5)
    cfg = du.PreprocessConfig("terabyte", str(tmp_path / "day"), progress=False)
    output, _ = run(cfg)
    assert output == str(tmp_path / "terabyte_processed.npz")
    day_lines = [read_lines(tmp_path / f"day_{i}") for i in range(24)]
    parsed, dictionaries, processed, _ = plain_pipeline(day_lines)
    assert_matches_plain(du.criteo_paths("terabyte", str(tmp_path / "day")), parsed, dictionaries,
                         processed)


def test_multiprocessing_gives_the_same_files(tmp_path, kaggle_raw):
    for name, parallel in (("seq", False), ("par", True)):
        (tmp_path / name).mkdir()
        shutil.copy(kaggle_raw, tmp_path / name / "train.txt")
        run(kaggle_cfg(tmp_path / name / "train.txt", sub_sample_rate=0.3, multiprocessing=parallel))
    assert npz_files(tmp_path / "seq") == npz_files(tmp_path / "par")


# ------------------------------------------------------------------------------------------------
# Memory-map shuffle
# ------------------------------------------------------------------------------------------------

def test_bucket_assigner_matches_per_sample_loop():
    gen = np.random.default_rng(11)
    for trial in range(30):
        days = int(gen.integers(2, 6))
        capacity = gen.integers(0, 40, size=days)
        split_none = bool(trial % 2)
        choices = days if split_none else days - 1
        count = int(capacity[:choices].sum())
        rng, plain = np.random.RandomState(trial), np.random.RandomState(trial)
        assigner = du.BucketAssigner(capacity, choices)
        bucket, position = [], []
        for piece in np.array_split(np.arange(count), 3):
            b, p = assigner.draw(rng, len(piece))
            bucket += list(b)
            position += list(p)
        fill = [0] * days
        for k in range(count):
            target = plain.randint(0, choices)
            while fill[target] >= capacity[target]:
                target = plain.randint(0, choices)
            assert (bucket[k], position[k]) == (target, fill[target])
            fill[target] += 1
        assert rng.random_sample() == plain.random_sample()


@pytest.mark.parametrize("randomize, split", [("total", "train"), ("total", "none"),
                                              ("day", "train"), ("none", "train")])
def test_memory_map_shuffle_matches_plain(kaggle_dir, randomize, split):
    raw = kaggle_dir / "train.txt"
    cfg = kaggle_cfg(raw, memory_map=True, randomize=randomize, data_split=split)
    output, rng = run(cfg)
    paths = du.criteo_paths("kaggle", str(raw))
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


# ------------------------------------------------------------------------------------------------
# Resuming
# ------------------------------------------------------------------------------------------------

def test_interrupted_parse_resumes_to_identical_files(tmp_path, kaggle_raw, monkeypatch):
    for name in ("once", "twice"):
        (tmp_path / name).mkdir()
        shutil.copy(kaggle_raw, tmp_path / name / "train.txt")
    run(kaggle_cfg(tmp_path / "once" / "train.txt", sub_sample_rate=0.4))

    real_run_day = du.run_day

    def failing_run_day(job, *args):
        if job.day == 4:
            raise KeyboardInterrupt("interrupted")
        return real_run_day(job, *args)

    monkeypatch.setattr(du, "run_day", failing_run_day)
    with pytest.raises(KeyboardInterrupt):
        run(kaggle_cfg(tmp_path / "twice" / "train.txt", sub_sample_rate=0.4))
    left = npz_files(tmp_path / "twice")
    assert "train_day_3_processed.npz" in left and "train_day_4.npz" not in left
    assert not list((tmp_path / "twice").glob("*.tmp"))
    monkeypatch.setattr(du, "run_day", real_run_day)
    run(kaggle_cfg(tmp_path / "twice" / "train.txt", sub_sample_rate=0.4))
    assert npz_files(tmp_path / "once") == npz_files(tmp_path / "twice")


def test_deleted_files_are_rebuilt_identically(kaggle_dir):
    raw = kaggle_dir / "train.txt"
    run(kaggle_cfg(raw))
    before = npz_files(kaggle_dir)
    paths = du.criteo_paths("kaggle", str(raw))
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

    real_write = du._write_reordered

    def failing_write(paths, j, *args):
        if j == 3:
            raise KeyboardInterrupt("interrupted")
        return real_write(paths, j, *args)

    monkeypatch.setattr(du, "_write_reordered", failing_write)
    with pytest.raises(KeyboardInterrupt):
        run(kaggle_cfg(tmp_path / "twice" / "train.txt", **cfg))
    assert (tmp_path / "twice" / "train_day_2_reordered.npz").exists()
    assert not (tmp_path / "twice" / "train_day_3_reordered.npz").exists()
    monkeypatch.setattr(du, "_write_reordered", real_write)
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


def test_reference_made_processed_days_are_concatenated(tmp_path):
    """Files in the reference's format (compressed, X_cat float64) are read as they are."""
    paths = du.criteo_paths("kaggle", str(tmp_path / "train.txt"))
    gen = np.random.default_rng(2)
    days = []
    for i in range(7):
        n = 5 + i
        day = (gen.integers(0, 9, (n, 26)).astype(np.float64), gen.integers(0, 9, (n, 13)).astype(np.int32),
               gen.integers(0, 2, n).astype(np.int32))
        np.savez_compressed(paths.processed_day(i), X_cat=day[0], X_int=day[1], y=day[2])
        days.append(day)
    np.savez_compressed(paths.fea_count_file(), counts=np.full(26, 9, dtype=np.int32))
    for j in range(26):
        np.savez_compressed(paths.fea_dict_file(j), unique=np.arange(9, dtype=np.int32))
    output, _ = run(kaggle_cfg(tmp_path / "train.txt"))
    with np.load(output) as data:
        for k, key in enumerate(("X_cat", "X_int", "y")):
            np.testing.assert_array_equal(data[key], np.concatenate([d[k] for d in days]))


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


def test_missing_raw_files_give_download_hints(tmp_path):
    with pytest.raises(DataError, match="train.txt: .*not found.*Criteo Display Advertising "
                                        r"Challenge.*https://ailab.criteo.com/ressources/"):
        run(kaggle_cfg(tmp_path / "train.txt"))
    write_fake_terabyte(str(tmp_path / "day"), 3, 5, seed=1)
    with pytest.raises(DataError, match=r"day_3: .*not found.*1TB Click Logs.*"
                                        r"https://labs.criteo.com/2013/12/download-terabyte"):
        run(du.PreprocessConfig("terabyte", str(tmp_path / "day"), progress=False))


def test_not_enough_disk_space(kaggle_dir, monkeypatch):
    monkeypatch.setattr(du.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(DataError, match=f"{kaggle_dir}: not enough free disk space .*need about "
                                        r"\d+ bytes, 1000 free"):
        run(kaggle_cfg(kaggle_dir / "train.txt"))


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def test_cli_runs_and_prints_output(kaggle_dir, capsys):
    raw = kaggle_dir / "train.txt"
    code = du.main([f"--raw-data-file={raw}", "--data-set=kaggle", "--max-ind-range=100",
                    "--data-randomize=day", "--memory-map", "--numpy-rand-seed=3", "--no-progress"])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(kaggle_dir / "train_day")
    assert (kaggle_dir / "train_day_6_reordered.npz").exists()


@pytest.mark.parametrize("argv_tail, message", [
    (["--data-randomize=rows"], "argument --data-randomize: invalid choice"),
    (["--raw-data-file=BAD"], "expected 40 tab-separated fields"),
])
def test_cli_bad_input_is_one_error_line(kaggle_dir, capsys, argv_tail, message):
    raw = kaggle_dir / "train.txt"
    _corrupt(raw, 3, None, drop_from=5)
    argv = [f"--raw-data-file={raw}", "--no-progress"] + [a for a in argv_tail if "BAD" not in a]
    assert du.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
