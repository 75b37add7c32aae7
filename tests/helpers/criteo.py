"""Fake raw Criteo data for the tests, from the product's one generator (:mod:`dlrm.data.criteo.fake`):
a fake Kaggle ``train.txt`` written at a path, or as a module-scoped fixture."""
from __future__ import annotations

from pathlib import Path

import pytest

from dlrm.data.criteo.fake import write_fake_kaggle, write_fake_terabyte

__all__ = ["fake_kaggle", "fake_kaggle_fixture", "write_fake_terabyte"]


def fake_kaggle(path, lines: int, seed: int) -> Path:
    """Write a fake Kaggle raw file of ``lines`` lines at ``path``; return its path."""
    write_fake_kaggle(str(path), lines, seed=seed)
    return Path(path)


def fake_kaggle_fixture(lines: int, seed: int, directory: str = "raw"):
    """A module-scoped fixture: the path of a fake ``train.txt`` (``lines`` lines drawn with
    ``seed``) in a directory of its own, written once per test module."""

    @pytest.fixture(scope="module")
    def raw_kaggle(tmp_path_factory) -> Path:
        return fake_kaggle(tmp_path_factory.mktemp(directory) / "train.txt", lines, seed)

    return raw_kaggle

