"""bench/sharding_runs.py and bench/sharding_accuracy.py on tiny sizes: the bytes they count are the
arithmetic's, and the planted labels are a fixed function of the line. No timing is asserted."""
import os
import re

import pytest

from bench import sharding_accuracy, sharding_runs
from dlrm.data.criteo.fake import write_fake_kaggle


@pytest.mark.slow  # starts torchrun
def test_the_traffic_bench_counts_the_all_to_all_bytes_of_the_arithmetic(capsys):
    batch, ranks, tables, dim = 64, 2, 26, 16
    assert sharding_runs.main(["traffic", "--ranks", str(ranks), "--rounds", "1", "--batches", "8", "--batch",
                               str(batch), "--cap", "100"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\| (fp32|bf16) \| .*? \| ([\d.]+) MiB \|", out, re.M))
    # forward and backward: every rank sends the other ranks' rows of its pieces, 416 columns in all
    fp32 = 2 * batch * (ranks - 1) // ranks * tables * dim * 4
    assert float(rows["fp32"]) == pytest.approx(fp32 / 2**20, abs=1e-3)
    assert float(rows["bf16"]) == pytest.approx(fp32 / 2 / 2**20, abs=1e-3)


def test_planted_labels_are_a_fixed_function_of_the_line(tmp_path):
    paths = [str(tmp_path / f"train{i}.txt") for i in range(2)]
    for path in paths:
        write_fake_kaggle(path, 3000, 0)
    shares = [sharding_accuracy.plant_labels(path, 5) for path in paths]
    lines = [open(path).read().splitlines() for path in paths]
    assert lines[0] == lines[1] and shares[0] == shares[1]
    assert 0.15 < shares[0] < 0.45  # about 30% positive (the fake data's own labels are replaced)
    labels = [int(line.split("\t")[0]) for line in lines[0]]
    assert sum(labels) / len(labels) == shares[0]
    assert not [p for p in os.listdir(tmp_path) if p not in ("train0.txt", "train1.txt")]  # no temporary left
