"""Tests for synthetic_trace.py: trace profiling, distribution/trace files, LRU generation and
trace-based synthetic batches.

The generators are compared with plain step-by-step versions written here from the reference's description: a full
address list that is rotated, one ``rand(1)`` per access, linear scans instead of bisection.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dlrm.common import ConfigError, DataError
from dlrm.data.random import RandomDataConfig
from dlrm.data.synthetic_trace import (
    TraceDistribution, distribution_paths, generate_lru_trace, generate_synthetic_batch,
    profile_trace, read_distribution, read_trace, trace_main, write_distribution, write_trace)
from helpers.rng import same_state
from helpers.runs import ROOT, SMALL

# The reference's shipped example files.
EXAMPLE_DIST_TEXT = "1, 2, 3, 4, 5, 6\n0, 1, 3, 4, 5\n0.55, 0.64, 0.82, 0.91, 1.0\n"
EXAMPLE_TRACE_TEXT = "1, 2, 3, 4, 5, 3, 4, 1, 1, 6, 3"
EXAMPLE_TRACE = [1, 2, 3, 4, 5, 3, 4, 1, 1, 6, 3]
EXAMPLE_DIST = TraceDistribution([1, 2, 3, 4, 5, 6], [0, 1, 3, 4, 5],
                                 [0.55, 0.64, 0.82, 0.91, 1.0])


# ------------------------------------------------------------------------------------------------
# Plain reference implementations (independent of the module under test)


def plain_profile(trace, padding=False):
    """The reference's stack walk: distance = stack length - position, then move to the top."""
    stack, new_lines, distances = [], [], []
    for address in trace:
        if address in stack:
            position = stack.index(address)
            distances.append(len(stack) - position)
            stack.pop(position)
        else:
            distances.append(0)
            new_lines.append(address)
        stack.append(address)
    if padding and max(distances) > 0:
        distances += [0] * math.ceil(len(trace) / max(distances))
    values = sorted(set(distances))
    running, cdf = 0, []
    for value in values:
        running += distances.count(value)
        cdf.append(running / len(distances))
    return new_lines, values, cdf


def plain_distance(rng, distances, cdf, new_refs, padding):
    u = rng.rand(1)[0]
    if new_refs < distances[-1]:
        last = max(j for j, d in enumerate(distances) if d <= new_refs)
        u = u * cdf[last]
    elif padding:
        u = (1.0 - cdf[0]) * u + cdf[0]
    for j, value in enumerate(cdf):
        if u <= value:
            return distances[j]
    raise AssertionError("cdf does not reach u")


def plain_lru(rng, dist, length, padding=False):
    """Full address list, rotated as the reference does; one rand(1) per access."""
    addresses = dist.line_accesses.tolist()
    distances, cdf = dist.distances.tolist(), dist.cdf.tolist()
    out, new_refs = [], 0
    for _ in range(length):
        distance = plain_distance(rng, distances, cdf, new_refs, padding)
        if distance == 0:
            address = addresses.pop(0)
            new_refs += 1
        else:
            address = addresses.pop(len(addresses) - distance)
        addresses.append(address)
        out.append(address)
    return out


def batch_config(dense_dim, table_sizes, k, fixed, padding, round_targets):
    """The RandomDataConfig that generate_synthetic_batch reads these settings from."""
    return RandomDataConfig(dense_dim=dense_dim, table_sizes=tuple(table_sizes),
                            num_indices_per_lookup=k, fixed=fixed, trace_padding=padding,
                            round_targets=round_targets, generation="synthetic")


