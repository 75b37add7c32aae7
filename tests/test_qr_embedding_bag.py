"""Tests of the quotient-remainder tables (dlrm/model/qr_embedding_bag.py): QREmbeddingBag."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tricks
from dlrm.model.qr_embedding_bag import QREmbeddingBag
from helpers.bags import INDICES, OFFSETS, WEIGHTS, plain_bag_sum


def plain_qr(module, indices, offsets, weights=None):
    """QR lookup with Python-int quotient/remainder, then the module's combine operation."""
    c = module.num_collisions
    q_idx = torch.tensor([int(i) // c for i in indices.tolist()])
    r_idx = torch.tensor([int(i) % c for i in indices.tolist()])
    pooled_q = plain_bag_sum(module.weight_q.detach(), q_idx, offsets, weights)
    pooled_r = plain_bag_sum(module.weight_r.detach(), r_idx, offsets, weights)
    if module.operation == "concat":
        return torch.cat([pooled_q, pooled_r], dim=1)
    if module.operation == "add":
        return pooled_q + pooled_r
    return pooled_q * pooled_r


# ---------------------------------------------------------------------------------------------
# QREmbeddingBag


@pytest.mark.parametrize("operation", ["concat", "add", "mult"])
@pytest.mark.parametrize("weighted", [False, True])
def test_qr_forward_matches_plain_lookup(operation, weighted):
    torch.manual_seed(0)
    module = QREmbeddingBag(13, 3, 4, operation=operation)
    weights = WEIGHTS if weighted else None
    got = module(INDICES, OFFSETS, weights)
    expected = plain_qr(module, INDICES, OFFSETS, weights)
    assert got.shape == (4, module.output_dim)
    torch.testing.assert_close(got, expected)
    assert module.weight_q.shape == (4, 3)  # ceil(13 / 4)
    assert module.weight_r.shape == (4, 3)


def test_qr_concat_with_pair_of_dims():
    module = QREmbeddingBag(13, (2, 5), 3, operation="concat")
    assert module.weight_q.shape == (5, 2) and module.weight_r.shape == (3, 5)
    got = module(INDICES, OFFSETS)
    assert got.shape == (4, 7) and module.output_dim == 7
    torch.testing.assert_close(got, plain_qr(module, INDICES, OFFSETS))


def test_quotient_exact_above_2_pow_24():
    """float32 division maps 2**25 - 1 to quotient 4096 (the reference's bug); it is 4095."""
    c = 2**13
    module = QREmbeddingBag(2**25 + 3, 2, c, operation="add")
    indices = torch.tensor([2**25 - 1, 2**25 + 2, 2**24 + 1, 5])
    offsets = torch.tensor([0, 1, 2, 3])
    assert module.weight_q.shape == (4097, 2)
    got = module(indices, offsets)
    torch.testing.assert_close(got, plain_qr(module, indices, offsets), rtol=0, atol=0)
    expected_first = module.weight_q[4095] + module.weight_r[c - 1]
    torch.testing.assert_close(got[0], expected_first.detach(), rtol=0, atol=0)
    assert int((torch.tensor([2**25 - 1]) / c).long()) == 4096  # what float division gives


def test_reference_quotient_is_float32_division_truncated():
    """The reference's default: (index / c) in float32, truncated; 2**25 - 1 lands in quotient row 4096."""
    c = 2**13
    module = QREmbeddingBag(2**25 + 3, 2, c, operation="add", exact_quotient=False)
    indices = torch.tensor([2**25 - 1, 5, 2**13 * 7 + 3])
    got = module(indices, torch.tensor([0, 1, 2]))
    quotients = [4096, 0, 7]  # float32(33554431 / 8192) rounds up to 4096.0
    for b, (q, i) in enumerate(zip(quotients, indices.tolist())):
        torch.testing.assert_close(got[b], (module.weight_q[q] + module.weight_r[i % c]).detach(), rtol=0, atol=0)


def test_reference_init_is_one_sided_from_torch():
    """The reference draws both tables from torch's RNG on U(sqrt(1/n), 1), n the category count."""
    module = QREmbeddingBag(100, 4, 8)
    torch.manual_seed(9)
    module.reference_init()
    torch.manual_seed(9)
    low = math.sqrt(1 / 100)
    expected_q, expected_r = torch.empty(13, 4).uniform_(low, 1.0), torch.empty(8, 4).uniform_(low, 1.0)
    torch.testing.assert_close(module.weight_q.detach(), expected_q, rtol=0, atol=0)
    torch.testing.assert_close(module.weight_r.detach(), expected_r, rtol=0, atol=0)


def test_qr_two_dimensional_input_without_offsets():
    module = QREmbeddingBag(20, 2, 3, operation="mult")
    batch = torch.tensor([[1, 19], [4, 4]])
    expected = module(batch.reshape(-1), torch.tensor([0, 2]))
    torch.testing.assert_close(module(batch), expected)


@pytest.mark.parametrize("sparse", [True, False])
def test_qr_gradient_layout(sparse):
    module = QREmbeddingBag(13, 2, 4, operation="mult", sparse=sparse)
    module(INDICES, OFFSETS).sum().backward()
    assert module.weight_q.grad.is_sparse == sparse
    assert module.weight_r.grad.is_sparse == sparse


def test_qr_gradient_values_match_dense_autograd():
    torch.manual_seed(3)
    module = QREmbeddingBag(13, 2, 4, operation="mult")
    module(INDICES, OFFSETS, WEIGHTS).pow(2).sum().backward()
    weight_q = module.weight_q.detach().clone().requires_grad_()
    weight_r = module.weight_r.detach().clone().requires_grad_()
    pooled_q = plain_bag_sum(weight_q, INDICES // 4, OFFSETS, WEIGHTS)
    pooled_r = plain_bag_sum(weight_r, INDICES % 4, OFFSETS, WEIGHTS)
    (pooled_q * pooled_r).pow(2).sum().backward()
    torch.testing.assert_close(module.weight_q.grad.to_dense(), weight_q.grad)
    torch.testing.assert_close(module.weight_r.grad.to_dense(), weight_r.grad)


def test_fixed_init_is_symmetric_and_drawn_from_numpy_stream():
    module = QREmbeddingBag(100, 4, 8, operation="concat")
    module.reset_parameters(np.random.RandomState(7))
    rng = np.random.RandomState(7)
    bound_q, bound_r = math.sqrt(1 / 13), math.sqrt(1 / 8)  # ceil(100/8) = 13 quotient rows
    expected_q = rng.uniform(-bound_q, bound_q, (13, 4)).astype(np.float32)
    expected_r = rng.uniform(-bound_r, bound_r, (8, 4)).astype(np.float32)
    exact = dict(rtol=0, atol=0)
    torch.testing.assert_close(module.weight_q.detach(), torch.from_numpy(expected_q), **exact)
    torch.testing.assert_close(module.weight_r.detach(), torch.from_numpy(expected_r), **exact)


def test_torch_init_within_symmetric_bounds():
    torch.manual_seed(4)
    module = QREmbeddingBag(4000, 8, 40)
    for weight in (module.weight_q, module.weight_r):
        bound = math.sqrt(1 / weight.shape[0])
        assert weight.abs().max() <= bound
        assert weight.min() < 0  # the reference's U(sqrt(1/n), 1) is never negative


def test_qr_state_dict_keys():
    model = nn.ModuleDict({"0": QREmbeddingBag(10, 2, 3)})
    assert sorted(model.state_dict()) == ["0.weight_q", "0.weight_r"]


def test_qr_rejects_unknown_operation():
    with pytest.raises(ValueError, match="operation must be one of concat, add, mult, got 'sum'"):
        QREmbeddingBag(10, 2, 3, operation="sum")


@pytest.mark.parametrize("operation", ["add", "mult"])
def test_qr_rejects_unequal_dims_for_elementwise(operation):
    with pytest.raises(ValueError, match=f"operation '{operation}' needs equal dims, got 2 and 3"):
        QREmbeddingBag(10, (2, 3), 3, operation=operation)


def test_qr_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_collisions must be >= 1"):
        QREmbeddingBag(10, 2, 0)
    with pytest.raises(ValueError, match="embedding_dim must be a positive int or a pair"):
        QREmbeddingBag(10, (2, 3, 4), 3, operation="concat")


def test_the_reference_import_path_names_the_same_class():
    assert tricks.QREmbeddingBag is QREmbeddingBag
