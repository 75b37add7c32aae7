"""A write-back cache of the hot rows of all the tables in RAM, in front of their files.

The tables' rows are numbered in one space: row r of table t is ``bases[t] + r``. A batch's rows
(sorted, unique, over all its tables) are gathered in one pass from the slots that hold them and
from the files for the rest; the rows read from the files are admitted, evicting the slots with the
fewest uses, whatever their table; a dirty slot is written to the files when it is evicted (or at
:meth:`RowCache.flush`). Updated rows go back to their slots (marked dirty), or straight to the
files when they hold none (a cache smaller than the batch). Each slot keeps a row's weights and its
optimizer state, in two arrays, so a batch's rows of one table are contiguous pieces of both.

Eviction is LFU with ageing: every use adds one to a slot's count, a new row starts at one, and all
counts are halved each time as many rows have been admitted as the cache holds; the victims are the
least used of a random sample of slots (eight per slot needed), as Redis approximates LFU. Criteo's
ids are heavily skewed (a few rows take most lookups), which a frequency count keeps in the cache
where recency alone would let a burst of one-off ids flush them out; the halving lets rows that were
popular long ago leave. One cache over all the tables gives its slots to the hottest rows wherever
they are, and costs one pass of bookkeeping per batch, not one per table.

Dimension vocabulary: T tables, R rows of all of them, C cached slots, D weights per row, S
optimizer state values per row (0 for SGD), n rows of a batch.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from dlrm.store.files import RowFile

SAMPLE = 8
"""Eviction candidates sampled per slot needed."""

Rows = Tuple[torch.Tensor, Optional[torch.Tensor]]
"""Weights (n, D) and optimizer state (n, S) of n rows; the state is None when S = 0."""


class ReadAhead(NamedTuple):
    """Rows read from the files before their batch: ``rows`` (sorted), their ``weights`` (n, D)
    and ``state`` (n, S) or None, and where the log of written rows stood when the reading began."""

    rows: np.ndarray
    weights: torch.Tensor
    state: Optional[torch.Tensor]
    since: int


def _index(array: np.ndarray) -> torch.Tensor:
    """A NumPy index array as a torch int64 index."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))