def plain_batch(rng, batch_size, dense_dim, table_sizes, k, fixed, dists, padding, round_targets):
    """The reference's draw order, sample by sample. Returns arrays and the warning count."""
    dense = rng.rand(batch_size, dense_dim).astype(np.float32)
    offsets, indices, warnings = [], [], 0
    for size, dist in zip(table_sizes, dists):
        table_offsets, table_indices = [], []
        for _ in range(batch_size):
            if fixed:
                bag_size = k
            else:
                r = rng.random_sample(1)
                bag_size = int(np.round(max(1.0, r[0] * min(size, k))))
            bag = np.unique(plain_lru(rng, dist, bag_size, padding))
            if np.any(bag < 0) or np.any(bag >= size):
                warnings += 1
                bag = np.mod(bag, size)
            table_offsets.append(len(table_indices))
            table_indices += bag.astype(np.int64).tolist()
        offsets.append(table_offsets)
        indices.append(np.array(table_indices, dtype=np.int64))
    labels = rng.rand(batch_size, 1).astype(np.float32)
    if round_targets:
        labels = np.round(labels)
    return dense, np.array(offsets, dtype=np.int64), indices, labels, warnings


def random_trace(seed, length, num_addresses, low=0):
    """A trace with reuse: addresses drawn from a skewed distribution (separate generator)."""
    draw = np.random.RandomState(seed)
    weights = 1.0 / np.arange(1, num_addresses + 1)
    return (draw.choice(num_addresses, size=length, p=weights / weights.sum()) + low).tolist()


# ------------------------------------------------------------------------------------------------
# Profiling


def test_profile_example_trace_by_hand():
    # stack walk of 1 2 3 4 5 3 4 1 1 6 3: five new, 3 at depth 3, 4 at depth 3, 1 at depth 5,
    # 1 at depth 1, 6 new, 3 at depth 4 -> distances 0 x6, 1 x1, 3 x2, 4 x1, 5 x1 (11 accesses)
    dist = profile_trace(EXAMPLE_TRACE)
    assert dist.line_accesses.tolist() == [1, 2, 3, 4, 5, 6]
    assert dist.distances.tolist() == [0, 1, 3, 4, 5]
    assert dist.cdf.tolist() == [6 / 11, 7 / 11, 9 / 11, 10 / 11, 1.0]


def test_profile_padding_fixes_reference_crash():
    # the reference crashed with padding; it appends ceil(11 / 5) = 3 zero distances -> 9 of 14 new
    dist = profile_trace(EXAMPLE_TRACE, enable_padding=True)
    assert dist.distances.tolist() == [0, 1, 3, 4, 5]
    assert dist.cdf.tolist() == [9 / 14, 10 / 14, 12 / 14, 13 / 14, 1.0]


def test_profile_padding_all_new_addresses():
    dist = profile_trace([7, 8, 9], enable_padding=True)  # largest distance 0: nothing to pad
    assert dist.distances.tolist() == [0] and dist.cdf.tolist() == [1.0]


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_profile_matches_plain_stack_walk(seed, padding):
    trace = random_trace(seed, 1500, 60, low=-20)
    new_lines, values, cdf = plain_profile(trace, padding)
    dist = profile_trace(np.array(trace), enable_padding=padding)
    assert dist.line_accesses.tolist() == new_lines
    assert dist.distances.tolist() == values
    assert dist.cdf.tolist() == cdf


def test_profile_empty_trace():
    with pytest.raises(DataError, match="empty trace"):
        profile_trace([])


# ------------------------------------------------------------------------------------------------
# Files


def test_example_files_parse(tmp_path):
    for text in (EXAMPLE_DIST_TEXT, EXAMPLE_DIST_TEXT.rstrip("\n")):
        path = tmp_path / "dist_emb_0.log"
        path.write_text(text)
        assert read_distribution(str(path)) == EXAMPLE_DIST
    trace_path = tmp_path / "trace.log"
    trace_path.write_text(EXAMPLE_TRACE_TEXT)
    assert read_trace(str(trace_path)) == EXAMPLE_TRACE


