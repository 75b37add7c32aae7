"""Quotient-remainder embedding tables, used by ``--qr-flag`` for large tables.

Dimension vocabulary: B bags (samples), N indices in the batch, D embedding dimension,
n categories (logical rows), c collisions.

The reference computes the quotient as ``(index / c)`` in float32, truncated, which is wrong for
indices above 2**24, and initialises both tables from torch's RNG on U(sqrt(1/n), 1), one-sided
(it passes only the lower bound to ``uniform_``). Both are reproduced by default
(``exact_quotient=False``, :meth:`QREmbeddingBag.reference_init`), so the reference's numbers come
out; ``--fix-reference-bugs`` selects the integer quotient ``index // c`` and the symmetric
U(-sqrt(1/rows), sqrt(1/rows)) drawn from the run's NumPy stream (:meth:`reset_parameters`).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OPERATIONS = ("concat", "add", "mult")


def _dim_pair(embedding_dim: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """Read (quotient dim, remainder dim) from an int (used for both) or a pair."""
    if isinstance(embedding_dim, numbers.Integral):
        dims = (int(embedding_dim), int(embedding_dim))
    else:
        dims = tuple(int(d) for d in embedding_dim)
    if len(dims) != 2 or min(dims) < 1:
        raise ValueError(
            f"QREmbeddingBag: embedding_dim must be a positive int or a pair of them, "
            f"got {embedding_dim!r}"
        )
    return dims


class QREmbeddingBag(nn.Module):
    r"""An ``nn.EmbeddingBag`` of n rows stored as two small tables.

    Index i reads row ``i // c`` of the quotient table and row ``i % c`` of the remainder table.
    Each table is pooled over the bag exactly like ``nn.EmbeddingBag`` (same offsets, mode and
    per-sample weights); the two (B, d) results are combined by ``concat`` (B, d_q + d_r),
    ``add`` or ``mult`` (elementwise; needs d_q == d_r).

    Args:
        num_categories: n, the logical number of rows.
        embedding_dim: an int (both tables) or a pair (d_q, d_r).
        num_collisions: c, the divisor; also the remainder table's row count.
        operation: ``"concat"``, ``"add"`` or ``"mult"``. Default: ``"mult"``.
        mode: pooling, ``"sum"``, ``"mean"`` or ``"max"``. Default: ``"sum"``.
        sparse: sparse gradients for both tables. Default: ``True``.
        exact_quotient: integer quotient ``index // c``; ``False`` gives the reference's float32
            ``trunc(index / c)``, equal below 2**24. Default: ``True``.
        reference_init: initialise as the reference does (:meth:`reference_init`) instead of the
            symmetric draw from torch's RNG. Default: ``False``.

    Shape:
        - input: (N,) int64 indices with ``offsets`` (B,), or (B, bag) with ``offsets=None``.
        - per_sample_weights: like ``input``, float; ``mode="sum"`` only.
        - Output: (B, d_q + d_r) for concat, (B, d) otherwise (see ``output_dim``).

    Attributes:
        weight_q: (ceil(n / c), d_q) quotient table.
        weight_r: (c, d_r) remainder table.
            Both are initialised from U(-sqrt(1/rows), sqrt(1/rows)), rows being that table's own
            row count: from torch's RNG in the constructor, from a NumPy stream (quotient first)
            with ``reset_parameters(rng)``; :meth:`reference_init` draws the reference's values.
        output_dim: width of the forward's output.
    """

    def __init__(
        self,
        num_categories: int,
        embedding_dim: Union[int, Sequence[int]],
        num_collisions: int,
        operation: str = "mult",
        mode: str = "sum",
        sparse: bool = True,
        exact_quotient: bool = True,
        reference_init: bool = False,
    ) -> None:
        super().__init__()
        if operation not in OPERATIONS:
            raise ValueError(
                f"QREmbeddingBag: operation must be one of {', '.join(OPERATIONS)}, "
                f"got {operation!r}"
            )
        dim_q, dim_r = _dim_pair(embedding_dim)
        if operation != "concat" and dim_q != dim_r:
            raise ValueError(
                f"QREmbeddingBag: operation {operation!r} needs equal dims, got {dim_q} and {dim_r}"
            )
        if num_categories < 1 or num_collisions < 1:
            raise ValueError(
                f"QREmbeddingBag: num_categories and num_collisions must be >= 1, "
                f"got {num_categories} and {num_collisions}"
            )
        self.num_categories = num_categories
        self.num_collisions = num_collisions
        self.embedding_dim = (dim_q, dim_r)
        self.operation = operation
        self.mode = mode
        self.sparse = sparse
        self.exact_quotient = exact_quotient
        self.output_dim = dim_q + dim_r if operation == "concat" else dim_q
        num_quotients = -(-num_categories // num_collisions)  # ceil, in integers
        self.weight_q = nn.Parameter(torch.empty(num_quotients, dim_q))
        self.weight_r = nn.Parameter(torch.empty(num_collisions, dim_r))
        if reference_init:
            self.reference_init()
        else:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, rng: Optional[np.random.RandomState] = None) -> None:
        """Fill both tables from U(-sqrt(1/rows), sqrt(1/rows)), quotient table first.

        Args:
            rng: NumPy stream to draw from (float64 draws cast to float32); torch's RNG if None.
        """
        for weight in (self.weight_q, self.weight_r):
            bound = math.sqrt(1.0 / weight.shape[0])
            if rng is None:
                weight.uniform_(-bound, bound)
            else:
                values = rng.uniform(low=-bound, high=bound, size=tuple(weight.shape))
                weight.copy_(torch.from_numpy(values.astype(np.float32)))

    @torch.no_grad()
    def reference_init(self) -> None:
        """The reference's initialisation: both tables from torch's RNG on U(sqrt(1/n), 1), n being
        the number of categories, quotient table first."""
        low = math.sqrt(1.0 / self.num_categories)
        for weight in (self.weight_q, self.weight_r):
            weight.uniform_(low, 1.0)

    def forward(
        self,
        input: torch.Tensor,
        offsets: Optional[torch.Tensor] = None,
        per_sample_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Pool both tables over each bag and combine; returns (B, output_dim)."""
        if self.exact_quotient:
            quotients = torch.div(input, self.num_collisions, rounding_mode="floor")  # integer
        else:
            quotients = (input / self.num_collisions).long()  # float32, truncated, as the reference
        remainders = torch.remainder(input, self.num_collisions)
        pooled_q = self._pool(quotients, self.weight_q, offsets, per_sample_weights)  # (B, d_q)
        pooled_r = self._pool(remainders, self.weight_r, offsets, per_sample_weights)  # (B, d_r)
        if self.operation == "concat":
            return torch.cat((pooled_q, pooled_r), dim=1)  # (B, d_q + d_r)
        if self.operation == "add":
            return pooled_q + pooled_r
        return pooled_q * pooled_r

    def _pool(
        self,
        indices: torch.Tensor,
        weight: torch.Tensor,
        offsets: Optional[torch.Tensor],
        per_sample_weights: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """One ``embedding_bag`` lookup with this module's mode and sparsity."""
        return F.embedding_bag(
            indices,
            weight,
            offsets,
            mode=self.mode,
            sparse=self.sparse,
            per_sample_weights=per_sample_weights,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_categories}, {self.embedding_dim}, num_collisions={self.num_collisions}, "
            f"operation={self.operation!r}, mode={self.mode!r}, sparse={self.sparse}"
        )
