"""Comparisons of NumPy generators."""
import numpy as np


def same_state(rng_a: np.random.RandomState, rng_b: np.random.RandomState) -> bool:
    """True when the two generators will draw the same numbers (the same words, position and cached Gaussian)."""
    a, b = rng_a.get_state(), rng_b.get_state()
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]
