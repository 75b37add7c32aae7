"""Plain SGD that applies sparse (embedding-table) updates on several threads.

``torch.optim.SGD`` without momentum or weight decay updates each parameter with
``param.add_(grad, alpha=-lr)``. For a sparse gradient that is a serial scatter-add of every
looked-up row into a large table: bound by memory latency, not arithmetic, and run on one core.
This optimizer issues exactly the same ``add_`` calls, so the results are bit-identical, but spreads
the sparse ones over a small thread pool (torch releases the GIL inside the op). Tables are
independent, so the order of additions within each table is unchanged.

It is a ``torch.optim.SGD`` subclass: its state dict is SGD's, so checkpoints move freely between
the two (and to and from the reference). With momentum, dampening, weight decay, nesterov or
maximize set it simply defers to ``torch.optim.SGD.step``.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional

import torch


class SparseParallelSGD(torch.optim.SGD):
    """``torch.optim.SGD(params, lr)`` with sparse updates spread over ``threads`` threads.

    Args:
        params: parameters or parameter groups, as for torch.optim.SGD.
        lr: learning rate.
        threads: threads for the sparse updates (1: same as torch.optim.SGD, serially).
    """

    def __init__(self, params, lr: float = 1e-3, threads: int = 2, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        self.threads = max(1, int(threads))
        self._pool: Optional[ThreadPoolExecutor] = None

    def _plain(self, group) -> bool:
        return (group["momentum"] == 0 and group["weight_decay"] == 0 and not group["nesterov"]
                and not group["maximize"] and group["dampening"] == 0)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        if not all(self._plain(g) for g in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sparse: List = []
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse and self.threads > 1:
                    sparse.append((p, lr))
                else:
                    p.add_(p.grad, alpha=-lr)
        if sparse:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="sparse-sgd")
            for future in [self._pool.submit(_apply, p, lr) for p, lr in sparse]:
                future.result()
        return loss

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_pool", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("threads", 2)
        self._pool = None


@torch.no_grad()
def _apply(p: torch.Tensor, lr: float) -> None:
    p.add_(p.grad, alpha=-lr)
