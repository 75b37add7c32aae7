"""End to end: train from a raw Criteo Kaggle file through the command line."""
import errno
import os

import numpy as np
import pytest

from helpers.criteo import fake_kaggle_fixture

KAGGLE_MODEL = ["--arch-sparse-feature-size=4", "--arch-mlp-bot=13-8-4", "--arch-mlp-top=8-1",
                "--data-generation=dataset", "--data-set=kaggle", "--loss-function=bce", "--round-targets=True",
                "--learning-rate=0.1", "--mini-batch-size=64", "--print-freq=8", "--test-mini-batch-size=256",
                "--test-freq=16"]


raw_kaggle = fake_kaggle_fixture(3000, seed=3, directory="kaggle")


def _train(run_main, raw_kaggle, directory, memory_map, *extra):
    directory.mkdir(exist_ok=True)
    raw = directory / "train.txt"
    if not raw.exists():
        os.link(raw_kaggle, raw)
    flags = [f"--raw-data-file={raw}", f"--processed-data-file={directory}/kaggleAdDisplayChallenge_processed.npz"]
    flags += ["--memory-map"] if memory_map else []
    code, out, err = run_main(*KAGGLE_MODEL, *flags, *extra)
    assert code == 0, err
    return out, [line for line in out.splitlines() if line.startswith("Finished training it")]


@pytest.mark.parametrize("memory_map", [False, True])
def test_trains_from_a_raw_kaggle_file(run_main, raw_kaggle, tmp_path, memory_map):
    out, lines = _train(run_main, raw_kaggle, tmp_path / "a", memory_map)
    train_rows = sum(np.load(tmp_path / "a" / "train_day_count.npz")["total_per_file"][:6])
    assert lines[-1].startswith(f"Finished training it {-(-train_rows // 64)}/{-(-train_rows // 64)} of epoch 0")
    assert " accuracy " in out
    # data_utils.py writes uncompressed npz files: they are mapped in place, no row cache is written
    assert not [name for name in os.listdir(tmp_path / "a") if name.endswith(".rows.npy")]
    # A second run reuses the processed files. With memory-map, the first run's preprocessing drew the
    # shuffle from the run's stream before the model did, as in the reference, so the runs differ;
    # without it nothing was drawn and they print the same losses.
    _, again = _train(run_main, raw_kaggle, tmp_path / "a", memory_map)
    assert (again == lines) == (not memory_map)
    # With --fix-reference-bugs preprocessing has a stream of its own: every run trains like a later one.
    _, fixed_first = _train(run_main, raw_kaggle, tmp_path / "b", memory_map, "--fix-reference-bugs")
    _, fixed_again = _train(run_main, raw_kaggle, tmp_path / "b", memory_map, "--fix-reference-bugs")
    assert fixed_first == fixed_again == again


def test_missing_raw_file_is_one_line_error(run_main, tmp_path):
    code, _, err = run_main(*KAGGLE_MODEL, f"--raw-data-file={tmp_path}/train.txt")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "train.txt" in err


def test_full_disk_while_preprocessing_is_one_line_error(run_main, raw_kaggle, tmp_path, monkeypatch):
    from dlrm.io import npz as npz_io

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(npz_io, "_pwrite_all", full)
    os.link(raw_kaggle, tmp_path / "train.txt")
    code, _, err = run_main(*KAGGLE_MODEL, f"--raw-data-file={tmp_path / 'train.txt'}")
    # (progress bars go to stderr before it)
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1
    assert err.endswith(f"error: {tmp_path / 'train_day_0.npz'}: cannot write (No space left on device)\n")


def test_bad_id_in_a_file_from_elsewhere_is_one_line_error_before_training(run_main, tmp_path):
    gen = np.random.default_rng(0)
    n, counts = 700, np.full(26, 50, dtype=np.int32)
    x_cat = gen.integers(0, 50, (n, 26))
    x_cat[321, 7] = 50  # one past the end of table 8
    named = tmp_path / "from_elsewhere.npz"
    np.savez_compressed(named, X_cat=x_cat.astype(np.float64), X_int=gen.integers(0, 9, (n, 13)),
                        y=gen.integers(0, 2, n), counts=counts)
    np.savez_compressed(tmp_path / "train_day_count.npz", total_per_file=np.full(7, 100))
    code, out, err = run_main(*KAGGLE_MODEL, f"--raw-data-file={tmp_path / 'train.txt'}",
                              f"--processed-data-file={named}")
    assert code == 2 and "Finished training" not in out and err.count("error:") == 1
    assert err.endswith(f"error: {named}: row 321: sparse feature C8 has id 50, outside the 50 of "
                        "its table (the count stored with the data)\n")
