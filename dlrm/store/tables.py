"""Embedding tables whose rows live in files, trained through a batch's working rows.

:class:`StoredTables` numbers the rows of all the tables in one space, gathers a batch's unique
rows (sorted) in one pass from the cache or the files into one buffer, and gives each table its
contiguous piece of that buffer as a small working parameter, (n_t, D). Each table is looked up
with its indices renumbered into its piece: the same ``embedding_bag`` on the same rows in the same
order, so the pooled values are the in-memory tables' bit for bit. The optimizer updates the
working rows in place (and the working copy of their optimizer state, set into the optimizer's
state before its step), and the buffer goes back to the cache after the step. Because the
renumbering keeps the rows' order, the sparse gradient's per-row sums (SGD's lookup-by-lookup
``index_add_``, Adagrad's and row-wise Adagrad's coalesced sums) add the same values in the same
order: every parameter after every step is the in-memory tables' bit for bit.

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
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dlrm.kernels import fast_draw
from dlrm.store.cache import RowCache
from dlrm.store.files import RowFile, StoreDir, StoreError, free_bytes

STATE_WIDTH = {"sgd": lambda dim: 0, "adagrad": lambda dim: dim, "rwsadagrad": lambda dim: 1}
"""Optimizer state values per row, by ``--optimizer``: Adagrad's sum per value, row-wise Adagrad's
one accumulator per row."""

_DRAW_CHUNK_BYTES = 64 << 20
AHEAD = 2
"""Batches whose rows may be read ahead at once (the next one, and the one after while it trains)."""


class _Batch(NamedTuple):
    """The rows of the batch in training: ``rows`` (n,) sorted over all tables, their ``weights``
    (n, D) and ``state`` (n, S) or None, and ``cuts`` (T+1,): table t's rows are [cuts[t], cuts[t+1])."""

    rows: np.ndarray
    weights: torch.Tensor
    state: Optional[torch.Tensor]
    cuts: List[int]


