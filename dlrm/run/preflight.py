"""Will the run fit? The memory a model and one batch need, against what this machine has, checked
before any table is built.

The estimate counts what grows with the flags: the tables (and their optimizer state), the MLPs, and
one training batch with its activations and embedding gradients. It leaves out the Python and torch
runtime (a few hundred MiB) and memory-mapped data, which the kernel pages in and out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from dlrm.common import ConfigError
from dlrm.model.dlrm import ModelConfig, table_dims

FLOAT = 4
INDEX = 8


@dataclass(frozen=True)
class BatchShape:
    """What one batch holds: B samples, up to ``bag`` indices per table and sample."""

    batch_size: int
    bag: int
    test_batch_size: int


def _table_values(cfg: ModelConfig) -> int:
    """Values in all tables, as built (quotient-remainder and mixed-dimension tables are smaller)."""
    total = 0
    dims = table_dims(cfg)
    for rows, dim in zip(cfg.table_sizes, dims):
        if cfg.qr_flag and rows > cfg.qr_threshold:
            total += (-(-rows // cfg.qr_collisions) + cfg.qr_collisions) * dim
        else:
            total += rows * dim
            if cfg.md_flag and rows > cfg.md_threshold and dim < max(dims):
                total += dim * max(dims)
    return total


def _mlp_values(widths: Sequence[int]) -> int:
    return sum(n_in * n_out + n_out for n_in, n_out in zip(widths[:-1], widths[1:]))


def estimate_bytes(cfg: ModelConfig, optimizer: Optional[str], shape: BatchShape,
                   world_size: int = 1, cache_bytes: Optional[int] = None) -> Dict[str, int]:
    """Bytes per process by part: tables (this rank's shard), optimizer state, MLPs, one batch.

    Optimizer state: none for SGD, one value per parameter for Adagrad, one per table row (and one
    per MLP value) for the row-wise Adagrad; ``optimizer`` None means inference (no state).
    ``cache_bytes``: the tables are in files, and the cache of their rows (weights and state) takes
    this much, plus a slot number per row (counted as 8 bytes; 4 below 2**31 slots).
    """
    tables = _table_values(cfg) * FLOAT // max(world_size, 1)
    mlps = (_mlp_values(cfg.bottom_mlp) + _mlp_values(cfg.top_mlp)) * FLOAT
    state = {None: 0, "sgd": 0, "adagrad": tables + mlps,
             "rwsadagrad": sum(cfg.table_sizes) * FLOAT // max(world_size, 1) + mlps}[optimizer]
    if cache_bytes is not None:
        state = mlps if optimizer in ("adagrad", "rwsadagrad") else 0
        tables = cache_bytes + sum(cfg.table_sizes) * INDEX
    b = max(shape.batch_size, shape.test_batch_size)
    lookups = b * cfg.num_tables * max(1, shape.bag)
    widths = sum(cfg.bottom_mlp) + sum(cfg.top_mlp) + (cfg.num_tables + 1) ** 2
    batch = (lookups * (INDEX + cfg.embedding_dim * FLOAT)  # indices, and one gradient row per lookup
             + b * cfg.num_tables * (INDEX + cfg.embedding_dim * FLOAT)  # offsets, pooled rows
             + 3 * b * widths * FLOAT)  # activations, their gradients, the dense input
    return {"tables": tables, "optimizer state": state, "MLPs": mlps, "one batch": batch}


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory this process may still use: the GPU's free memory, or the smaller of /proc/meminfo's
    MemAvailable and the cgroup's limit minus its usage. None where neither can be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    candidates = [_meminfo_available(), _cgroup_available()]
    known = [c for c in candidates if c is not None]
    return min(known) if known else None


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> Optional[int]:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(0, int(limit) - usage)
    return None


def human(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_memory(cfg: ModelConfig, optimizer: Optional[str], shape: BatchShape, device: torch.device,
                 processes_here: int = 1, world_size: int = 1, cache_bytes: Optional[int] = None) -> Dict[str, int]:
    """Raise ConfigError, giving both figures, when the estimate exceeds what is available to each
    of the ``processes_here`` processes sharing this machine; returns the estimate. ``cache_bytes``:
    the tables are in files behind a cache of that size (``--embedding-cache-gib``)."""
    parts = estimate_bytes(cfg, optimizer, shape, world_size, cache_bytes)
    need = sum(parts.values())
    have = available_bytes(device)
    if have is None:
        return parts
    share = have // max(processes_here, 1) if device.type != "cuda" else have
    if need > share:
        detail = ", ".join(f"{name} {human(v)}" for name, v in parts.items() if v)
        where = "GPU memory free" if device.type == "cuda" else "memory available"
        per = f" per process ({processes_here} here)" if processes_here > 1 and device.type != "cuda" else ""
        raise ConfigError(f"this run needs about {human(need)} ({detail}) but only {human(share)} of "
                          f"{where}{per}: use smaller --arch-embedding-size, --max-ind-range, "
                          "--mini-batch-size or --num-indices-per-lookup, or more processes"
                          + (", or a smaller --embedding-cache-gib" if cache_bytes is not None else
                             ", or --embedding-store=disk" if world_size == 1 else ""))
    return parts

