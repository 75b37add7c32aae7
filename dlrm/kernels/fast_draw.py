r"""NumPy's legacy uniform draws written straight into float32 tensors: the same bits, faster.

``uniform_into(rng, out, low, high)`` fills ``out`` with exactly the values of
``rng.uniform(low, high, out.numel()).astype(np.float32)`` (in ``out``'s C order) and leaves ``rng``
exactly where that call leaves it. ``skip(rng, count)`` advances ``rng`` as
``rng.random_sample(count)`` does, without computing the values. Embedding tables are most of a
model's start-up (the timings are in ``bench/RESULTS.md``, "Whole runs").

How NumPy draws (``np.random.RandomState`` on MT19937; ``tests/test_fast_draw.py`` checks it bit for
bit): each double takes the next two tempered 32-bit outputs a, b as
``u = ((a >> 5) * 2**26 + (b >> 6)) / 2**53``, and ``uniform`` returns ``low + (high - low) * u``,
a rounded product then a rounded sum; the float32 cast rounds to nearest. The C++ kernel
(``csrc/mt19937_uniform.cpp``) takes the generator's 624-word key and position from
``rng.get_state()``, twists, tempers and converts with AVX2 (no fused multiply-add; a scalar path
elsewhere), and hands the new key and position back through ``rng.set_state()``. With two threads
one twists ahead while both convert.

Where the kernel cannot be built (no compiler), or for what it does not cover (small draws, a
generator other than a legacy MT19937 ``RandomState``, a non-finite range), NumPy draws the values
itself, in chunks: the same numbers, slower. ``$DLRM_FAST_DRAW_BACKEND=numpy`` forces that path.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import numpy as np
import torch

from dlrm.kernels import native_build

BACKEND_ENV = "DLRM_FAST_DRAW_BACKEND"
KERNEL_MIN_VALUES = 1 << 15
"""Smaller draws go to NumPy: reading and writing the generator's state costs tens of microseconds."""
_TWO_THREADS_MIN_VALUES = 1 << 16
_NUMPY_CHUNK = 1 << 16


def _load_extension() -> Tuple[object, str, float]:
    """Build or load the ``csrc/mt19937_uniform.cpp`` kernel, once per process.

    Returns (the module or None, why not, seconds taken)."""
    return native_build.load("dlrm_mt19937_uniform", "mt19937_uniform.cpp", "mt19937_uniform",
                             ("-O3", "-ffp-contract=off"), ("-pthread",))


def _kernel():
    """The extension module, or None when NumPy draws (forced by the environment, or no build)."""
    backend = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if backend not in ("auto", "cpp", "numpy"):
        raise ValueError(f"{BACKEND_ENV} must be one of auto, cpp, numpy, got {backend!r}")
    if backend == "numpy":
        return None
    module, reason, _ = _load_extension()
    if module is None and backend == "cpp":
        raise RuntimeError(f"fast_draw: the C++ kernel is not available ({reason})")
    return module


def fallback_note() -> Optional[str]:
    """One line saying that tables are drawn by NumPy because the kernel did not build; else None."""
    if os.environ.get(BACKEND_ENV, "").strip().lower() == "numpy":
        return None
    module, reason, _ = _load_extension()
    if module is not None:
        return None
    return f"note: drawing the tables with NumPy (same values, slower): the C++ kernel did not build ({reason})"


def _threads() -> int:
    return 2 if min(torch.get_num_threads(), os.cpu_count() or 1) >= 2 else 1


def _mt_state(rng) -> Optional[dict]:
    """Copy ``rng``'s state with a private, writable key; None when it is not a legacy MT19937."""
    if not isinstance(rng, np.random.RandomState):
        return None
    state = rng.get_state(legacy=False)
    if state.get("bit_generator") != "MT19937":
        return None
    inner = state["state"]
    inner["key"] = np.array(inner["key"], dtype=np.uint32, order="C", copy=True)
    return state


def _kernel_and_state(rng, values: int):
    module = _kernel() if values >= KERNEL_MIN_VALUES else None
    state = _mt_state(rng) if module is not None else None
    return (module, state) if state is not None else (None, None)


@torch.no_grad()
def uniform_into(rng: np.random.RandomState, out: torch.Tensor, low: float, high: float,
                 threads: Optional[int] = None) -> None:
    """Fill the float32 CPU tensor ``out`` with ``rng.uniform(low, high, out.numel())`` cast to
    float32, in C order, advancing ``rng`` exactly as that call does. ``threads`` (1 or 2; default
    2 where torch may use two cores) changes only the speed."""
    if out.dtype != torch.float32 or out.device.type != "cpu":
        raise TypeError("uniform_into: out must be a float32 CPU tensor")
    if not out.is_contiguous():
        staging = torch.empty(out.shape, dtype=torch.float32)
        uniform_into(rng, staging, low, high, threads)
        out.copy_(staging)
        return
    low, high = float(low), float(high)
    n = out.numel()
    module, state = _kernel_and_state(rng, n) if math.isfinite(high - low) else (None, None)
    if module is None:
        _numpy_uniform_into(rng, out, low, high)
        return
    threads = _threads() if threads is None else int(threads)
    threads = threads if n >= _TWO_THREADS_MIN_VALUES else 1
    inner = state["state"]
    inner["pos"] = module.fill_uniform(inner["key"].ctypes.data, int(inner["pos"]), out.data_ptr(), n, low,
                                       high - low, threads, True)
    rng.set_state(state)


def skip(rng: np.random.RandomState, count: int) -> None:
    """Advance ``rng`` as ``rng.random_sample(count)`` would, without the values (only the
    generator's blocks are twisted)."""
    if count < 0:
        raise ValueError("skip: count must be >= 0")
    module, state = _kernel_and_state(rng, count)
    if module is None:
        for start in range(0, count, 1 << 20):
            rng.random_sample(min(1 << 20, count - start))
        return
    inner = state["state"]
    inner["pos"] = module.skip_words(inner["key"].ctypes.data, int(inner["pos"]), 2 * int(count), True)
    rng.set_state(state)


def _numpy_uniform_into(rng, out: torch.Tensor, low: float, high: float) -> None:
    """NumPy's own draws, a chunk at a time (the same stream as one big draw, 8 bytes a value less)."""
    flat = out.numpy().reshape(-1)  # a view: ``out`` is contiguous here
    if flat.size == 0:
        rng.uniform(low, high, 0)  # NumPy's own checks (it raises on a non-finite range)
    for start in range(0, flat.size, _NUMPY_CHUNK):
        stop = min(flat.size, start + _NUMPY_CHUNK)
        flat[start:stop] = rng.uniform(low, high, stop - start)


def _fill_for_tests(rng: np.random.RandomState, out: torch.Tensor, low: float, high: float, *, threads: int,
                    vector: bool) -> None:
    """The kernel with its thread count and its vector path chosen (tests compare every combination)."""
    module = _load_extension()[0]
    state = _mt_state(rng)
    inner = state["state"]
    inner["pos"] = module.fill_uniform(inner["key"].ctypes.data, int(inner["pos"]), out.data_ptr(), out.numel(),
                                       float(low), float(high) - float(low), int(threads), bool(vector))
    rng.set_state(state)