def test_written_format_is_the_reference_text(tmp_path):
    dist_path, trace_path = tmp_path / "dist.log", tmp_path / "trace.log"
    write_distribution(str(dist_path), EXAMPLE_DIST)
    write_trace(str(trace_path), np.array(EXAMPLE_TRACE))
    assert dist_path.read_text() == EXAMPLE_DIST_TEXT
    assert trace_path.read_text() == EXAMPLE_TRACE_TEXT + "\n"
    assert sorted(os.listdir(tmp_path)) == ["dist.log", "trace.log"]  # no temporary left over


def test_distribution_and_trace_round_trip(tmp_path):
    trace = random_trace(3, 800, 40, low=-5) + [2**40]
    dist = profile_trace(trace, enable_padding=True)
    write_distribution(str(tmp_path / "d.log"), dist)
    write_trace(str(tmp_path / "t.log"), trace)
    assert read_distribution(str(tmp_path / "d.log")) == dist  # floats survive exactly
    assert read_trace(str(tmp_path / "t.log")) == trace


def test_binary_trace_uint64(tmp_path):
    trace = [5, 2**63 + 7, 5, 2**64 - 1, 2**63 + 7]
    path = tmp_path / "trace.bin"
    np.array(trace, dtype="<u8").tofile(path)
    assert read_trace(str(path), binary=True) == trace
    dist = profile_trace(trace)
    assert dist.line_accesses.dtype == np.uint64
    assert dist.line_accesses.tolist() == [5, 2**63 + 7, 2**64 - 1]
    assert dist.distances.tolist() == [0, 2, 3]  # 5 reused at depth 2, 2**63+7 at depth 3
    synthetic = generate_lru_trace(np.random.RandomState(4), dist, 6)
    assert synthetic.dtype == np.uint64
    assert synthetic.tolist() == plain_lru(np.random.RandomState(4), dist, 6)
    path.write_bytes(b"\x00" * 12)
    with pytest.raises(DataError, match="not a multiple of 8"):
        read_trace(str(path), binary=True)


@pytest.mark.parametrize("text, message", [
    ("1, 2\n0, 1\n", r"bad\.log: expected 3 lines .* found 2"),
    ("1, 2\n0, x\n0.5, 1.0\n", r"bad\.log:2: bad value 'x' \(expected an integer distance\)"),
    ("1, 2\n0, 1\n0.5, one\n", r"bad\.log:3: bad value 'one'"),
    ("1, 2\n0, 1\n0.7, 0.5\n", r"bad\.log: cdf .* non-decreasing"),
    ("1, 2\n0, 1\n0.5, 0.9\n", r"bad\.log: cdf .* must end at 1\.0"),
    ("1, 2\n1, 2\n0.5, 1.0\n", r"bad\.log: distances .* start at 0"),
    ("1, 2\n0, 3\n0.5, 1.0\n", r"bad\.log: largest stack distance 3 exceeds the 2"),
    ("1, 2\n0, 1\n1.0\n", r"bad\.log: distances .* equal length, got 2 and 1"),
])
def test_bad_distribution_file(tmp_path, text, message):
    path = tmp_path / "bad.log"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_distribution(str(path))


def test_missing_and_bad_trace_files(tmp_path):
    with pytest.raises(DataError, match=r"missing\.log: no such file"):
        read_trace(str(tmp_path / "missing.log"))
    with pytest.raises(DataError, match=r"missing\.log: no such file"):
        read_distribution(str(tmp_path / "missing.log"))
    path = tmp_path / "t.log"
    path.write_text("1, 2\n3, 4.5\n")
    with pytest.raises(DataError, match=r"t\.log:2: bad value '4\.5'"):
        read_trace(str(path))
    path.write_text("\n")
    with pytest.raises(DataError, match=r"t\.log: holds no addresses"):
        read_trace(str(path))
    with pytest.raises(DataError, match=r"nodir.*cannot write"):
        write_trace(str(tmp_path / "nodir" / "x.log"), [1])