@dataclass
class StoreStats:
    """What the store did: a batch's rows served from the cache and from the files (of those, how
    many were read ahead), bytes moved."""

    hits: int
    misses: int
    read_ahead: int
    bytes_read: int
    bytes_written: int

    def __add__(self, other: "StoreStats") -> "StoreStats":
        return StoreStats(self.hits + other.hits, self.misses + other.misses, self.read_ahead + other.read_ahead,
                          self.bytes_read + other.bytes_read, self.bytes_written + other.bytes_written)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def describe(self) -> str:
        """``table store: 93.1 % of rows from the cache, 97.0 % of the rest read ahead, read 1.2 GiB,
        wrote 409.6 MiB``."""
        ahead = self.read_ahead / self.misses if self.misses else 0.0
        return (f"table store: {self.hit_rate * 100:.1f} % of rows from the cache, {ahead * 100:.1f} % of the rest "
                f"read ahead, read {_human(self.bytes_read)}, wrote {_human(self.bytes_written)}")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class StoredTables(nn.Module):
    """The tables of one process, kept in files under ``directory`` behind one cache of
    ``cache_bytes`` over all of them.

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
        draw: fills the tables' files from ``rng`` (default :func:`draw_whole_tables`; a rank's pieces
            of sharded tables draw their blocks of the whole tables' stream).

    Raises:
        StoreError: the directory cannot be made, or the files do not fit its disk.
    """

    def __init__(self, table_sizes: Sequence[int], dim: int, rng: np.random.RandomState, directory: str,
                 cache_bytes: int, optimizer: str = "sgd", keep: bool = False,
                 warn: Callable[[str], None] = lambda line: None,
                 draw: Optional[Callable[[np.random.RandomState, List[RowFile]], None]] = None):
        super().__init__()
        self.table_sizes, self.dim = [int(r) for r in table_sizes], int(dim)
        self.state_width = STATE_WIDTH[optimizer](self.dim)
        self.row_wise_state = optimizer == "rwsadagrad"  # its state is (R,), not (R, 1)
        self.dir = StoreDir(directory, keep, warn)
        try:
            self._check_space()
            self.cache = self._make_cache(rng, cache_bytes, draw)
        except BaseException:
            self.dir.close()
            raise
        self.bases = torch.from_numpy(self.cache.bases[:-1].copy())  # (T,) each table's first global row
        for t in range(len(self.table_sizes)):
            self.register_parameter(f"rows_{t}", nn.Parameter(torch.empty(0, self.dim)))
        self._batch: Optional[_Batch] = None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="dlrm-store-read-ahead")
        # the next batches' reads: id of their indices -> (the indices, the written-log position, the read)
        self._ahead: "OrderedDict[int, Tuple[object, int, Future]]" = OrderedDict()

    def _check_space(self) -> None:
        width = self.dim + self.state_width
        need = sum(rows * width * 4 for rows in self.table_sizes)
        have = free_bytes(self.dir.path)
        if need > have:
            raise StoreError(f"--embedding-store-dir={os.path.dirname(self.dir.path)}: the tables need "
                             f"{need / 2**30:.3g} GiB on disk, {have / 2**30:.3g} GiB are free there")

    def _make_cache(self, rng: np.random.RandomState, cache_bytes: int,
                    draw: Optional[Callable[[np.random.RandomState, List[RowFile]], None]]) -> RowCache:
        weights = [self.dir.file(f"table_{t}.f32", rows, self.dim) for t, rows in enumerate(self.table_sizes)]
        (draw or draw_whole_tables)(rng, weights)
        states = [self.dir.file(f"state_{t}.f32", rows, self.state_width) for t, rows in enumerate(self.table_sizes)
                  ] if self.state_width else None
        row_bytes = (self.dim + self.state_width) * 4
        return RowCache(weights, states, cache_bytes // row_bytes)

    # --- the step -----------------------------------------------------------------------------------

    def _unique_rows(self, indices) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
        """The batch's rows over all tables, sorted and unique, (n,); each lookup's place among
        them, (sum of N_t,); and the lookups per table, [N_t]."""
        if isinstance(indices, torch.Tensor):  # (T, N)
            counts = [indices.shape[1]] * indices.shape[0]
            global_rows = (indices + self.bases[:indices.shape[0], None]).reshape(-1)
        else:
            counts = [len(table_indices) for table_indices in indices]
            global_rows = torch.cat([table_indices + self.bases[t] for t, table_indices in enumerate(indices)])
        rows, inverse = torch.unique(global_rows, sorted=True, return_inverse=True)
        return rows, inverse, counts

    def prefetch(self, indices, offsets=None) -> None:
        """Start reading from the files, in a background thread, the rows that ``indices`` (a coming
        batch's, (T, N) or T tensors) need and the cache does not hold. That batch's forward, given
        the same ``indices`` object, uses them (re-reading any row written meanwhile). At most
        AHEAD batches are read ahead; an older read not used by then is dropped. (``offsets`` is not
        needed here; sharded pieces in files take it.)

        The batch's unique rows are found here, in the calling thread (its forward needs them
        anyway): only the file reads, which wait on the disk, go to the background, so they do not
        take a core from the step's own parallel kernels."""
        while len(self._ahead) >= AHEAD:
            self._ahead.popitem(last=False)[1][2].result()
        unique = self._unique_rows(indices)
        since = self.cache.start_read_ahead()
        self._ahead[id(indices)] = (indices, since, self._reader.submit(self._read_ahead, unique, since))

    def _read_ahead(self, unique, since: int):
        return unique, self.cache.read_ahead(unique[0].numpy(), since)

    def _take_ahead(self, indices):
        """The unique rows and the rows read ahead for ``indices``, if they were."""
        entry = self._ahead.get(id(indices))
        if entry is None or entry[0] is not indices:
            return None
        del self._ahead[id(indices)]
        return entry[2].result()

    def _drop_ahead(self) -> None:
        for entry in self._ahead.values():
            entry[2].result()
        self._ahead.clear()

    def forward(self, offsets: torch.Tensor, indices, pooling_weights: Optional[List[torch.Tensor]] = None
                ) -> List[torch.Tensor]:
        taken = self._take_ahead(indices)
        (rows, inverse, counts), ahead = taken if taken is not None else (self._unique_rows(indices), None)
        rows_np = rows.numpy()
        weights, state = self.cache.gather(rows_np, ahead)
        self.cache.trim_written(min((entry[1] for entry in self._ahead.values()), default=None))
        cuts = np.searchsorted(rows_np, self.cache.bases).tolist()  # (T+1,) each table's piece of ``rows``
        self._batch = _Batch(rows_np, weights, state, cuts)
        pooled, start = [], 0
        for t, count in enumerate(counts):
            work = getattr(self, f"rows_{t}")
            work.data = weights[cuts[t]:cuts[t + 1]]  # a view: the optimizer updates the batch's rows in place
            renumbered = inverse[start:start + count] - cuts[t]
            start += count
            table_weights = None if pooling_weights is None else pooling_weights[t][indices[t]]
            pooled.append(F.embedding_bag(renumbered, work, offsets[t], mode="sum", sparse=True,
                                          per_sample_weights=table_weights))
        return pooled

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Give the working rows their optimizer state before each step; store them after it."""
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_step(opt))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step(opt))

    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        batch = self._batch
        if not self.state_width or batch is None:
            return
        if getattr(optimizer, "reset_pending", False):  # row-wise Adagrad after a load: every accumulator restarts
            self.cache.reset_state(optimizer.param_groups[0]["initial_accumulator_value"])
        for t in range(len(self.table_sizes)):
            state = optimizer.state[getattr(self, f"rows_{t}")]
            if "step" not in state:  # row-wise Adagrad makes its state at a parameter's first gradient
                state["step"] = 0
            piece = batch.state[batch.cuts[t]:batch.cuts[t + 1]]  # a view, updated in place
            state["sum"] = piece.reshape(len(piece)) if self.row_wise_state else piece

    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        batch, self._batch = self._batch, None
        if batch is not None:  # the optimizers update the working rows (views of the batch's buffer) in place
            self.cache.scatter(batch.rows, batch.weights, batch.state)

    # --- optimizer state in checkpoints -------------------------------------------------------------

    def _table_indices(self, optimizer: torch.optim.Optimizer) -> Dict[int, int]:
        """Table number -> the optimizer's index of its working-rows parameter."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        works = {id(getattr(self, f"rows_{t}")): t for t in range(len(self.table_sizes))}
        return {works[id(p)]: i for i, p in enumerate(params) if id(p) in works}

    def whole_shapes(self, optimizer: torch.optim.Optimizer) -> Dict[int, tuple]:
        """The optimizer's index of each table's parameter -> the whole table's shape (R, D)."""
        return {i: (self.table_sizes[t], self.dim) for t, i in self._table_indices(optimizer).items()}

    def whole_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> dict:
        """The optimizer's ``state`` dict with each table's accumulator (of a batch's rows) replaced
        by the whole table's, read from its file: Adagrad's (R, D), row-wise Adagrad's (R,)."""
        if not self.state_width:
            return state
        self.cache.flush()
        entries = dict(state["state"])
        for t, i in self._table_indices(optimizer).items():
            entry = entries.get(i)
            if not isinstance(entry, dict):
                continue
            whole = self.cache.states[t].whole()
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
            file, value = self.cache.states[t], entry[key]
            if value.numel() != file.rows * file.width:
                raise ValueError(f"the accumulator of table {t} has shape {tuple(value.shape)}")
            self._forget_cached()
            flat = value.detach().float().reshape(file.rows, file.width)
            file.fill(lambda start, stop: flat[start:stop].contiguous(), _DRAW_CHUNK_BYTES // 4)
            entries[i] = {k: v for k, v in entry.items() if k != key}
        return {**state, "state": entries}

    def _forget_cached(self) -> None:
        """Write the cached rows back and empty the cache (before the files are overwritten)."""
        self._drop_ahead()
        self.cache.flush()
        self.cache.drop()

    # --- whole tables -------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every dirty cached row to the files."""
        self.cache.flush()

    def table(self, t: int) -> torch.Tensor:
        """Table ``t`` whole, (R, D), over the file (flushed first; no copy)."""
        self.cache.flush()
        return self.cache.weights[t].whole()

    def stats(self) -> StoreStats:
        files = self.cache.weights + (self.cache.states or [])
        return StoreStats(self.cache.hits, self.cache.misses, self.cache.read_ahead_used,
                          sum(f.bytes_read for f in files), sum(f.bytes_written for f in files))

    def close(self) -> None:
        """Remove the files (unless kept; then flushed first)."""
        self._drop_ahead()
        self._reader.shutdown()
        if self.dir.keep:
            self.flush()
            for file in self.cache.weights + (self.cache.states or []):
                file.flush()
        self.dir.close()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for t in range(len(self.table_sizes)):
            destination[f"{prefix}{t}.weight"] = self.table(t)

    def load_table(self, t: int, value: torch.Tensor) -> None:
        """Write ``value`` (R_t, D) into table ``t``'s file (the cache written back and emptied first)."""
        self._forget_cached()
        file = self.cache.weights[t]
        chunk = max(_DRAW_CHUNK_BYTES // (self.dim * 4), 1)
        file.fill(lambda start, stop: value[start:stop].detach().float().contiguous(), chunk)

    def load_entry(self, t: int, key: str, state_dict, missing_keys: List[str], error_msgs: List[str]) -> None:
        """Load table ``t`` from ``state_dict[key]`` into its file, as ``load_state_dict`` does: a
        missing key or another shape is reported in ``missing_keys`` or ``error_msgs``."""
        if key not in state_dict:
            missing_keys.append(key)
            return
        value, shape = state_dict[key], (self.table_sizes[t], self.dim)
        if tuple(value.shape) != shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                              f"the table has {shape}")
            return
        self.load_table(t, value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for t in range(len(self.table_sizes)):
            self.load_entry(t, f"{prefix}{t}.weight", state_dict, missing_keys, error_msgs)
        known = {f"{prefix}{t}.weight" for t in range(len(self.table_sizes))}
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)


def stores_of(tables: nn.Module) -> List["StoredTables"]:
    """The stores holding ``tables`` (a model's ``emb_l``) in files: itself, the stores of a rank's
    sharded pieces, or none for tables in memory."""
    if isinstance(tables, StoredTables):
        return [tables]
    return list(getattr(tables, "stores", []))


def draw_whole_tables(rng: np.random.RandomState, files: List[RowFile]) -> None:
    """Fill each (R, D) file with U(-sqrt(1/R), sqrt(1/R)) draws from ``rng``, in table order, chunk by
    chunk: the stream the tables in memory draw."""
    for file in files:
        fill_draws(rng, file, float(np.sqrt(1 / file.rows)) if file.rows else 0.0)


def fill_draws(rng: np.random.RandomState, file: RowFile, bound: float) -> None:
    """Fill ``file`` in order with U(-bound, bound) draws from ``rng``, a few million values at a time
    (the same values as one draw of the whole)."""
    chunk = max(_DRAW_CHUNK_BYTES // (file.width * 4), 1)

    def draw(start, stop):
        values = torch.empty(stop - start, file.width)
        fast_draw.uniform_into(rng, values, -bound, bound)
        return values

    file.fill(draw, chunk)
