"""The learning-rate policy of ``--lr-num-warmup-steps``, ``--lr-decay-start-step`` and
``--lr-num-decay-steps``: linear warmup, a plateau, then a quadratic polynomial decay.

Between the end of warmup and the start of decay, the reference keeps the last warmup rate,
``base * (W - 1) / W``, instead of the base rate (when decay is configured). That is the default
here, so the reference's numbers come out; ``--fix-reference-bugs`` runs the plateau at the base
rate. When decay is configured without warmup, the plateau runs at the base rate in both modes
(the reference crashed there).
"""
from __future__ import annotations

from typing import List

import torch

from dlrm.common import FlagError

MIN_DECAYED_LR = 1e-7
"""Floor of the decayed learning rate (the reference's constant)."""


def lr_at(
    step: int, base_lr: float, num_warmup_steps: int, decay_start_step: int, num_decay_steps: int,
    reference_plateau: bool = True,
) -> float:
    """Learning rate of the ``step``-th optimizer step (steps count from 1).

    With W = ``num_warmup_steps``, S = ``decay_start_step``, D = ``num_decay_steps``, E = S + D:

    * step < W:            ``base_lr * (1 - (W - step) / W)``, i.e. ``base_lr * step / W``
    * S <= step < E:       ``max(1e-7, base_lr * ((D - (step - S)) / D) ** 2)``
    * step >= E and D > 0: the last decayed value, ``max(1e-7, base_lr * (1 / D) ** 2)``
    * W <= step < S, D > 0 and ``reference_plateau`` and W > 1: the last warmup value,
      ``base_lr * (1 - 1 / W)``
    * otherwise:           ``base_lr``

    Example: W=3, S=5, D=4, base 1.0 gives 1/3, 2/3, 2/3, 2/3, 1, 0.5625, 0.25, 0.0625, 0.0625, ...;
    without ``reference_plateau`` steps 3 and 4 run at 1.
    """
    decay_end = decay_start_step + num_decay_steps
    if step < num_warmup_steps:
        # Written as the reference writes it, so the float rounding matches too.
        return base_lr * (1.0 - (num_warmup_steps - step) / num_warmup_steps)
    if decay_start_step <= step < decay_end:
        remaining = (num_decay_steps - (step - decay_start_step)) / num_decay_steps
        return max(MIN_DECAYED_LR, base_lr * remaining**2)
    if step >= decay_end and num_decay_steps > 0:
        return max(MIN_DECAYED_LR, base_lr * (1.0 / num_decay_steps) ** 2)
    if num_decay_steps > 0 and reference_plateau and num_warmup_steps > 1:
        return lr_at(num_warmup_steps - 1, base_lr, num_warmup_steps, decay_start_step, num_decay_steps)
    return base_lr


def check_schedule(num_warmup_steps: int, decay_start_step: int, num_decay_steps: int) -> None:
    """Raise FlagError, naming the field, for a step count below zero or a decay that starts before
    the warmup ends."""
    for field, steps in (("lr_num_warmup_steps", num_warmup_steps), ("lr_decay_start_step", decay_start_step),
                         ("lr_num_decay_steps", num_decay_steps)):
        if steps < 0:
            raise FlagError(f"{{{field}}} must not be negative")
    if num_decay_steps > 0 and decay_start_step < num_warmup_steps:
        raise FlagError("Learning rate warmup must finish before the decay starts "
                        "({lr_decay_start_step} < {lr_num_warmup_steps})")


class LRPolicyScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Warmup / constant / polynomial-decay schedule; see :func:`lr_at` for the formula.

    Call ``scheduler.step()`` after every ``optimizer.step()``. torch's base constructor performs
    the initial step, so the n-th optimizer step (n = 1, 2, ...) runs at
    ``lr_at(n, base, ...)``; every parameter group keeps its own base rate (its ``initial_lr``).

    Args:
        optimizer: the optimizer whose ``param_groups[i]["lr"]`` this sets.
        num_warmup_steps: W, steps of linear warmup (``--lr-num-warmup-steps``).
        decay_start_step: S, first step of the decay (``--lr-decay-start-step``); must be >= W when D > 0.
        num_decay_steps: D, length of the decay (``--lr-num-decay-steps``); 0 means no decay.
        reference_plateau: between warmup and decay, hold the last warmup rate as the reference
            does (see :func:`lr_at`); ``False`` runs at the base rate.

    Raises:
        ValueError: a negative argument, or S < W with D > 0 ("Learning rate warmup must finish
            before the decay starts", the reference's message; the reference also refused S < W
            without any decay, which made warmup alone impossible).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_warmup_steps: int,
        decay_start_step: int,
        num_decay_steps: int,
        reference_plateau: bool = True,
    ) -> None:
        for name, value in (
            ("num_warmup_steps", num_warmup_steps),
            ("decay_start_step", decay_start_step),
            ("num_decay_steps", num_decay_steps),
        ):
            if value < 0:
                raise ValueError(f"LRPolicyScheduler: {name} must be >= 0, got {value}")
        if num_decay_steps > 0 and decay_start_step < num_warmup_steps:
            raise ValueError("Learning rate warmup must finish before the decay starts")
        self.num_warmup_steps = num_warmup_steps
        self.decay_start_step = decay_start_step
        self.num_decay_steps = num_decay_steps
        self.reference_plateau = reference_plateau
        super().__init__(optimizer)

    def get_lr(self) -> List[float]:
        """Rates for the coming optimizer step, one per parameter group."""
        step = self.last_epoch + 1  # equals self._step_count: 1 right after construction
        return [
            lr_at(step, base, self.num_warmup_steps, self.decay_start_step, self.num_decay_steps,
                  self.reference_plateau)
            for base in self.base_lrs
        ]
