"""fast_draw against NumPy itself: every value bit for bit, and the generator's state after the call."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dlrm.kernels import fast_draw
from dlrm.model import dlrm as dlrm_model
from helpers.kernels import require_built
from helpers.rng import same_state


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    require_built(fast_draw._load_extension, "the C++ kernel")


def _generator(seed: int, consumed: int, gaussian: bool) -> np.random.RandomState:
    rng = np.random.RandomState(seed)
    rng.random_sample(consumed)  # start anywhere inside a 624-word block
    if gaussian:
        rng.normal()  # leaves one cached Gaussian, which uniform draws must not touch
    return rng


def _bits(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(np.uint32)


SIZES = [0, 1, 3, 311, 312, 313, 623, 624, 625, 1248, 2497, 99_991, 1 << 20]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("threads,vector", [(1, False), (1, True), (2, False), (2, True)])
def test_kernel_equals_numpy_bit_for_bit(n, threads, vector):
    for seed, consumed, gaussian in [(0, 0, False), (7, 1, True), (123, 311, False), (2**32 - 1, 624, True)]:
        expected_rng = _generator(seed, consumed, gaussian)
        bound = float(np.sqrt(1 / max(n, 1)))
        expected = expected_rng.uniform(-bound, bound, n).astype(np.float32)
        rng = _generator(seed, consumed, gaussian)
        out = torch.full((n,), float("nan"))
        fast_draw._fill_for_tests(rng, out, -bound, bound, threads=threads, vector=vector)
        assert np.array_equal(_bits(out.numpy()), _bits(expected)), (seed, consumed)
        assert same_state(rng, expected_rng), (seed, consumed)
        assert rng.normal() == expected_rng.normal()  # the cached Gaussian too


@pytest.mark.parametrize("low,high", [(-1e-3, 1e-3), (0.0, 1.0), (2.5, 1e6), (-7.0, -3.0), (1.0, 1.0)])
def test_uniform_into_any_bounds(low, high):
    rng, expected_rng = np.random.RandomState(5), np.random.RandomState(5)
    out = torch.empty(300, 257)
    fast_draw.uniform_into(rng, out, low, high)
    expected = expected_rng.uniform(low, high, (300, 257)).astype(np.float32)
    assert np.array_equal(_bits(out.numpy()), _bits(expected)) and same_state(rng, expected_rng)


def test_non_contiguous_output_is_filled_in_c_order():
    rng, expected_rng = np.random.RandomState(9), np.random.RandomState(9)
    buffer = torch.zeros(64, 2048)
    out = buffer[:, ::2]  # 64 x 1024, not contiguous
    fast_draw.uniform_into(rng, out, -0.5, 0.5)
    expected = expected_rng.uniform(-0.5, 0.5, (64, 1024)).astype(np.float32)
    assert np.array_equal(_bits(out.numpy()), _bits(expected)) and same_state(rng, expected_rng)
    assert not buffer[:, 1::2].any()  # nothing written between the strided columns


@pytest.mark.parametrize("count", [0, 1, 5, 312, 313, 40_000, 1_000_003])
def test_skip_moves_the_generator_as_random_sample(count):
    rng, expected_rng = _generator(11, 17, True), _generator(11, 17, True)
    fast_draw.skip(rng, count)
    expected_rng.random_sample(count)
    assert same_state(rng, expected_rng)


def test_numpy_path_gives_the_same_numbers(monkeypatch):
    out_kernel, out_numpy = torch.empty(1000, 64), torch.empty(1000, 64)
    rng_kernel, rng_numpy = np.random.RandomState(3), np.random.RandomState(3)
    fast_draw.uniform_into(rng_kernel, out_kernel, -0.03, 0.03)
    monkeypatch.setenv(fast_draw.BACKEND_ENV, "numpy")
    fast_draw.uniform_into(rng_numpy, out_numpy, -0.03, 0.03)
    assert torch.equal(out_kernel, out_numpy) and same_state(rng_kernel, rng_numpy)
    assert fast_draw.fallback_note() is None  # chosen, so nothing to say


def test_a_missing_compiler_draws_the_same_tables_and_says_so_once(monkeypatch):
    lines = []
    cfg = dlrm_model.ModelConfig(table_sizes=(5000, 7, 3000), embedding_dim=16, bottom_mlp=(4, 16),
                                 top_mlp=(64, 1), interaction="cat")
    with_kernel = dlrm_model.DLRM(cfg, np.random.RandomState(1))
    monkeypatch.setattr(fast_draw, "_load_extension", lambda: (None, "OSError: no compiler", 0.0))
    without = dlrm_model.DLRM(cfg, np.random.RandomState(1), log=lines.append)
    for name, value in with_kernel.state_dict().items():
        assert torch.equal(value, without.state_dict()[name]), name
    assert lines == ["note: drawing the tables with NumPy (same values, slower): the C++ kernel did not build "
                     "(OSError: no compiler)"]
