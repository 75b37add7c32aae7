"""Shared builders for the tests."""
import numpy as np
import pytest

import dlrm_s_pytorch
from dlrm_model import ModelConfig


@pytest.fixture
def run_main(capsys):
    """Run ``dlrm_s_pytorch.main(argv)`` in-process; returns (exit code, stdout, stderr)."""

    def _run(*argv):
        code = dlrm_s_pytorch.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def tiny_model_config(**overrides):
    """The reference's default model: tables 4-3-2, dim 2, bottom 4-3-2, top (8)-4-2-1."""
    base = dict(embedding_dim=2, table_sizes=(4, 3, 2), bottom_mlp=(4, 3, 2), top_mlp=(8, 4, 2, 1))
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def rng():
    return np.random.RandomState(123)
