"""Tests of the row-wise sparse Adagrad (optim/rwsadagrad): RWSAdagrad against plain loops."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import optim
from dlrm.optim.rwsadagrad import RWSAdagrad

# ---------------------------------------------------------------------------------------------
# Plain implementations written for the tests (float64, one row / one element at a time).


class PlainRowWiseAdagrad:
    """Row-wise Adagrad for one (R, D) table, a Python loop over rows, state made at first grad."""

    def __init__(self, weight, lr, lr_decay, init_acc, eps):
        self.weight = np.array(weight, dtype=np.float64)
        self.lr, self.lr_decay, self.init_acc, self.eps = lr, lr_decay, init_acc, eps
        self.acc = None
        self.step_count = 0

    def step(self, rows, values):
        """rows: list of row ids (repeats allowed); values: (K, D) gradient rows; None = no grad."""
        if rows is None:
            return
        if self.acc is None:
            self.acc = [self.init_acc] * self.weight.shape[0]
        self.step_count += 1
        clr = self.lr / (1 + (self.step_count - 1) * self.lr_decay)
        summed = {}
        for row, value in zip(rows, np.asarray(values, dtype=np.float64)):
            summed[row] = summed.get(row, 0.0) + value
        for row, grad_row in summed.items():
            self.acc[row] += sum(g * g for g in grad_row) / len(grad_row)
            std = math.sqrt(self.acc[row]) + self.eps
            for col, g in enumerate(grad_row):
                self.weight[row, col] -= clr * g / std


def plain_dense_adagrad(weight, grads, lr, lr_decay, weight_decay, init_acc, eps):
    """Adagrad on a 1-D float64 vector, element by element; ``grads`` holds one grad per step."""
    weight = [float(w) for w in weight]
    acc = [init_acc] * len(weight)
    for step, grad in enumerate(grads, start=1):
        clr = lr / (1 + (step - 1) * lr_decay)
        for i, g in enumerate(grad):
            g = g + weight_decay * weight[i]
            acc[i] += g * g
            weight[i] -= clr * g / (math.sqrt(acc[i]) + eps)
    return np.array(weight)


def sparse_grad(rows, values, num_rows):
    """An uncoalesced sparse COO gradient for a (num_rows, D) table."""
    values = torch.tensor(values, dtype=torch.float32)
    indices = torch.tensor([rows], dtype=torch.int64)
    return torch.sparse_coo_tensor(indices, values, (num_rows, values.shape[1]),
                                   check_invariants=True)


# ---------------------------------------------------------------------------------------------
# RWSAdagrad

# Per step: (rows, values) of table A, of table B (None: no gradient that step).
STEPS = [
    (([0, 2, 0], [[1.0, -2.0], [0.5, 0.5], [3.0, 1.0]]), None),
    (([2, 3], [[-1.0, 4.0], [2.0, 2.0]]), ([1, 1, 0], [[0.3, -0.1], [0.2, 0.6], [1.0, 1.0]])),
    (([3, 3, 3, 0], [[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-2.0, 0.5]]), ([0], [[-1.0, 2.0]])),
]


def test_row_wise_matches_plain_loop_with_late_first_gradient():
    """Table B has no grad on step 1 (the reference then raised KeyError on step 2)."""
    torch.manual_seed(0)
    table_a = nn.Parameter(torch.randn(4, 2))
    table_b = nn.Parameter(torch.randn(3, 2))
    hyper = dict(lr=0.1, lr_decay=0.25, initial_accumulator_value=0.05, eps=1e-10)
    optimizer = RWSAdagrad([table_a, table_b], **hyper)
    plain_a = PlainRowWiseAdagrad(table_a.detach().numpy(), 0.1, 0.25, 0.05, 1e-10)
    plain_b = PlainRowWiseAdagrad(table_b.detach().numpy(), 0.1, 0.25, 0.05, 1e-10)
    for grad_a, grad_b in STEPS:
        table_a.grad = sparse_grad(*grad_a, 4)
        table_b.grad = None if grad_b is None else sparse_grad(*grad_b, 3)
        optimizer.step()
        plain_a.step(*grad_a)
        plain_b.step(*(grad_b or (None, None)))
    torch.testing.assert_close(table_a.detach().double(), torch.from_numpy(plain_a.weight))
    torch.testing.assert_close(table_b.detach().double(), torch.from_numpy(plain_b.weight))
    assert optimizer.state[table_a]["step"] == 3
    assert optimizer.state[table_b]["step"] == 2
    assert optimizer.state[table_b]["sum"].shape == (3,)


def test_row_wise_with_embedding_bag_autograd_gradients():
    """Real EmbeddingBag sparse grads (rows repeated in and across bags) give the same update."""
    torch.manual_seed(1)
    table = nn.EmbeddingBag(5, 3, mode="sum", sparse=True)
    plain = PlainRowWiseAdagrad(table.weight.detach().numpy(), 0.2, 0.0, 0.0, 1e-10)
    optimizer = RWSAdagrad(table.parameters(), lr=0.2)
    #   bag:      0         1        2
    #   rows:  [1, 1, 4]   [4]     [0, 1]
    indices = torch.tensor([1, 1, 4, 4, 0, 1])
    offsets = torch.tensor([0, 3, 4])
    coef = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0], [-2.0, 1.0, 1.0]])  # (B, D)
    bag_of = [0, 0, 0, 1, 2, 2]
    for _ in range(3):
        optimizer.zero_grad()
        (table(indices, offsets) * coef).sum().backward()
        assert table.weight.grad.is_sparse
        optimizer.step()
        plain.step(indices.tolist(), coef[bag_of].numpy())
    torch.testing.assert_close(table.weight.detach().double(), torch.from_numpy(plain.weight))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_dense_matches_plain_loop_and_torch_adagrad(weight_decay):
    hyper = dict(lr=0.3, lr_decay=0.1, weight_decay=weight_decay, initial_accumulator_value=0.2,
                 eps=1e-10)
    start = torch.tensor([0.5, -1.0, 2.0, 0.0])
    grads = [torch.tensor(g) for g in ([1.0, 2.0, -3.0, 0.5], [0.0, -1.0, 1.0, 2.0],
                                       [4.0, 0.5, 0.5, -1.0])]
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    opt_ours, opt_theirs = RWSAdagrad([ours], **hyper), torch.optim.Adagrad([theirs], **hyper)
    for grad in grads:
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_theirs.step()
    expected = plain_dense_adagrad(start.tolist(), [g.tolist() for g in grads], 0.3, 0.1,
                                   weight_decay, 0.2, 1e-10)
    torch.testing.assert_close(ours.detach().double(), torch.from_numpy(expected))
    torch.testing.assert_close(ours.detach(), theirs.detach())


def test_accumulator_follows_parameter_dtype():
    table = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    dense = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = RWSAdagrad([table, dense])
    table.grad = sparse_grad([1], [[1.0, 1.0]], 3).double()
    dense.grad = torch.ones(2, dtype=torch.float64)
    optimizer.step()
    assert optimizer.state[table]["sum"].dtype == torch.float64
    assert optimizer.state[table]["sum"].device == table.device
    assert optimizer.state[dense]["sum"].shape == (2,)
    torch.testing.assert_close(optimizer.state[table]["sum"],
                               torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def test_state_dict_round_trip_continues_identically(tmp_path):
    """Save after step 1 (only table A has state), load into a fresh optimizer that keeps the loaded
    accumulators, run steps 2-3."""
    torch.manual_seed(2)
    first = [nn.Parameter(torch.randn(4, 2)), nn.Parameter(torch.randn(3, 2))]
    opt_first = RWSAdagrad(first, lr=0.1, lr_decay=0.5)
    first[0].grad = sparse_grad(*STEPS[0][0], 4)
    opt_first.step()
    torch.save(opt_first.state_dict(), tmp_path / "opt.pt")
    second = [nn.Parameter(p.detach().clone()) for p in first]
    opt_second = RWSAdagrad(second, lr=0.1, lr_decay=0.5, reference_reload=False)
    opt_second.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for grad_a, grad_b in STEPS[1:]:
        for params, opt in ((first, opt_first), (second, opt_second)):
            params[0].grad = sparse_grad(*grad_a, 4)
            params[1].grad = sparse_grad(*grad_b, 3)
            opt.step()
    for mine, loaded in zip(first, second):
        torch.testing.assert_close(mine, loaded, rtol=0, atol=0)
    assert opt_second.state[second[0]]["step"] == 3
    assert opt_second.state[second[1]]["step"] == 2


def _set_grads(params, step):
    for param, grad, rows in zip(params, step, (4, 3)):
        param.grad = None if grad is None else sparse_grad(*grad, rows)


def test_after_loading_the_first_step_drops_the_accumulators_as_the_reference():
    """By default the first step after load_state_dict starts every accumulator it updates afresh
    (the step counts stay): the plain loop with its accumulators reset at that step, once."""
    torch.manual_seed(2)
    hyper = dict(lr=0.1, lr_decay=0.5, initial_accumulator_value=0.05, eps=1e-10)
    first = [nn.Parameter(torch.randn(4, 2)), nn.Parameter(torch.randn(3, 2))]
    plain = [PlainRowWiseAdagrad(p.detach().numpy(), 0.1, 0.5, 0.05, 1e-10) for p in first]
    opt_first = RWSAdagrad(first, **hyper)
    for step in STEPS[:2]:
        _set_grads(first, step)
        opt_first.step()
        for table, grad in zip(plain, step):
            table.step(*(grad or (None, None)))
    second = [nn.Parameter(p.detach().clone()) for p in first]
    opt_second = RWSAdagrad(second, **hyper)
    opt_second.load_state_dict(opt_first.state_dict())
    for table in plain:
        table.acc = [0.05] * len(table.acc)
    for step in (STEPS[2], STEPS[1]):  # the second step after loading accumulates again
        _set_grads(second, step)
        opt_second.step()
        for table, grad in zip(plain, step):
            table.step(*grad)
    for param, table in zip(second, plain):
        torch.testing.assert_close(param.detach().double(), torch.from_numpy(table.weight))
    assert [opt_second.state[p]["step"] for p in second] == [4, 3]


def test_state_dicts_hold_row_wise_accumulators_under_the_reference_key():
    """A table's accumulator is saved as ``momentum`` (the reference's key), a dense one as ``sum``;
    either loads back."""
    table, dense = nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(2))
    optimizer = RWSAdagrad([table, dense])
    table.grad, dense.grad = sparse_grad([1], [[1.0, 3.0]], 3), torch.tensor([2.0, 0.0])
    optimizer.step()
    saved = optimizer.state_dict()
    assert sorted(saved["state"][0]) == ["momentum", "step"] and sorted(saved["state"][1]) == ["step", "sum"]
    torch.testing.assert_close(saved["state"][0]["momentum"], torch.tensor([0.0, 5.0, 0.0]))
    assert "sum" in optimizer.state[table]  # saving renamed nothing in the live state
    loaded = RWSAdagrad([nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(2))], reference_reload=False)
    loaded.load_state_dict(saved)
    for mine, theirs in zip(optimizer.state.values(), loaded.state.values()):
        assert sorted(theirs) == ["step", "sum"]
        torch.testing.assert_close(mine["sum"], theirs["sum"])


def test_sparse_gradient_with_weight_decay_raises():
    table = nn.Parameter(torch.zeros(3, 2))
    optimizer = RWSAdagrad([table], weight_decay=0.01)
    table.grad = sparse_grad([0], [[1.0, 1.0]], 3)
    with pytest.raises(ValueError, match="weight_decay is not supported with sparse gradients"):
        optimizer.step()


def test_gradient_kind_switch_raises():
    table = nn.Parameter(torch.zeros(3, 2))
    optimizer = RWSAdagrad([table])
    table.grad = sparse_grad([0], [[1.0, 1.0]], 3)
    optimizer.step()
    table.grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"got a dense gradient, but its accumulator has shape"):
        optimizer.step()


@pytest.mark.parametrize("name", ["lr", "lr_decay", "weight_decay", "initial_accumulator_value",
                                  "eps"])
def test_negative_argument_is_named(name):
    with pytest.raises(ValueError, match=f"invalid {name} -1"):
        RWSAdagrad([nn.Parameter(torch.zeros(1))], **{name: -1.0})


def test_closure_loss_is_returned():
    param = nn.Parameter(torch.tensor([1.0]))
    optimizer = RWSAdagrad([param], lr=0.5)

    def closure():
        optimizer.zero_grad()
        loss = (param * 3.0).sum()
        loss.backward()
        return loss

    assert optimizer.step(closure).item() == 3.0
    # One Adagrad step from acc=0: p -= lr * g / |g| = 1 - 0.5.
    torch.testing.assert_close(param.detach(), torch.tensor([0.5]))


def test_the_reference_import_path_names_the_same_class():
    assert optim.RWSAdagrad is RWSAdagrad
