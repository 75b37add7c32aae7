"""Tests of the mixed-dimension tables (dlrm/model/md_embedding_bag.py): md_solver and PrEmbeddingBag."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tricks
from dlrm.model.md_embedding_bag import PrEmbeddingBag, md_solver
from helpers.bags import INDICES, OFFSETS, WEIGHTS, plain_bag_sum

# ---------------------------------------------------------------------------------------------
# md_solver. Hand computations:
#   n = [1000, 10, 100], alpha 0.5, d0 8: sorted [10, 100, 1000], lam = 8 * sqrt(10);
#   d = lam / sqrt(n) = [8, 2.53, 0.8] -> [8, 3, 1] (clamp), unsorted [1, 8, 3];
#   powers of two: 3 -> 2**round(1.58) = 4, so [1, 8, 4].
#   n = [4, 16], alpha 0.5, B 48: lam = 48 / (2 + 4) = 8; d = [8/2, 8/4] = [4, 2].
#   n = [300, 20, 5000, 20], alpha 0.3, d0 16: lam = 16 * 20**0.3 = 39.30;
#   d = [39.30 * 300**-0.3, 16, 39.30 * 5000**-0.3, 16] = [7.10, 16, 3.05, 16] -> [7, 16, 3, 16];
#   powers of two: 7 -> 2**round(2.81) = 8, 3 -> 4, so [8, 16, 4, 16].
MD_CASES = [
    (dict(n=[1000, 10, 100], alpha=0.5, d0=8, round_dim=False), [1, 8, 3]),
    (dict(n=[1000, 10, 100], alpha=0.5, d0=8, round_dim=True), [1, 8, 4]),
    (dict(n=[4, 16], alpha=0.5, B=48, round_dim=False), [4, 2]),
    (dict(n=[300, 20, 5000, 20], alpha=0.3, d0=16, round_dim=False), [7, 16, 3, 16]),
    (dict(n=[300, 20, 5000, 20], alpha=0.3, d0=16), [8, 16, 4, 16]),
    (dict(n=[7, 70000], alpha=0.0, d0=4), [4, 4]),
    # k divides n: n/k = [100, 100] -> both at d0.
    (dict(n=[100, 400], alpha=0.5, d0=6, round_dim=False, k=[1, 4]), [6, 6]),
]


@pytest.mark.parametrize("kwargs, expected", MD_CASES)
def test_md_solver_hand_computed(kwargs, expected):
    assert md_solver(**kwargs) == expected


@pytest.mark.parametrize("round_dim", [False, True])
def test_md_solver_returns_python_ints(round_dim):
    dims = md_solver([50, 5000, 500000], 0.3, d0=16, round_dim=round_dim)
    assert all(type(d) is int for d in dims)
    if round_dim:
        assert all(d & (d - 1) == 0 for d in dims)


def test_md_solver_needs_d0_or_budget():
    with pytest.raises(ValueError, match=r"give d0 \(smallest table's dim\) or B"):
        md_solver([10, 20], 0.3)


def test_md_solver_rejects_mismatched_k():
    with pytest.raises(ValueError, match="k must hold one positive value per table"):
        md_solver([10, 20], 0.3, d0=4, k=[1])


# ---------------------------------------------------------------------------------------------
# PrEmbeddingBag


@pytest.mark.parametrize("weighted", [False, True])
def test_pr_forward_is_bag_sum_then_projection(weighted):
    torch.manual_seed(5)
    module = PrEmbeddingBag(13, 2, 5)
    weights = WEIGHTS if weighted else None
    got = module(INDICES, OFFSETS, weights)
    pooled = plain_bag_sum(module.embs.weight.detach(), INDICES, OFFSETS, weights)  # (B, 2)
    expected = pooled @ module.proj.weight.detach().T  # (B, 5)
    assert got.shape == (4, 5)
    torch.testing.assert_close(got, expected)


def test_pr_equal_dims_use_identity_and_keys():
    module = PrEmbeddingBag(13, 4, 4)
    assert isinstance(module.proj, nn.Identity)
    torch.testing.assert_close(module(INDICES, OFFSETS),
                               plain_bag_sum(module.embs.weight.detach(), INDICES, OFFSETS))
    assert sorted(PrEmbeddingBag(13, 2, 4).state_dict()) == ["embs.weight", "proj.weight"]
    assert sorted(module.state_dict()) == ["embs.weight"]


def test_pr_rejects_dim_above_base():
    with pytest.raises(ValueError, match="embedding_dim 8 is larger than base_dim 4"):
        PrEmbeddingBag(10, 8, 4)


def test_pr_numpy_init_and_sparse_gradient():
    module = PrEmbeddingBag(13, 2, 3)
    proj_before = module.proj.weight.detach().clone()
    module.reset_parameters(np.random.RandomState(11))
    bound = math.sqrt(1 / 13)
    expected = np.random.RandomState(11).uniform(-bound, bound, (13, 2)).astype(np.float32)
    torch.testing.assert_close(module.embs.weight.detach(), torch.from_numpy(expected),
                               rtol=0, atol=0)
    torch.testing.assert_close(module.proj.weight.detach(), proj_before, rtol=0, atol=0)
    module(INDICES, OFFSETS).sum().backward()
    assert module.embs.weight.grad.is_sparse
    assert not module.proj.weight.grad.is_sparse


def test_pr_torch_init_is_xavier_bounded():
    torch.manual_seed(6)
    module = PrEmbeddingBag(50, 4, 8)
    assert module.embs.weight.abs().max() <= math.sqrt(6 / (50 + 4))
    assert module.proj.weight.abs().max() <= math.sqrt(6 / (4 + 8))


def test_the_reference_import_path_names_the_same_objects():
    assert (tricks.PrEmbeddingBag, tricks.md_solver) == (PrEmbeddingBag, md_solver)
