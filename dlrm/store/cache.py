"""A write-back cache of one table's hot rows in RAM, in front of its files.

Each cached row keeps its weights and its optimizer state side by side in one slot. A batch's rows
are gathered from the slots they have and from the files for the rest; the rows read from the files
are admitted, evicting the slots with the fewest uses; a dirty slot is written to the files when it
is evicted (or at :meth:`RowCache.flush`). Updated rows go back to their slots (marked dirty), or
straight to the files when they hold none (a cache smaller than the batch).

Eviction is LFU with ageing: every use adds one to a slot's count, a new row starts at one, and all
counts are halved each time as many rows have been admitted as the cache holds; the victims are the
least used of a random sample of slots (eight per slot needed), as Redis approximates LFU. Criteo's ids are
heavily skewed (a few rows take most lookups), which a frequency count keeps in the cache where
recency alone would let a burst of one-off ids flush them out; the halving lets rows that were
popular long ago leave.

Dimension vocabulary: R rows of the table, C cached slots, W values per row (weights then state).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import numpy as np
import torch

from dlrm.store.files import RowFile

SAMPLE = 8
"""Eviction candidates sampled per slot needed."""


class ReadAhead(NamedTuple):
    """Rows read from the files before their batch: ``rows`` (sorted), their ``values`` (n, W), and
    where the log of written rows stood when the reading began."""

    rows: np.ndarray
    values: torch.Tensor
    since: int


class RowCache:
    """Up to ``capacity`` rows of one table (weights and optimizer state) in RAM, write-back.

    Args:
        weights: the table's (R, D) file.
        state: its optimizer state's (R, S) file, or None (S = 0).
        capacity: slots C (0: every read and write goes to the files).
    """

    def __init__(self, weights: RowFile, state: Optional[RowFile], capacity: int):
        self.weights, self.state = weights, state
        self.dim = weights.width
        self.state_width = state.width if state is not None else 0
        rows = weights.rows
        self.capacity = int(min(capacity, rows))
        self.slot_of = np.full(rows, -1, dtype=np.int64)  # (R,) the slot of each row, -1: not cached
        self.row_of = np.full(self.capacity, -1, dtype=np.int64)  # (C,) the row in each slot, -1: empty
        self.uses = np.full(self.capacity, -1.0)  # (C,) LFU counts; empty slots go first
        self.dirty = np.zeros(self.capacity, dtype=bool)
        self.values = torch.empty(self.capacity, self.dim + self.state_width)  # (C, W)
        self.admitted_since_halving = 0
        self.filled = 0  # slots [0, filled) have held a row
        self.sampler = np.random.default_rng(0)  # eviction candidates (no effect on the numbers)
        self.hits = self.misses = 0
        self.read_ahead_used = 0  # rows served from a read-ahead
        self.written: List[np.ndarray] = []  # rows written to the files, from entry number written_base on
        self.written_base = 0

    # --- a batch's rows ---------------------------------------------------------------------------

    def gather(self, rows: np.ndarray, ahead: Optional["ReadAhead"] = None) -> torch.Tensor:
        """The weights and state of ``rows`` (sorted, unique row numbers), (n, W), a new tensor.
        ``ahead``: rows read from the files in advance (:meth:`read_ahead`), used where still current."""
        out = torch.empty(len(rows), self.dim + self.state_width)
        slots = self.slot_of[rows]
        hit = slots >= 0
        if hit.any():
            out[torch.from_numpy(hit)] = self.values[torch.from_numpy(slots[hit])]
            self.uses[slots[hit]] += 1
        missing = rows[~hit]
        self.hits += int(hit.sum())
        self.misses += len(missing)
        if len(missing):
            loaded = self._read_missing(missing, ahead)
            out[torch.from_numpy(~hit)] = loaded
            self._admit(missing, loaded)
        return out

    def start_read_ahead(self) -> int:
        """Where the log of rows written to the files stands: call before :meth:`read_ahead`."""
        return self.written_base + len(self.written)

    def trim_written(self, keep_from: Optional[int] = None) -> None:
        """Forget the log of written rows before position ``keep_from`` (the earliest outstanding
        read-ahead's; None: all of it)."""
        end = self.written_base + len(self.written)
        keep_from = end if keep_from is None else max(min(keep_from, end), self.written_base)
        del self.written[:keep_from - self.written_base]
        self.written_base = keep_from

    def read_ahead(self, rows: np.ndarray, since: int) -> "ReadAhead":
        """Read from the files the rows of ``rows`` not cached now (safe in another thread: a row the
        step writes meanwhile is read again when used)."""
        missing = rows[self.slot_of[rows] < 0]
        return ReadAhead(missing, self._read(missing), since)

    def _read_missing(self, missing: np.ndarray, ahead: Optional["ReadAhead"]) -> torch.Tensor:
        """``missing`` rows from the files: those read ahead and not written since, the rest now."""
        if ahead is None or not len(ahead.rows):
            return self._read(missing)
        later = self.written[ahead.since - self.written_base:]
        written = np.concatenate(later) if later else np.empty(0, np.int64)
        at = np.minimum(np.searchsorted(ahead.rows, missing), len(ahead.rows) - 1)
        found = (ahead.rows[at] == missing) & ~np.isin(missing, written)
        loaded = torch.empty(len(missing), self.dim + self.state_width)
        if found.any():
            loaded[torch.from_numpy(found)] = ahead.values[torch.from_numpy(at[found])]
            self.read_ahead_used += int(found.sum())
        if not found.all():
            loaded[torch.from_numpy(~found)] = self._read(missing[~found])
        return loaded

    def scatter(self, rows: np.ndarray, values: torch.Tensor) -> None:
        """Store the updated ``values`` (n, W) of ``rows``: into their slots, marked dirty, or into
        the files for rows without one."""
        slots = self.slot_of[rows]
        held = slots >= 0
        if held.any():
            self.values[torch.from_numpy(slots[held])] = values[torch.from_numpy(held)]
            self.dirty[slots[held]] = True
        if not held.all():
            self._write(rows[~held], values[torch.from_numpy(~held)])

    def flush(self) -> None:
        """Write every dirty slot to the files; the slots stay cached, clean."""
        slots = np.flatnonzero(self.dirty)
        if len(slots):
            order = np.argsort(self.row_of[slots])
            slots = slots[order]
            self._write(self.row_of[slots], self.values[torch.from_numpy(slots)])
            self.dirty[slots] = False

    def reset_state(self, value: float) -> None:
        """Set every row's optimizer state to ``value``, in the files and in the slots."""
        if self.state is None:
            return
        chunk = torch.full((max((64 << 20) // (4 * self.state_width), 1), self.state_width), float(value))
        self.state.fill(lambda start, stop: chunk[:stop - start], len(chunk))
        self.values[:, self.dim:] = value

    def drop(self) -> None:
        """Forget every slot without writing it (after the files were overwritten)."""
        self.slot_of.fill(-1)
        self.row_of.fill(-1)
        self.uses.fill(-1.0)
        self.dirty.fill(False)
        self.filled = 0

    # --- files and slots ------------------------------------------------------------------------

    def _read(self, rows: np.ndarray) -> torch.Tensor:
        weights = self.weights.read(rows)
        if self.state is None:
            return weights
        return torch.cat([weights, self.state.read(rows)], dim=1)

    def _write(self, rows: np.ndarray, values: torch.Tensor) -> None:
        self.written.append(rows)
        self.weights.write(rows, values[:, :self.dim].contiguous())
        if self.state is not None:
            self.state.write(rows, values[:, self.dim:].contiguous())

    def _victims(self, count: int) -> np.ndarray:
        """``count`` slots to reuse: empty ones first, then the least used of a random sample of
        SAMPLE times as many slots (sampled LFU, as Redis approximates LFU: a full search of a
        cache of millions of slots would cost more than the step)."""
        free = self.capacity - self.filled
        if free >= count:
            self.filled += count
            return np.arange(self.filled - count, self.filled)
        taken = np.arange(self.filled, self.capacity)
        self.filled = self.capacity
        need = count - len(taken)
        sample = np.unique(self.sampler.integers(0, self.capacity, size=SAMPLE * need))
        sample = sample[self.row_of[sample] >= 0]
        sample = sample[~np.isin(sample, taken)] if len(taken) else sample
        if len(sample) < need:
            pool = np.setdiff1d(np.arange(self.capacity), taken, assume_unique=True)
            return np.concatenate([taken, pool[np.argpartition(self.uses[pool], need - 1)[:need]]])
        chosen = sample[np.argpartition(self.uses[sample], need - 1)[:need]] if need < len(sample) else sample
        return np.concatenate([taken, chosen])

    def _admit(self, rows: np.ndarray, values: torch.Tensor) -> None:
        """Put ``rows`` (not cached) in the slots with the fewest uses, writing dirty ones back."""
        count = min(len(rows), self.capacity)
        if count == 0:
            return
        rows, values = rows[:count], values[:count]
        victims = self._victims(count)
        evicted = self.row_of[victims]
        dirty = victims[self.dirty[victims]]
        if len(dirty):
            order = np.argsort(self.row_of[dirty])
            self._write(self.row_of[dirty[order]], self.values[torch.from_numpy(dirty[order])])
        self.slot_of[evicted[evicted >= 0]] = -1
        self.slot_of[rows] = victims
        self.row_of[victims] = rows
        self.values[torch.from_numpy(victims)] = values
        self.uses[victims] = 1.0
        self.dirty[victims] = False
        self.admitted_since_halving += count
        if self.admitted_since_halving >= self.capacity:
            held = self.row_of >= 0
            self.uses[held] /= 2
            self.admitted_since_halving = 0
