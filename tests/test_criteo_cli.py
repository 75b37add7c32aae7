"""End to end: train from a raw Criteo Kaggle file through the command line."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from make_fake_criteo import write_fake_kaggle  # noqa: E402

KAGGLE_MODEL = ["--arch-sparse-feature-size=4", "--arch-mlp-bot=13-8-4", "--arch-mlp-top=8-1",
                "--data-generation=dataset", "--data-set=kaggle", "--loss-function=bce", "--round-targets=True",
                "--learning-rate=0.1", "--mini-batch-size=64", "--print-freq=8", "--test-mini-batch-size=256",
                "--test-freq=16"]


@pytest.fixture(scope="module")
def raw_kaggle(tmp_path_factory):
    path = tmp_path_factory.mktemp("kaggle") / "train.txt"
    write_fake_kaggle(str(path), 3000, seed=3)
    return path


@pytest.mark.parametrize("memory_map", [False, True])
def test_trains_from_a_raw_kaggle_file(run_main, raw_kaggle, tmp_path, memory_map):
    raw = tmp_path / "train.txt"
    os.link(raw_kaggle, raw)
    flags = [f"--raw-data-file={raw}", f"--processed-data-file={tmp_path}/kaggleAdDisplayChallenge_processed.npz"]
    flags += ["--memory-map"] if memory_map else []
    code, out, err = run_main(*KAGGLE_MODEL, *flags)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("Finished training it")]
    train_rows = sum(np.load(tmp_path / "train_day_count.npz")["total_per_file"][:6])
    assert lines[-1].startswith(f"Finished training it {-(-train_rows // 64)}/{-(-train_rows // 64)} of epoch 0")
    assert " accuracy " in out
    # data_utils.py writes uncompressed npz files: they are mapped in place, no row cache is written
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".rows.npy")]
    # A second run reuses the processed files and prints the same losses, also with memory-map, whose
    # preprocessing draws (the shuffle) happen on the first run only: they have their own stream.
    code, again, err = run_main(*KAGGLE_MODEL, *flags)
    assert code == 0, err
    assert [line for line in again.splitlines() if line.startswith("Finished")] == lines


def test_missing_raw_file_is_one_line_error(run_main, tmp_path):
    code, _, err = run_main(*KAGGLE_MODEL, f"--raw-data-file={tmp_path}/train.txt")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "train.txt" in err
