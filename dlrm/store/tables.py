"""Embedding tables whose rows live in files, trained through a batch's working rows.

For every table a batch looks up, :class:`StoredTables` gathers the batch's unique rows (sorted)
from the cache or the files into a small working parameter, (n, D), and looks them up with the
indices renumbered into it: the same ``embedding_bag`` on the same rows in the same order, so the
pooled values are the in-memory tables' bit for bit. The optimizer updates the working rows (and
the working copy of their optimizer state, set into the optimizer's state before its step), and
the updated rows go back to the cache after the step. Because the renumbering keeps the rows'
order, the sparse gradient's per-row sums (SGD's lookup-by-lookup ``index_add_``, Adagrad's and
row-wise Adagrad's coalesced sums) add the same values in the same order: every parameter after
every step is the in-memory tables' bit for bit.

While a step computes, the rows the next batch needs from the files are read in a background
thread (:meth:`StoredTables.prefetch`); a row the step writes to its file meanwhile is read again.

The state dict holds each whole table under ``K.weight`` (read through the files after a flush),
so checkpoints keep the reference's keys.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dlrm.kernels import fast_draw
from dlrm.store.cache import RowCache
from dlrm.store.files import StoreDir, StoreError, free_bytes

STATE_WIDTH = {"sgd": lambda dim: 0, "adagrad": lambda dim: dim, "rwsadagrad": lambda dim: 1}
"""Optimizer state values per row, by ``--optimizer``: Adagrad's sum per value, row-wise Adagrad's
one accumulator per row."""

_DRAW_CHUNK_BYTES = 64 << 20
AHEAD = 2
"""Batches whose rows may be read ahead at once (the next one, and the one after while it trains)."""


@dataclass
class StoreStats:
    """What the store did: lookups served from the cache and from the files, bytes moved."""

    hits: int
    misses: int
    bytes_read: int
    bytes_written: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def describe(self) -> str:
        """``table store: 93.1 % of rows from the cache, read 1.2 GiB, wrote 409.6 MiB``."""
        return (f"table store: {self.hit_rate * 100:.1f} % of rows from the cache, read {_human(self.bytes_read)}, "
                f"wrote {_human(self.bytes_written)}")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class StoredTables(nn.Module):
    """The tables of one process, kept in files under ``directory`` behind a cache of
    ``cache_bytes`` (split over the tables by their row bytes).

    ``forward`` has :class:`dlrm.model.dlrm.PerTableEmbeddings`' signature. Call
    :meth:`attach_optimizer` once with the optimizer over :meth:`parameters`; it sets the working
    rows' optimizer state before each step and stores the updated rows after it.

    Args:
        table_sizes, dim: the tables' rows and their dimension D.
        rng: the stream the tables are drawn from, as in memory: U(-sqrt(1/R), sqrt(1/R)) per table,
            in table order.
        directory: ``--embedding-store-dir``; this run's own directory is made inside it.
        cache_bytes: RAM for cached rows (weights and state) over all tables.
        optimizer: ``--optimizer`` (sets the state kept per row).
        keep: keep the files when the run ends.
        warn: receives one-line warnings (a stale store removed).

    Raises:
        StoreError: the directory cannot be made, or the files do not fit its disk.
    """

    def __init__(self, table_sizes: Sequence[int], dim: int, rng: np.random.RandomState, directory: str,
                 cache_bytes: int, optimizer: str = "sgd", keep: bool = False,
                 warn: Callable[[str], None] = lambda line: None):
        super().__init__()
        self.table_sizes, self.dim = [int(r) for r in table_sizes], int(dim)
        self.state_width = STATE_WIDTH[optimizer](self.dim)
        self.row_wise_state = optimizer == "rwsadagrad"  # its state is (R,), not (R, 1)
        self.dir = StoreDir(directory, keep, warn)
        try:
            self._check_space()
            self.caches = self._make_caches(rng, cache_bytes)
        except BaseException:
            self.dir.close()
            raise
        for t in range(len(self.table_sizes)):
            self.register_parameter(f"rows_{t}", nn.Parameter(torch.empty(0, self.dim)))
        self._batch_rows: Dict[int, np.ndarray] = {}
        self._batch_state: Dict[int, torch.Tensor] = {}
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="dlrm-store-read-ahead")
        # the next batches' reads: id of their indices -> (the indices, the written-log positions, the read)
        self._ahead: "OrderedDict[int, Tuple[object, List[int], Future]]" = OrderedDict()

    def _check_space(self) -> None:
        width = self.dim + self.state_width
        need = sum(rows * width * 4 for rows in self.table_sizes)
        have = free_bytes(self.dir.path)
        if need > have:
            raise StoreError(f"--embedding-store-dir={os.path.dirname(self.dir.path)}: the tables need "
                             f"{need / 2**30:.3g} GiB on disk, {have / 2**30:.3g} GiB are free there")

    def _make_caches(self, rng: np.random.RandomState, cache_bytes: int) -> List[RowCache]:
        row_bytes = (self.dim + self.state_width) * 4
        total_rows = sum(self.table_sizes)
        caches = []
        for t, rows in enumerate(self.table_sizes):
            weights = self.dir.file(f"table_{t}.f32", rows, self.dim)
            bound = float(np.sqrt(1 / rows))
            chunk = max(_DRAW_CHUNK_BYTES // (self.dim * 4), 1)

            def draw(start, stop, dim=self.dim, bound=bound):
                values = torch.empty(stop - start, dim)
                fast_draw.uniform_into(rng, values, -bound, bound)
                return values

            weights.fill(draw, chunk)  # the in-memory draws, chunk by chunk: the same stream
            state = self.dir.file(f"state_{t}.f32", rows, self.state_width) if self.state_width else None
            share = cache_bytes * rows // max(total_rows, 1)
            caches.append(RowCache(weights, state, share // row_bytes))
        return caches

    # --- the step -----------------------------------------------------------------------------------

    def prefetch(self, indices) -> None:
        """Start reading from the files, in a background thread, the rows that ``indices`` (a coming
        batch's, (T, N) or T tensors) need and the cache does not hold. That batch's forward, given
        the same ``indices`` object, uses them (re-reading any row written meanwhile). At most
        AHEAD batches are read ahead; an older read not used by then is dropped."""
        while len(self._ahead) >= AHEAD:
            self._ahead.popitem(last=False)[1][2].result()
        since = [cache.start_read_ahead() for cache in self.caches]
        self._ahead[id(indices)] = (indices, since, self._reader.submit(self._read_ahead, indices, since))

    def _read_ahead(self, indices, since: List[int]):
        return [cache.read_ahead(torch.unique(indices[t]).numpy(), since[t]) for t, cache in enumerate(self.caches)]

    def _take_ahead(self, indices):
        """The rows read ahead for ``indices``, if they were."""
        entry = self._ahead.get(id(indices))
        if entry is None or entry[0] is not indices:
            return None
        del self._ahead[id(indices)]
        return entry[2].result()

    def _trim_written(self) -> None:
        """Drop the written-rows log before the earliest outstanding read-ahead."""
        for t, cache in enumerate(self.caches):
            cache.trim_written(min((entry[1][t] for entry in self._ahead.values()), default=None))

    def _drop_ahead(self) -> None:
        for entry in self._ahead.values():
            entry[2].result()
        self._ahead.clear()

    def forward(self, offsets: torch.Tensor, indices, pooling_weights: Optional[List[torch.Tensor]] = None
                ) -> List[torch.Tensor]:
        pooled = []
        ahead = self._take_ahead(indices)
        for t, cache in enumerate(self.caches):
            table_indices = indices[t]
            rows, renumbered = torch.unique(table_indices, sorted=True, return_inverse=True)
            rows_np = rows.numpy()
            gathered = cache.gather(rows_np, ahead[t] if ahead is not None else None)
            work = getattr(self, f"rows_{t}")
            work.data = gathered[:, :self.dim].contiguous()
            self._batch_rows[t] = rows_np
            self._batch_state[t] = gathered[:, self.dim:].contiguous()
            weights = None if pooling_weights is None else pooling_weights[t][table_indices]
            pooled.append(F.embedding_bag(renumbered, work, offsets[t], mode="sum", sparse=True,
                                          per_sample_weights=weights))
        self._trim_written()
        return pooled

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Give the working rows their optimizer state before each step; store them after it."""
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_step(opt))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step(opt))

    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.state_width:
            return
        if getattr(optimizer, "reset_pending", False):  # row-wise Adagrad after a load: every accumulator restarts
            start = optimizer.param_groups[0]["initial_accumulator_value"]
            for cache in self.caches:
                cache.reset_state(start)
        for t, rows in self._batch_rows.items():
            work = getattr(self, f"rows_{t}")
            state = optimizer.state[work]
            if "step" not in state:  # row-wise Adagrad makes its state at a parameter's first gradient
                state["step"] = 0
            saved = self._batch_state[t]
            state["sum"] = saved.reshape(len(rows)) if self.row_wise_state else saved

    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        for t, rows in self._batch_rows.items():
            work = getattr(self, f"rows_{t}")
            values = work.data
            if self.state_width:
                values = torch.cat([values, optimizer.state[work]["sum"].reshape(len(rows), self.state_width)], dim=1)
            self.caches[t].scatter(rows, values)
        self._batch_rows.clear()
        self._batch_state.clear()

    # --- optimizer state in checkpoints -------------------------------------------------------------

    def _table_indices(self, optimizer: torch.optim.Optimizer) -> Dict[int, int]:
        """Table number -> the optimizer's index of its working-rows parameter."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        works = {id(getattr(self, f"rows_{t}")): t for t in range(len(self.caches))}
        return {works[id(p)]: i for i, p in enumerate(params) if id(p) in works}

    def whole_shapes(self, optimizer: torch.optim.Optimizer) -> Dict[int, tuple]:
        """The optimizer's index of each table's parameter -> the whole table's shape (R, D)."""
        return {i: (self.table_sizes[t], self.dim) for t, i in self._table_indices(optimizer).items()}

    def whole_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> dict:
        """The optimizer's ``state`` dict with each table's accumulator (of a batch's rows) replaced
        by the whole table's, read from its file: Adagrad's (R, D), row-wise Adagrad's (R,)."""
        if not self.state_width:
            return state
        entries = dict(state["state"])
        for t, i in self._table_indices(optimizer).items():
            entry = entries.get(i)
            if not isinstance(entry, dict):
                continue
            cache = self.caches[t]
            cache.flush()
            whole = cache.state.whole()
            key = "momentum" if "momentum" in entry else "sum"
            entries[i] = {**entry, key: whole.reshape(-1) if self.row_wise_state else whole}
        return {**state, "state": entries}

    def take_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> dict:
        """Write the tables' whole accumulators of ``state`` (a state dict in the single-process
        layout) into their files; return ``state`` without them, for ``optimizer.load_state_dict``.

        Raises:
            ValueError: an accumulator whose shape is not the table's.
        """
        entries = dict(state["state"])
        for t, i in self._table_indices(optimizer).items():
            entry = entries.get(i)
            if not isinstance(entry, dict):
                continue
            key = "momentum" if "momentum" in entry else "sum" if "sum" in entry else None
            if key is None or not self.state_width:
                continue
            cache, value = self.caches[t], entry[key]
            if value.numel() != cache.state.rows * cache.state.width:
                raise ValueError(f"the accumulator of table {t} has shape {tuple(value.shape)}")
            cache.flush()
            cache.drop()
            flat = value.detach().float().reshape(cache.state.rows, cache.state.width)
            cache.state.fill(lambda start, stop: flat[start:stop].contiguous(), _DRAW_CHUNK_BYTES // 4)
            entries[i] = {k: v for k, v in entry.items() if k != key}
        return {**state, "state": entries}

    # --- whole tables -------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every dirty cached row to the files."""
        for cache in self.caches:
            cache.flush()

    def table(self, t: int) -> torch.Tensor:
        """Table ``t`` whole, (R, D), over the file (flushed first; no copy)."""
        self.caches[t].flush()
        return self.caches[t].weights.whole()

    def stats(self) -> StoreStats:
        files = [f for c in self.caches for f in (c.weights, c.state) if f is not None]
        return StoreStats(sum(c.hits for c in self.caches), sum(c.misses for c in self.caches),
                          sum(f.bytes_read for f in files), sum(f.bytes_written for f in files))

    def close(self) -> None:
        """Remove the files (unless kept; then flushed first)."""
        self._drop_ahead()
        self._reader.shutdown()
        if self.dir.keep:
            self.flush()
            for cache in self.caches:
                cache.weights.flush()
        self.dir.close()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for t in range(len(self.caches)):
            destination[f"{prefix}{t}.weight"] = self.table(t)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for t, cache in enumerate(self.caches):
            key = f"{prefix}{t}.weight"
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if tuple(value.shape) != (cache.weights.rows, self.dim):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                  f"the table has {(cache.weights.rows, self.dim)}")
                continue
            cache.drop()
            chunk = max(_DRAW_CHUNK_BYTES // (self.dim * 4), 1)
            cache.weights.fill(lambda start, stop, v=value: v[start:stop].detach().float().contiguous(), chunk)
        known = {f"{prefix}{t}.weight" for t in range(len(self.caches))}
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)
