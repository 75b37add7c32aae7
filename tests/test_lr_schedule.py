"""Tests of the learning-rate policy (optim/lr_schedule): lr_at and LRPolicyScheduler."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import optim
from dlrm.optim.lr_schedule import LRPolicyScheduler, lr_at
from helpers.runs import SMALL

# Tables computed by hand from the reference's rule (base 1.0), steps 1..10.

LR_TABLES = {
    # (W, S, D): the reference raised AttributeError at step 1; here base until S.
    (0, 2, 2): [1.0, 1.0, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25],
    # Steps 3-4 hold the last warmup rate 2/3, as the reference does.
    (3, 5, 4): [1 / 3, 2 / 3, 2 / 3, 2 / 3, 1.0, 0.5625, 0.25, 0.0625, 0.0625, 0.0625],
    (2, 0, 0): [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    (0, 0, 0): [1.0] * 10,
    (2, 2, 1): [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    (1, 1, 3): [1.0, 4 / 9, 1 / 9, 1 / 9, 1 / 9, 1 / 9, 1 / 9, 1 / 9, 1 / 9, 1 / 9],
}
FIXED_TABLES = {**LR_TABLES, (3, 5, 4): [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 0.5625, 0.25, 0.0625, 0.0625, 0.0625]}


@pytest.mark.parametrize("schedule", sorted(LR_TABLES))
def test_lr_at_matches_hand_table(schedule):
    got = [lr_at(step, 1.0, *schedule) for step in range(1, 11)]
    assert got == pytest.approx(LR_TABLES[schedule], rel=1e-12, abs=0)
    fixed = [lr_at(step, 1.0, *schedule, reference_plateau=False) for step in range(1, 11)]
    assert fixed == pytest.approx(FIXED_TABLES[schedule], rel=1e-12, abs=0)


class ReferencePolicy:
    """The reference's rule, written plainly: a counter s from 1 and a remembered last rate.

    s < W: warmup, remembered; S <= s < S + D: decay, remembered; otherwise the remembered rate
    when D > 0 (the reference crashes when nothing was remembered yet) and the base rate when D == 0.
    """

    def __init__(self, base, W, S, D):
        self.base, self.W, self.S, self.D = base, W, S, D
        self.last = None

    def rate(self, s):
        if s < self.W:
            self.last = self.base * (1.0 - (self.W - s) / self.W)
            return self.last
        if self.S <= s < self.S + self.D:
            self.last = max(1e-7, self.base * ((self.D - (s - self.S)) / self.D) ** 2)
            return self.last
        if self.D > 0:
            if self.last is None:
                raise AttributeError("the reference crashes here")
            return self.last
        return self.base


@pytest.mark.parametrize("schedule", [(3, 5, 4), (4, 10, 3), (2, 3, 5), (5, 5, 2), (7, 20, 6), (2, 0, 0),
                                      (3, 3, 0), (1, 1, 3), (0, 0, 4)])
@pytest.mark.parametrize("base", [1.0, 0.1, 0.37])
def test_lr_at_is_the_reference_rule_bit_for_bit(schedule, base):
    """Every step's rate, with gaps between warmup and decay, equals the plain stateful rule."""
    reference = ReferencePolicy(base, *schedule)
    for step in range(1, 40):
        assert lr_at(step, base, *schedule) == reference.rate(step)


def test_lr_at_decay_floor():
    # base 1e-6 * (1/100)**2 = 1e-10 is below the floor 1e-7.
    assert lr_at(150, 1e-6, 0, 10, 100) == 1e-7
    assert lr_at(109, 1e-6, 0, 10, 100) == 1e-7
    assert lr_at(10, 1e-6, 0, 10, 100) == pytest.approx(1e-6)


def test_lr_at_warmup_uses_reference_rounding():
    # The reference writes base * (1 - (W - s) / W); base * s / W differs in the last bit here.
    assert lr_at(1, 0.1, 3, 3, 0) == 0.1 * (1 - (3 - 1) / 3)


@pytest.mark.parametrize("schedule", [(3, 5, 4), (0, 2, 2), (0, 0, 0)])
@pytest.mark.parametrize("reference", [True, False])
def test_scheduler_lr_used_by_each_optimizer_step(schedule, reference):
    """Two groups with their own base lr; SGD on loss = sum(p) moves p by exactly -lr each step."""
    fast, slow = nn.Parameter(torch.zeros(1, dtype=torch.float64)), nn.Parameter(
        torch.zeros(1, dtype=torch.float64))
    optimizer = torch.optim.SGD([{"params": [fast], "lr": 1.0}, {"params": [slow], "lr": 0.1}])
    scheduler = LRPolicyScheduler(optimizer, *schedule, reference_plateau=reference)
    table = LR_TABLES if reference else FIXED_TABLES
    for n in range(1, 11):
        seen = [group["lr"] for group in optimizer.param_groups]
        assert seen == [lr_at(n, 1.0, *schedule, reference), lr_at(n, 0.1, *schedule, reference)]
        before = fast.item()
        optimizer.zero_grad()
        (fast + slow).sum().backward()
        optimizer.step()
        scheduler.step()
        assert before - fast.item() == pytest.approx(table[schedule][n - 1], rel=1e-12)


def test_scheduler_state_dict_resumes_sequence():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = LRPolicyScheduler(optimizer, 3, 5, 4)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    saved = scheduler.state_dict()
    fresh_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = LRPolicyScheduler(fresh_optimizer, 3, 5, 4)
    resumed.load_state_dict(saved)
    fresh_optimizer.step()
    resumed.step()  # now ready for step 6
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(0.5625)


def test_scheduler_rejects_decay_before_warmup_end():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    message = "^Learning rate warmup must finish before the decay starts$"
    with pytest.raises(ValueError, match=message):
        LRPolicyScheduler(optimizer, 2, 1, 3)


def test_scheduler_allows_warmup_without_decay():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    seen = []
    scheduler = LRPolicyScheduler(optimizer, 2, 0, 0)
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == [0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("args, name", [((-1, 0, 0), "num_warmup_steps"),
                                        ((0, -1, 0), "decay_start_step"),
                                        ((0, 0, -2), "num_decay_steps")])
def test_scheduler_rejects_negative_values(args, name):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=f"{name} must be >= 0"):
        LRPolicyScheduler(optimizer, *args)


def test_the_reference_import_path_names_the_same_objects():
    assert (optim.LRPolicyScheduler, optim.lr_at) == (LRPolicyScheduler, lr_at)


def test_decay_without_warmup_runs(run_main):
    """The reference crashed with decay and no warmup."""
    code, out, err = run_main(*SMALL, "--lr-num-decay-steps=2", "--lr-decay-start-step=2")
    assert code == 0, err
    assert out.count("Finished training it") == 3
