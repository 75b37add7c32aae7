"""Mixed-dimension embeddings, used by ``--md-flag``: a power rule picks a smaller
dimension for larger tables, and a projection brings every table back to a common width.

Dimension vocabulary: B bags (samples), N indices in the batch, n rows of a table, d that table's
dimension, D the common (base) dimension.

``md_solver`` always returns Python ints, with ``round_dim`` too, as the table constructors need.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn


def md_solver(
    n: Sequence[int],
    alpha: float,
    d0: Optional[int] = None,
    B: Optional[float] = None,
    round_dim: bool = True,
    k: Optional[Sequence[float]] = None,
) -> List[int]:
    """Embedding dimension of each table from the power rule ``d_i = lam * (n_i / k_i) ** -alpha``.

    Tables are sorted by size (ascending, stable) and the rule is applied to n/k. With ``d0``,
    ``lam = d0 * (n/k)_0 ** alpha``, (n/k)_0 being that of the smallest table, whose dim is then
    set to ``d0`` exactly; otherwise ``lam = B / sum((n/k) ** (1 - alpha))`` (a total budget).
    Every other dim is clamped to >= 1 and rounded to the nearest integer (ties to even); with
    ``round_dim`` each dim d then becomes ``2 ** round(log2 d)``. The result is in input order.

    Args:
        n: rows of each table.
        alpha: the temperature (``--md-temperature``); 0 gives every table the same dim.
        d0: dimension of the smallest table (the reference passes ``--arch-sparse-feature-size``).
        B: total dimension budget, used only when ``d0`` is None.
        round_dim: round each dim to a power of two. Default: ``True``.
        k: per-table divisors of n (default all ones).

    Returns:
        One positive Python int per table.

    Example: ``md_solver([1000, 10, 100], 0.5, d0=8, round_dim=False) == [1, 8, 3]``.
    """
    sizes = np.asarray(n, dtype=np.float64)
    divisors = np.ones_like(sizes) if k is None else np.asarray(k, dtype=np.float64)
    _check_solver_args(sizes, divisors, d0, B)
    order = np.argsort(sizes, kind="stable")
    scaled = sizes[order] / divisors[order]  # ascending by table size
    if d0 is not None:
        lam = d0 * scaled[0] ** alpha
    else:
        lam = B / np.sum(scaled ** (1.0 - alpha))
    dims = np.maximum(lam * scaled ** (-alpha), 1.0)
    if d0 is not None:
        dims[0] = d0
    dims = np.round(dims)
    if round_dim:
        dims = 2.0 ** np.round(np.log2(dims))
    result = [0] * len(dims)
    for position, table in enumerate(order):
        result[int(table)] = int(dims[position])
    return result


def _check_solver_args(
    sizes: np.ndarray, divisors: np.ndarray, d0: Optional[int], B: Optional[float]
) -> None:
    """Raise ValueError for inputs the power rule cannot use."""
    if sizes.ndim != 1 or sizes.size == 0 or np.any(sizes < 1):
        raise ValueError(f"md_solver: n must be a non-empty list of sizes >= 1, got {sizes}")
    if divisors.shape != sizes.shape or np.any(divisors <= 0):
        raise ValueError(f"md_solver: k must hold one positive value per table, got {divisors}")
    if d0 is None and B is None:
        raise ValueError("md_solver: give d0 (smallest table's dim) or B (total budget)")
    if d0 is not None and d0 < 1:
        raise ValueError(f"md_solver: d0 must be >= 1, got {d0}")
    if d0 is None and not B > 0:
        raise ValueError(f"md_solver: B must be > 0, got {B}")


class PrEmbeddingBag(nn.Module):
    r"""A sum-pooled ``nn.EmbeddingBag`` of dim d followed by a bias-free projection to D.

    Args:
        num_embeddings: n, rows of the table.
        embedding_dim: d, this table's dimension.
        base_dim: D, the output width (the largest dim over all tables); must be >= d.

    Shape:
        - input: (N,) int64 indices with ``offsets`` (B,), or (B, bag) with ``offsets=None``.
        - per_sample_weights: like ``input``, float.
        - Output: (B, D).

    Attributes:
        embs: ``nn.EmbeddingBag(n, d, mode="sum", sparse=True)``; weight (n, d), xavier-uniform
            from torch's RNG in the constructor; ``reset_parameters(rng)`` replaces it with
            U(-sqrt(1/n), sqrt(1/n)) from the run's NumPy stream (what the reference model does).
        proj: ``nn.Linear(d, D, bias=False)``, weight (D, d), xavier-uniform from torch's RNG;
            ``nn.Identity()`` when d == D.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, base_dim: int) -> None:
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(
                f"PrEmbeddingBag: num_embeddings and embedding_dim must be >= 1, "
                f"got {num_embeddings} and {embedding_dim}"
            )
        if embedding_dim > base_dim:
            raise ValueError(
                f"PrEmbeddingBag: embedding_dim {embedding_dim} is larger than base_dim {base_dim}"
            )
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.base_dim = base_dim
        # torch-RNG order as in the reference: table (its default init), xavier, projection
        # (its default init), xavier. Later tables' torch draws depend on it.
        self.embs = nn.EmbeddingBag(num_embeddings, embedding_dim, mode="sum", sparse=True)
        nn.init.xavier_uniform_(self.embs.weight)
        if embedding_dim < base_dim:
            self.proj: nn.Module = nn.Linear(embedding_dim, base_dim, bias=False)
            nn.init.xavier_uniform_(self.proj.weight)
        else:
            self.proj = nn.Identity()

    @torch.no_grad()
    def reset_parameters(self, rng: Optional[np.random.RandomState] = None) -> None:
        """Re-initialise the table (and, without ``rng``, the projection).

        Args:
            rng: NumPy stream: the table becomes ``rng.uniform(-sqrt(1/n), sqrt(1/n), (n, d))``
                cast to float32 and the projection is left as it is. If None, both get a fresh
                xavier-uniform init from torch's RNG.
        """
        if rng is None:
            nn.init.xavier_uniform_(self.embs.weight)
            if isinstance(self.proj, nn.Linear):
                nn.init.xavier_uniform_(self.proj.weight)
            return
        bound = math.sqrt(1.0 / self.num_embeddings)
        values = rng.uniform(low=-bound, high=bound, size=(self.num_embeddings, self.embedding_dim))
        self.embs.weight.copy_(torch.from_numpy(values.astype(np.float32)))

    def forward(
        self,
        input: torch.Tensor,
        offsets: Optional[torch.Tensor] = None,
        per_sample_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Pool the bag, then project; returns (B, base_dim)."""
        pooled = self.embs(input, offsets, per_sample_weights)  # (B, d)
        return self.proj(pooled)  # (B, D)
