"""Row-wise sparse Adagrad, the optimizer behind ``--optimizer=rwsadagrad``.

Dimension vocabulary: R rows of an embedding table, D embedding dimension, K rows touched by one
sparse gradient (after coalescing).

State is created the first time a parameter has a gradient, not only at the very first ``step()``,
so a table unused in step 1 is handled later; the accumulator lives on the parameter's device with
its dtype; dense weight decay is ``grad.add(param, alpha=weight_decay)``.

Like the reference, the first step after ``load_state_dict`` starts afresh every accumulator it
updates (the reference created its accumulators at the first step of each optimizer object, so a
loaded one was overwritten); ``reference_reload=False`` keeps the loaded accumulators instead.
State dicts hold a row-wise accumulator under the reference's key, ``momentum`` (dense ones under
``sum``); ``load_state_dict`` takes either key.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch


class RWSAdagrad(torch.optim.Optimizer):
    r"""Adagrad with one accumulator per row for sparse gradients, plain Adagrad for dense ones.

    For a parameter whose gradient is sparse (an ``nn.EmbeddingBag(sparse=True)`` table), the
    gradient is coalesced and, for every touched row r with gradient row g_r (D values)::

        acc[r] += mean(g_r ** 2)                      # one scalar per row
        w[r]   -= clr * g_r / (sqrt(acc[r]) + eps)

    For a dense gradient g it is standard Adagrad (``torch.optim.Adagrad``'s formula)::

        g   = g + weight_decay * w                    # only when weight_decay > 0
        acc += g ** 2                                 # same shape as w
        w  -= clr * g / (sqrt(acc) + eps)

    with ``clr = lr / (1 + (step - 1) * lr_decay)`` and ``step`` the number of updates this
    parameter has received so far, counting the current one.

    Args:
        params: parameters or parameter groups.
        lr: learning rate. Default: ``1e-2``.
        lr_decay: learning-rate decay per step. Default: ``0``.
        weight_decay: L2 penalty, dense gradients only. Default: ``0``.
        initial_accumulator_value: starting value of every accumulator. Default: ``0``.
        eps: added to the square root for stability. Default: ``1e-10``.
        reference_reload: after ``load_state_dict``, the first step resets the accumulators of the
            parameters it updates to ``initial_accumulator_value``, as the reference does (the step
            counts are kept). ``False`` keeps the loaded accumulators. Default: ``True``.
        whole_row_squares: for tables split by columns over several processes,
            ``whole_row_squares(param, squares)`` turns the squared gradient values of the touched
            rows of ``param``'s columns, (K, w), into those of the whole rows, (K, D), so that every
            piece takes the whole row's mean, as one process does. Default: the squares as they are.

    State (per parameter, created at its first gradient):
        ``step`` (int): number of updates so far.
        ``sum`` (Tensor): the accumulator, shape (R,) for a parameter whose gradients are sparse
        (row-wise), the parameter's shape otherwise; on the parameter's device and dtype.

    Raises:
        ValueError: a negative argument (the message names it); a sparse gradient with
            ``weight_decay > 0``; a parameter whose gradient switches between sparse and dense.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        reference_reload: bool = True,
        whole_row_squares: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
        )
        for name, value in defaults.items():
            if not value >= 0.0:
                raise ValueError(f"RWSAdagrad: invalid {name} {value!r} (must be >= 0)")
        super().__init__(params, defaults)
        self.reference_reload = reference_reload
        self.reset_pending = False  # a loaded state whose accumulators the next step drops
        self.whole_row_squares = whole_row_squares

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """Update every parameter that has a gradient; return the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._state_for(param, group)
                if self.reset_pending:
                    state["sum"].fill_(group["initial_accumulator_value"])
                state["step"] += 1
                clr = group["lr"] / (1.0 + (state["step"] - 1) * group["lr_decay"])
                if param.grad.is_sparse:
                    _row_wise_update(param, param.grad, state["sum"], clr, group, self.whole_row_squares)
                else:
                    _dense_update(param, param.grad, state["sum"], clr, group)
        self.reset_pending = False
        return loss

    def state_dict(self) -> dict:
        """Return torch's state dict, with each row-wise accumulator under the reference's key ``momentum``."""
        saved = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in saved["state"].items():
            if "sum" in entry and entry["sum"].shape != params[index].shape:
                saved["state"][index] = {k if k != "sum" else "momentum": v for k, v in entry.items()}
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of ours or of the reference (row-wise accumulators under ``momentum``)."""
        renamed = {index: {k if k != "momentum" else "sum": v for k, v in entry.items()}
                   if isinstance(entry, dict) else entry for index, entry in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": renamed})
        self.reset_pending = self.reference_reload

    def _state_for(self, param: torch.Tensor, group: dict) -> dict:
        """Return the state of ``param``, creating it now if this is its first gradient."""
        state = self.state[param]
        row_wise = param.grad.is_sparse
        shape = torch.Size([param.shape[0]]) if row_wise else param.shape
        if len(state) == 0:
            state["step"] = 0
            state["sum"] = torch.full(
                shape,
                group["initial_accumulator_value"],
                dtype=param.dtype,
                device=param.device,
            )
        elif state["sum"].shape != shape:
            kind = "sparse" if row_wise else "dense"
            raise ValueError(
                f"RWSAdagrad: a parameter of shape {tuple(param.shape)} got a {kind} gradient, "
                f"but its accumulator has shape {tuple(state['sum'].shape)} from gradients of "
                f"the other kind"
            )
        return state


def _row_wise_update(
    param: torch.Tensor, grad: torch.Tensor, acc: torch.Tensor, clr: float, group: dict,
    whole_row_squares: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
) -> None:
    """Row-wise Adagrad step, in place.

    Args:
        param: (R, D...) the table.
        grad: sparse COO gradient with one sparse dimension (rows), possibly uncoalesced.
        acc: (R,) per-row accumulator.
        clr: the learning rate of this step.
        group: the parameter group (for ``eps`` and ``weight_decay``).
        whole_row_squares: see :class:`RWSAdagrad`.
    """
    if group["weight_decay"] != 0:
        raise ValueError("RWSAdagrad: weight_decay is not supported with sparse gradients")
    if grad.sparse_dim() != 1:
        raise ValueError(
            f"RWSAdagrad: row-wise update needs a sparse gradient over rows only, "
            f"got {grad.sparse_dim()} sparse dimensions"
        )
    grad = grad.coalesce()
    rows = grad.indices()[0]  # (K,) unique after coalesce
    values = grad.values()  # (K, D...)
    squares = values.pow(2).reshape(rows.numel(), -1)  # (K, D)
    if whole_row_squares is not None:
        squares = whole_row_squares(param, squares)
    row_mean_sq = squares.mean(dim=1)  # (K,)
    acc.index_add_(0, rows, row_mean_sq.to(acc.dtype))
    std = acc.index_select(0, rows).sqrt_().add_(group["eps"])  # (K,)
    std = std.view(-1, *([1] * (values.dim() - 1)))  # (K, 1...)
    param.index_add_(0, rows, (values / std).to(param.dtype), alpha=-clr)


def _dense_update(
    param: torch.Tensor, grad: torch.Tensor, acc: torch.Tensor, clr: float, group: dict
) -> None:
    """Standard Adagrad step, in place; ``acc`` has the shape of ``param``."""
    if group["weight_decay"] != 0:
        grad = grad.add(param, alpha=group["weight_decay"])
    acc.addcmul_(grad, grad, value=1.0)
    std = acc.sqrt().add_(group["eps"])
    param.addcdiv_(grad, std, value=-clr)
