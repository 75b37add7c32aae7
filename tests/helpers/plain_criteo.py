"""A plain, line-by-line re-statement of the reference's Criteo preprocessing (Python loops and
dicts: obviously correct, slow), and helpers that run ours, for the data tests."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dlrm.data.criteo import days
from dlrm.data.criteo import preprocess as du


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
    """Parse: per day (y, dense, cats) lists, drawing one uniform per line when sub-sampling."""
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
    """Parse, dictionaries, ids: parsed days, dictionaries, processed days; and the RNG afterwards."""
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
    """The memory-map shuffle, one sample at a time: pass 1 buckets, pass 2 permutations."""
    days = len(processed)
    counts = [len(y) for _, _, y in processed]
    inter = [(np.zeros(n), np.zeros((n, 13)), np.zeros((n, 26))) for n in counts]
    fill = [0] * days
    choices = days if split_none else days - 1
    for i, (x_cat, x_int, y) in enumerate(processed):
        if randomize == "total":  # every day's buckets at once, the last day's too (unused unless split none)
            drawn = rng.randint(0, choices, size=counts[i])
        for k in range(counts[i]):
            if randomize == "total" and (split_none or i < days - 1):
                bucket = drawn[k]
                while fill[bucket] >= counts[bucket]:  # full: draw again, after the day's draws
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
# Running ours, comparing
# ------------------------------------------------------------------------------------------------

def read_lines(path):
    with open(path, "r", newline="") as src:
        return src.readlines()


def kaggle_cfg(raw, **changes):
    values = dict(data_set="kaggle", raw_data_file=str(raw), progress=False, seed=7)
    values.update(changes)
    return du.PreprocessConfig(**values)


def run(cfg, seed=7, log=lambda message: None):
    """Preprocess with --numpy-rand-seed ``seed``; (output, the stream it drew from)."""
    cfg = dataclasses.replace(cfg, seed=seed)
    rng = np.random.RandomState(seed)
    return du.preprocess_criteo(cfg, log, rng), rng


def interrupted_run(cfg, monkeypatch, day=4):
    """Run ours until it starts day ``day``, where a KeyboardInterrupt stops it (as Ctrl-C)."""
    real_run_day = days.run_day

    def failing_run_day(job, *args):
        if job.day == day:
            raise KeyboardInterrupt("interrupted")
        return real_run_day(job, *args)

    monkeypatch.setattr(days, "run_day", failing_run_day)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(days, "run_day", real_run_day)


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