class RowCache:
    """Up to ``capacity`` rows of the tables (weights and optimizer state) in RAM, write-back.

    Args:
        weights: each table's (R_t, D) file.
        states: each table's (R_t, S) optimizer state file, or None for every table (S = 0).
        capacity: slots C (0: every read and write goes to the files).
    """

    def __init__(self, weights: Sequence[RowFile], states: Optional[Sequence[RowFile]], capacity: int):
        self.weights = list(weights)
        self.states = list(states) if states is not None else None
        self.dim = self.weights[0].width if self.weights else 0
        self.state_width = self.states[0].width if self.states else 0
        self.bases = np.concatenate([[0], np.cumsum([f.rows for f in self.weights], dtype=np.int64)])  # (T+1,)
        total = int(self.bases[-1])
        self.capacity = int(min(capacity, total))
        self.slot_of = np.full(total, -1, dtype=np.int32 if self.capacity < 2**31 - 1 else np.int64)  # (R,)
        self.row_of = np.full(self.capacity, -1, dtype=np.int64)  # (C,) the row in each slot, -1: empty
        self.uses = np.full(self.capacity, -1.0)  # (C,) LFU counts; empty slots go first
        self.dirty = np.zeros(self.capacity, dtype=bool)
        self.held_weights = torch.empty(self.capacity, self.dim)  # (C, D)
        self.held_state = torch.empty(self.capacity, self.state_width) if self.state_width else None  # (C, S)
        self.admitted_since_halving = 0
        self.filled = 0  # slots [0, filled) have held a row
        self.sampler = np.random.default_rng(0)  # eviction candidates (no effect on the numbers)
        self.hits = self.misses = 0
        self.read_ahead_used = 0  # rows served from a read-ahead
        self.written: List[np.ndarray] = []  # rows written to the files, from entry number written_base on
        self.written_base = 0

    # --- a batch's rows ---------------------------------------------------------------------------

    def gather(self, rows: np.ndarray, ahead: Optional[ReadAhead] = None) -> Rows:
        """The weights (n, D) and state (n, S) of ``rows`` (sorted, unique), new tensors.
        ``ahead``: rows read from the files in advance (:meth:`read_ahead`), used where still current."""
        slots = self.slot_of[rows]
        hit = slots >= 0
        n_hit = int(np.count_nonzero(hit))
        self.hits += n_hit
        self.misses += len(rows) - n_hit
        if n_hit == len(rows):  # every row cached: one gather
            self.uses[slots] += 1
            return self._from_slots(slots)
        weights = torch.empty(len(rows), self.dim)
        state = torch.empty(len(rows), self.state_width) if self.state_width else None
        if n_hit:
            at, held = _index(np.flatnonzero(hit)), slots[hit]
            self.uses[held] += 1
            _copy_rows(weights, state, at, self._from_slots(held))
        missing = rows[~hit]
        loaded = self._read_missing(missing, ahead)
        _copy_rows(weights, state, _index(np.flatnonzero(~hit)), loaded)
        self._admit(missing, loaded)
        return weights, state

    def scatter(self, rows: np.ndarray, weights: torch.Tensor, state: Optional[torch.Tensor]) -> None:
        """Store the updated ``weights`` (n, D) and ``state`` (n, S) of ``rows`` (sorted, unique):
        into their slots, marked dirty, or into the files for rows without one."""
        slots = self.slot_of[rows]
        held = slots >= 0
        if held.all():
            self._to_slots(slots, weights, state)
            return
        if held.any():
            at = _index(np.flatnonzero(held))
            self._to_slots(slots[held], weights.index_select(0, at),
                           None if state is None else state.index_select(0, at))
        at = _index(np.flatnonzero(~held))
        self._write(rows[~held], weights.index_select(0, at), None if state is None else state.index_select(0, at))

    def flush(self) -> None:
        """Write every dirty slot to the files; the slots stay cached, clean."""
        slots = np.flatnonzero(self.dirty)
        if len(slots):
            slots = slots[np.argsort(self.row_of[slots])]
            self._write(self.row_of[slots], *self._from_slots(slots))
            self.dirty[slots] = False

    def reset_state(self, value: float) -> None:
        """Set every row's optimizer state to ``value``, in the files and in the slots."""
        if not self.state_width:
            return
        chunk = torch.full((max((64 << 20) // (4 * self.state_width), 1), self.state_width), float(value))
        for state in self.states:
            state.fill(lambda start, stop: chunk[:stop - start], len(chunk))
        self.held_state.fill_(value)

    def drop(self) -> None:
        """Forget every slot without writing it (after the files were overwritten)."""
        self.slot_of.fill(-1)
        self.row_of.fill(-1)
        self.uses.fill(-1.0)
        self.dirty.fill(False)
        self.filled = 0

    # --- reading ahead --------------------------------------------------------------------------

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

    def read_ahead(self, rows: np.ndarray, since: int) -> ReadAhead:
        """Read from the files the rows of ``rows`` not cached now (safe in another thread: a row the
        step writes meanwhile is read again when used)."""
        missing = rows[self.slot_of[rows] < 0]
        return ReadAhead(missing, *self._read(missing), since)

    def _read_missing(self, missing: np.ndarray, ahead: Optional[ReadAhead]) -> Rows:
        """``missing`` rows from the files: those read ahead and not written since, the rest now."""
        if ahead is None or not len(ahead.rows):
            return self._read(missing)
        later = self.written[ahead.since - self.written_base:]
        at = np.minimum(np.searchsorted(ahead.rows, missing), len(ahead.rows) - 1)
        found = ahead.rows[at] == missing
        if later:
            found &= ~np.isin(missing, np.concatenate(later))
        if found.all():
            self.read_ahead_used += len(missing)
            return _take_rows((ahead.weights, ahead.state), _index(at))
        weights = torch.empty(len(missing), self.dim)
        state = torch.empty(len(missing), self.state_width) if self.state_width else None
        if found.any():
            self.read_ahead_used += int(np.count_nonzero(found))
            _copy_rows(weights, state, _index(np.flatnonzero(found)),
                       _take_rows((ahead.weights, ahead.state), _index(at[found])))
        _copy_rows(weights, state, _index(np.flatnonzero(~found)), self._read(missing[~found]))
        return weights, state

    # --- files and slots ------------------------------------------------------------------------

    def _tables_of(self, rows: np.ndarray):
        """(table, its local row numbers, the positions in ``rows``) for each table ``rows`` (sorted)
        touch."""
        cuts = np.searchsorted(rows, self.bases)
        for t in np.flatnonzero(cuts[1:] > cuts[:-1]):
            yield int(t), rows[cuts[t]:cuts[t + 1]] - self.bases[t], slice(int(cuts[t]), int(cuts[t + 1]))

    def _read(self, rows: np.ndarray) -> Rows:
        pieces = [(self.weights[t].read(local), self.states[t].read(local) if self.state_width else None)
                  for t, local, _ in self._tables_of(rows)]
        if len(pieces) == 1:
            return pieces[0]
        weights = torch.cat([w for w, _ in pieces]) if pieces else torch.empty(0, self.dim)
        if not self.state_width:
            return weights, None
        return weights, torch.cat([s for _, s in pieces]) if pieces else torch.empty(0, self.state_width)

    def _write(self, rows: np.ndarray, weights: torch.Tensor, state: Optional[torch.Tensor]) -> None:
        self.written.append(rows)
        for t, local, at in self._tables_of(rows):
            self.weights[t].write(local, weights[at])
            if self.state_width:
                self.states[t].write(local, state[at])

    def _from_slots(self, slots: np.ndarray) -> Rows:
        return _take_rows((self.held_weights, self.held_state), _index(slots))

    def _to_slots(self, slots: np.ndarray, weights: torch.Tensor, state: Optional[torch.Tensor]) -> None:
        index = _index(slots)
        self.held_weights.index_copy_(0, index, weights)
        if self.state_width:
            self.held_state.index_copy_(0, index, state)
        self.dirty[slots] = True

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

    def _admit(self, rows: np.ndarray, values: Rows) -> None:
        """Put ``rows`` (not cached) in the slots with the fewest uses, writing dirty ones back."""
        count = min(len(rows), self.capacity)
        if count == 0:
            return
        rows = rows[:count]
        victims = self._victims(count)
        evicted = self.row_of[victims]
        dirty = victims[self.dirty[victims]]
        if len(dirty):
            dirty = dirty[np.argsort(self.row_of[dirty])]
            self._write(self.row_of[dirty], *self._from_slots(dirty))
        self.slot_of[evicted[evicted >= 0]] = -1
        self.slot_of[rows] = victims
        self.row_of[victims] = rows
        index = _index(victims)
        self.held_weights.index_copy_(0, index, values[0][:count])
        if self.state_width:
            self.held_state.index_copy_(0, index, values[1][:count])
        self.uses[victims] = 1.0
        self.dirty[victims] = False
        self.admitted_since_halving += count
        if self.admitted_since_halving >= self.capacity:
            held = self.row_of >= 0
            self.uses[held] /= 2
            self.admitted_since_halving = 0


def _take_rows(values: Rows, index: torch.Tensor) -> Rows:
    weights, state = values
    return weights.index_select(0, index), None if state is None else state.index_select(0, index)


def _copy_rows(weights: torch.Tensor, state: Optional[torch.Tensor], at: torch.Tensor, values: Rows) -> None:
    """Copy ``values`` into rows ``at`` of ``weights`` and ``state``."""
    weights.index_copy_(0, at, values[0])
    if state is not None:
        state.index_copy_(0, at, values[1])