def test_distribution_paths_replace_the_last_j_of_the_file_name():
    assert distribution_paths("./input/dist_emb_j.log", 3) == [
        "./input/dist_emb_0.log", "./input/dist_emb_1.log", "./input/dist_emb_2.log"]
    # the reference also replaced the j of "joe"
    assert distribution_paths("/home/joe/dist_emb_j.log", 2) == [
        "/home/joe/dist_emb_0.log", "/home/joe/dist_emb_1.log"]
    assert distribution_paths("jj.log", 2) == ["j0.log", "j1.log"]
    assert distribution_paths("dist.log", 2) == ["dist.log", "dist.log"]


# ------------------------------------------------------------------------------------------------
# Generation


def _test_distributions():
    return [EXAMPLE_DIST, profile_trace(random_trace(5, 400, 30)),
            profile_trace(random_trace(6, 300, 12), enable_padding=True),
            TraceDistribution([4, 9], [0], [1.0])]


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("which", range(4))
def test_lru_trace_matches_plain(which, padding):
    dist = _test_distributions()[which]
    for seed, length in [(0, 1), (1, 7), (2, 60), (3, 500)]:
        rng, plain_rng = np.random.RandomState(seed), np.random.RandomState(seed)
        trace = generate_lru_trace(rng, dist, length, enable_padding=padding)
        assert trace.dtype == np.int64
        assert trace.tolist() == plain_lru(plain_rng, dist, length, padding)
        assert same_state(rng, plain_rng)


def test_lru_trace_zero_length_draws_nothing():
    rng = np.random.RandomState(9)
    assert generate_lru_trace(rng, EXAMPLE_DIST, 0).tolist() == []
    assert same_state(rng, np.random.RandomState(9))


def test_padding_stops_new_references():
    # once the new references reach the largest distance (5), padding never draws distance 0
    trace = generate_lru_trace(np.random.RandomState(0), EXAMPLE_DIST, 400, enable_padding=True)
    assert set(trace.tolist()) == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("round_targets", [False, True])
def test_synthetic_batch_matches_plain(fixed, padding, round_targets):
    dists = _test_distributions()[:3]
    table_sizes = [4, 50, 7]  # the example's addresses 4..6 and 7+ are out of range of table 0/2
    args = (5, 3, table_sizes, 4, fixed, dists, padding, round_targets)
    warnings = []
    rng, plain_rng = np.random.RandomState(17), np.random.RandomState(17)
    cfg = batch_config(3, table_sizes, 4, fixed, padding, round_targets)
    batch = generate_synthetic_batch(rng, 5, cfg, dists, warnings.append)
    dense, offsets, indices, labels, plain_warnings = plain_batch(plain_rng, *args)
    assert same_state(rng, plain_rng)
    assert batch.dense_x.dtype == torch.float32 and batch.dense_x.shape == (5, 3)
    assert batch.offsets.dtype == torch.int64 and batch.offsets.shape == (3, 5)
    assert batch.labels.dtype == torch.float32 and batch.labels.shape == (5, 1)
    assert np.array_equal(batch.dense_x.numpy(), dense)
    assert np.array_equal(batch.offsets.numpy(), offsets)
    assert np.array_equal(batch.labels.numpy(), labels)
    assert len(batch.indices) == 3
    for got, want, size in zip(batch.indices, indices, table_sizes):
        assert got.dtype == torch.int64 and np.array_equal(got.numpy(), want)
        assert int(got.min()) >= 0 and int(got.max()) < size
    assert plain_warnings > 0 and len(warnings) == plain_warnings
    assert all(w.startswith("WARNING: ") for w in warnings)


def test_synthetic_batch_negative_addresses_modulo():
    dist = TraceDistribution([-3, 12, -1], [0, 1], [0.5, 1.0])
    warnings = []
    batch = generate_synthetic_batch(np.random.RandomState(2), 3,
                                     batch_config(1, [5], 3, True, False, False), [dist],
                                     warnings.append)
    plain = plain_batch(np.random.RandomState(2), 3, 1, [5], 3, True, [dist], False, False)
    assert np.array_equal(batch.indices[0].numpy(), plain[2][0])
    assert set(batch.indices[0].tolist()) <= {2, 4}  # -3 % 5, 12 % 5, -1 % 5
    assert len(warnings) == 3  # one per bag


