"""Build and load the project's small C++ kernels (``csrc/*.cpp``) once per machine.

Each kernel is compiled on first use with ``torch.utils.cpp_extension.load`` into
``$DLRM_EXTENSIONS_DIR`` (else ``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/dlrm_extensions``), in one
folder per Python and torch version, and loaded from there afterwards. A build that fails (no
compiler, no ninja) is not an error: :func:`load` returns the reason, and the caller takes its
pure-torch or NumPy path, which gives the same numbers.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from typing import Optional, Sequence, Tuple

import torch

EXTENSIONS_DIR_ENV = "DLRM_EXTENSIONS_DIR"
SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


def build_dir(folder: str) -> str:
    """Where the kernel built into ``folder`` is cached (one parent per Python and torch version)."""
    root = os.environ.get(EXTENSIONS_DIR_ENV) or os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        root = os.path.join(os.path.expanduser("~"), ".cache", "dlrm_extensions")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    return os.path.join(root, tag, folder)


@functools.lru_cache(maxsize=None)
def load(name: str, source: str, folder: str, cflags: Sequence[str] = ("-O3",),
         ldflags: Sequence[str] = ()) -> Tuple[Optional[object], str, float]:
    """Compile (first time) and import ``csrc/<source>`` as module ``name``.

    Returns (the module or None, why not, seconds taken). Cached: one attempt per process, so a
    missing compiler costs its failure once. ``cflags`` and ``ldflags`` must be tuples.
    """
    start = time.perf_counter()
    try:
        from torch.utils import cpp_extension

        directory = build_dir(folder)
        os.makedirs(directory, exist_ok=True)
        module = cpp_extension.load(name=name, sources=[os.path.join(SOURCE_DIR, source)],
                                    extra_cflags=list(cflags), extra_ldflags=list(ldflags),
                                    build_directory=directory, verbose=False)
    except Exception as error:  # no compiler, no ninja, a failed build: all mean "take the other path"
        reason = str(error).strip().splitlines()
        return None, f"{type(error).__name__}: {reason[-1] if reason else ''}", time.perf_counter() - start
    return module, "", time.perf_counter() - start
