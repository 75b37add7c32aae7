"""Rounding-error bounds for comparing float32 results that sum in different orders.

A float sum of n terms, evaluated in any order, is within gamma_n = n*u / (1 - n*u) of the exact sum,
relative to the sum of the terms' magnitudes (Higham, *Accuracy and Stability of Numerical
Algorithms*, §3.1). So a matrix product evaluated by any kernel, blocked or vectorised in any way,
satisfies |fl(A @ B) - A @ B| <= gamma_K * (|A| @ |B|) element by element, where K is the inner
dimension. These bounds hold on every CPU, whatever its GEMM kernels do; the exact values they are
measured against are computed in float64, whose own error (u = 2**-53) is far below them.
"""
from __future__ import annotations

import torch

FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24


def gamma(n: int, u: float = FLOAT32_UNIT_ROUNDOFF) -> float:
    """gamma_n = n*u / (1 - n*u): the relative error bound of a sum (or dot product) of n terms."""
    return n * u / (1 - n * u)


def fp32_reorder_bound(n: int, step: int, magnitude: float) -> float:
    """How far two float32 evaluations of the same training steps may drift apart when only the
    order of their sums differs: 2 * gamma_N * s * M.

    Two orders of one sum of N terms are within 2*gamma_N of each other, relative to the sum of the
    terms' magnitudes. A step's sums are at most N long (``dist_steps.longest_sum(config)``, or the
    rows a batch's bags look up), and each of the s steps' errors adds to the earlier ones (first
    order: the small learning rates keep the amplification of earlier differences well below 2). M
    is the largest magnitude of the parameter tensor, which bounds the terms' scale after the
    updates are applied.
    """
    return 2 * gamma(n) * step * magnitude


def matmul_bound(a: torch.Tensor, b: torch.Tensor, extra_terms: int = 0) -> torch.Tensor:
    """(M, N) float64 bound on the rounding error of the float32 product of a (M, K) and b (K, N),
    in any summation order; ``extra_terms`` counts further terms added to each sum (a bias)."""
    return gamma(a.shape[-1] + extra_terms) * (a.double().abs() @ b.double().abs())


def assert_within(actual: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str = "") -> None:
    """Assert |actual - exact| <= bound element by element, naming the worst element."""
    actual, exact, bound = actual.detach(), exact.detach(), bound.detach()
    excess = (actual.double() - exact.double()).abs() - bound.double()
    if excess.numel() and float(excess.max()) > 0:
        worst = int(excess.argmax())
        flat_a, flat_e, flat_b = actual.reshape(-1), exact.reshape(-1), bound.reshape(-1)
        raise AssertionError(f"{what}: element {worst}: {float(flat_a[worst])!r} differs from the exact "
                             f"{float(flat_e[worst])!r} by more than the bound {float(flat_b[worst]):.3g}")