def test_synthetic_batch_config_errors():
    with pytest.raises(ConfigError, match="1 trace distributions for 2 tables"):
        generate_synthetic_batch(np.random.RandomState(0), 2,
                                 batch_config(3, [4, 4], 2, False, False, False), [EXAMPLE_DIST],
                                 lambda _: None)


# ------------------------------------------------------------------------------------------------
# Standalone tool


def _run_tool(tmp_path, *extra):
    return trace_main(["--trace-file", str(tmp_path / "trace.log"),
                       "--dist-file", str(tmp_path / "dist.log"),
                       "--synthetic-file", str(tmp_path / "synthetic.log"),
                       "--no-progress", *extra])


@pytest.mark.parametrize("padding", ["False", "true"])
def test_trace_main_end_to_end(tmp_path, capsys, padding):
    (tmp_path / "trace.log").write_text(EXAMPLE_TRACE_TEXT)
    assert _run_tool(tmp_path, "--trace-enable-padding", padding, "--numpy-rand-seed", "7") == 0
    pad = padding == "true"  # "False" must mean no padding (the reference's type=bool bug)
    dist = read_distribution(str(tmp_path / "dist.log"))
    assert dist == profile_trace(EXAMPLE_TRACE, enable_padding=pad)
    want = plain_lru(np.random.RandomState(7), dist, len(EXAMPLE_TRACE), pad)
    assert read_trace(str(tmp_path / "synthetic.log")) == want
    out = capsys.readouterr().out
    assert "profiled 11 accesses to 6 unique addresses" in out


def test_trace_main_binary_and_precision(tmp_path, capsys):
    np.array(EXAMPLE_TRACE, dtype="<u8").tofile(tmp_path / "trace.log")
    assert _run_tool(tmp_path, "--trace-file-binary-type", "1", "--print-precision", "2") == 0
    assert read_distribution(str(tmp_path / "dist.log")) == profile_trace(EXAMPLE_TRACE)
    assert "cdf: [0.55, 0.64, 0.82, 0.91, 1.  ]" in capsys.readouterr().out


def test_trace_main_missing_file(tmp_path, capsys):
    assert _run_tool(tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "trace.log: no such file" in err[0]
    assert not (tmp_path / "dist.log").exists()


def test_trace_main_bad_boolean(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        _run_tool(tmp_path, "--trace-enable-padding", "maybe")
    assert exit_info.value.code == 2


def test_synthetic_data_from_the_command_line(run_main, tmp_path):
    """--data-generation=synthetic is reachable (not in the reference)."""
    for t in range(3):
        (tmp_path / f"dist_emb_{t}.log").write_text("1, 2, 3, 4, 5, 6\n0, 1, 3, 4, 5\n0.55, 0.64, 0.82, 0.91, 1.0\n")
    code, out, err = run_main(*SMALL, "--data-generation=synthetic",
                              f"--data-trace-file={tmp_path}/dist_emb_j.log")
    assert code == 0, err
    assert out.count("Finished training it") == 3


def test_missing_trace_file_is_one_line_error(run_main, tmp_path):
    code, _, err = run_main(*SMALL, "--data-generation=synthetic", f"--data-trace-file={tmp_path}/none_j.log")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.slow
def test_trace_tool_runs_as_a_script(tmp_path):
    trace = tmp_path / "trace.log"
    trace.write_text("1, 2, 3, 4, 5, 3, 4, 1, 1, 6, 3\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dlrm_data_pytorch.py"), f"--trace-file={trace}",
                           f"--dist-file={tmp_path}/dist.log", f"--synthetic-file={tmp_path}/syn.log",
                           "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "dist.log").read_text().splitlines()[1] == "0, 1, 3, 4, 5"
    assert len((tmp_path / "syn.log").read_text().split(", ")) == 11
