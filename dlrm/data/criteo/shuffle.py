"""Stage 7 (--memory-map): the reference's two-pass shuffle of the processed days into reordered days.

Pass 1 distributes each day's rows into per-day intermediate files
(``<npzfile>_<j>_intermediate_{y,d,s}.npy``), drawing every row's bucket as the reference draws
it; pass 2 permutes each bucket into ``<npzfile>_<j>_reordered.npz``. Pass 1 holds a permutation
of 8 bytes per row of the largest day; pass 2 reads its bucket through a read-only memory map.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Tuple

import numpy as np

from dlrm.common import DataError
from dlrm.data.criteo.config import ROWS_PER_CHUNK, CriteoPaths, PreprocessConfig, progress_bar, reusable
from dlrm.data.criteo.schema import NUM_DENSE, NUM_SPARSE
from dlrm.io import provenance
from dlrm.io.npz import Member, NpyWriter, NpzReader, NpzStreamWriter


def occurrence_rank(values: np.ndarray) -> np.ndarray:
    """rank[i] = how many j < i have values[j] == values[i]."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    group_start = np.maximum.accumulate(np.where(starts, np.arange(len(values)), 0))
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(len(values)) - group_start
    return rank


def _copy_stream(rng: np.random.RandomState) -> np.random.RandomState:
    """A second RandomState at ``rng``'s position."""
    copy = np.random.RandomState()
    copy.set_state(rng.get_state())
    return copy


def _skip_randint(rng: np.random.RandomState, high: int, count: int) -> None:
    """Move ``rng`` past ``count`` draws of ``randint(0, high)`` (drawn in chunks and dropped)."""
    for start in range(0, count, ROWS_PER_CHUNK):
        rng.randint(0, high, size=min(ROWS_PER_CHUNK, count - start))


class BucketAssigner:
    """Destination buckets of pass 1 (randomize total), drawn as the reference draws them.

    For each day the reference draws every row's bucket at once, ``randint(0, choices, rows)``, and
    then walks the rows: a row whose bucket is full draws again, one ``randint(0, choices)`` at a time
    until it finds room, and those re-draws follow the day's bulk draw in the stream. :meth:`day`
    reproduces that without the per-row loop (see :class:`_DayDraws`).
    """

    def __init__(self, capacities: np.ndarray, choices: int):
        self.capacity = np.asarray(capacities, dtype=np.int64)
        self.fill = np.zeros(len(self.capacity), dtype=np.int64)
        self.choices = choices

    def place_in(self, bucket: int, count: int) -> np.ndarray:
        """Positions for ``count`` samples that stay in ``bucket`` (no draws)."""
        positions = self.fill[bucket] + np.arange(count)
        self.fill[bucket] += count
        return positions

    def day(self, rng: np.random.RandomState, count: int) -> "_DayDraws":
        """The draws of a day of ``count`` rows that starts at ``rng``'s position."""
        return _DayDraws(self, rng, count)


class _Redraws:
    """The values after a day's bulk draw, which rows with a full bucket draw again from.

    They are read ahead from a copy of the stream; :meth:`finish` moves the stream itself past the
    ones used."""

    def __init__(self, rng: np.random.RandomState, choices: int):
        self.rng = rng
        self.choices = choices
        self._ahead = _copy_stream(rng)
        self._values = np.empty(0, dtype=np.int64)  # read ahead, not used yet
        self.used = 0

    def first_open(self, count: int, full: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The next ``count`` values that are not full buckets, and for each how many values
        (from the first unused one) are used up to and including it."""
        if full[: self.choices].all():
            raise DataError("memory-map shuffle: every bucket is full (inconsistent day counts)")
        size = count
        while True:
            if len(self._values) < size:
                more = self._ahead.randint(0, self.choices, size=size - len(self._values))
                self._values = np.concatenate([self._values, more])
            open_at = np.flatnonzero(~full[self._values[:size]])
            if len(open_at) >= count:
                return self._values[open_at[:count]], open_at[:count] + 1
            size *= 2

    def use(self, count: int) -> None:
        self._values = self._values[count:]
        self.used += count

    def finish(self) -> None:
        _skip_randint(self.rng, self.choices, self.used)


class _DayDraws:
    """One day's buckets, drawn as the reference draws them, ``place(n)`` rows at a time.

    The day's bulk draw is read from a copy of the stream, in chunks; the stream itself is moved
    past it at once, to where the re-draws come from. Rows are then placed in windows over which
    the set of full buckets does not change: every row whose bulk value is a full bucket takes the
    next re-draw that is not, and the window ends at the first row that finds its bucket filled by
    the rows before it (each bucket fills once, so there are at most as many windows as buckets).
    """

    def __init__(self, assigner: BucketAssigner, rng: np.random.RandomState, count: int):
        self.assigner = assigner
        self.bulk = _copy_stream(rng)
        _skip_randint(rng, assigner.choices, count)
        self.redraws = _Redraws(rng, assigner.choices)

    def place(self, count: int) -> Tuple[np.ndarray, np.ndarray]:
        """(bucket, position in bucket) of the next ``count`` rows, in row order."""
        candidates = self.bulk.randint(0, self.assigner.choices, size=count)
        bucket = np.empty(count, dtype=np.int64)
        position = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            done += self._place_window(candidates[done:], bucket[done:], position[done:])
        return bucket, position

    def _place_window(self, candidates: np.ndarray, bucket: np.ndarray, position: np.ndarray) -> int:
        """Place the leading rows of ``candidates`` while no bucket fills; returns how many."""
        fill, capacity = self.assigner.fill, self.assigner.capacity
        full = fill >= capacity
        chosen = candidates.copy()
        redrawn = np.flatnonzero(full[candidates])
        if len(redrawn):
            chosen[redrawn], used = self.redraws.first_open(len(redrawn), full)
        at = fill[chosen] + occurrence_rank(chosen)
        over = np.flatnonzero(at >= capacity[chosen])
        take = int(over[0]) if len(over) else len(chosen)  # at least 1: row 0's bucket has room
        bucket[:take], position[:take] = chosen[:take], at[:take]
        fill += np.bincount(chosen[:take], minlength=len(fill))
        redrawn_taken = int(np.searchsorted(redrawn, take))
        if redrawn_taken:
            self.redraws.use(int(used[redrawn_taken - 1]))
        return take

    def finish(self) -> None:
        """Leave the stream after the day's last re-draw, where the next day's draws begin."""
        self.redraws.finish()


class _StayPut:
    """The rows of a day that keep one bucket: no draws."""

    def __init__(self, assigner: BucketAssigner, target: int):
        self.assigner = assigner
        self.target = target

    def place(self, count: int) -> Tuple[np.ndarray, np.ndarray]:
        return np.full(count, self.target, dtype=np.int64), self.assigner.place_in(self.target, count)

    def finish(self) -> None:
        pass


def _shuffled_bucket(j: int, days: int, randomize: str, split_none: bool) -> bool:
    """Whether pass 2 permutes bucket j (not the last day unless split is none)."""
    return randomize in ("day", "total") and (split_none or j < days - 1)


def _day_placer(assigner: BucketAssigner, rng, day: int, count: int, days: int, randomize: str,
                split_none: bool):
    """Where the ``count`` rows of ``day`` go in pass 1 (an object with ``place(n)`` and ``finish()``).

    With randomize total the reference draws every day's buckets, the last day's too, although
    those rows stay in the last bucket unless split is none."""
    if randomize == "total" and (split_none or day < days - 1):
        return assigner.day(rng, count)
    if randomize == "total":
        _skip_randint(rng, assigner.choices, count)  # drawn, never used
    return _StayPut(assigner, days - 1 if randomize == "total" else day)


def shuffle_pass1(paths: CriteoPaths, day_rows: np.ndarray, cfg: PreprocessConfig, rng,
                  replay: bool, record: dict) -> None:
    """Pass 1: distribute each processed day's rows into per-day intermediate files.

    With ``replay`` only the draws are made (the files already exist)."""
    split_none = cfg.data_split == "none"
    choices = paths.days if split_none else paths.days - 1
    assigner = BucketAssigner(day_rows, choices)
    if replay:
        for i in range(paths.days):
            rows = int(day_rows[i])
            placer = _day_placer(assigner, rng, i, rows, paths.days, cfg.randomize, split_none)
            for start in range(0, rows, ROWS_PER_CHUNK):
                placer.place(min(ROWS_PER_CHUNK, rows - start))
            placer.finish()
        return
    with contextlib.ExitStack() as stack:
        outputs = _open_intermediates(paths, day_rows, stack, record)
        with progress_bar(cfg.progress, int(day_rows.sum()), "shuffle pass 1") as bar:
            for i in range(paths.days):
                _scatter_day(paths, i, assigner, rng, outputs, cfg, split_none, bar)


_INTERMEDIATE_PARTS = (("y", np.float64, 0), ("d", np.float64, NUM_DENSE),
                       ("s", np.int32, NUM_SPARSE))


def _open_intermediates(paths: CriteoPaths, day_rows: np.ndarray, stack: contextlib.ExitStack,
                        record: dict) -> List[List[NpyWriter]]:
    """Zero-filled .npy writers per day (y float64 (n,), d float64 (n,13), s int32 (n,26)),
    entered on ``stack``: the files appear together (each then gets ``record``) when it closes
    without an exception."""
    outputs = []
    for j, rows in enumerate(day_rows):
        outputs.append([])
        for part, dtype, width in _INTERMEDIATE_PARTS:
            shape = (int(rows), width) if width else (int(rows),)
            path = paths.intermediate_day(j, part)
            stack.enter_context(provenance.recording(path, record))
            outputs[-1].append(stack.enter_context(NpyWriter(path, dtype, shape)))
    return outputs


def _scatter_day(paths, day, assigner, rng, outputs, cfg, split_none, bar) -> None:
    with NpzReader(paths.processed_day(day)) as reader:
        rows = int(reader.shape("y")[0])
        placer = _day_placer(assigner, rng, day, rows, paths.days, cfg.randomize, split_none)
        for start in range(0, rows, ROWS_PER_CHUNK):
            stop = min(rows, start + ROWS_PER_CHUNK)
            bucket, position = placer.place(stop - start)
            chunk = (reader.rows("y", start, stop), reader.rows("X_int", start, stop),
                     reader.rows("X_cat", start, stop))
            order = np.argsort(bucket, kind="stable")
            bounds = np.searchsorted(bucket[order], np.arange(paths.days + 1))
            for j in range(paths.days):
                rows_j = order[bounds[j]: bounds[j + 1]]
                if len(rows_j):
                    first = int(position[rows_j[0]])
                    for target, values in zip(outputs[j], chunk):
                        target.write(first, values[rows_j])
            bar.update(stop - start)
        placer.finish()


_REORDERED_MEMBERS = [Member("X_cat", np.dtype(np.int32), NUM_SPARSE),
                      Member("X_int", np.dtype(np.float64), NUM_DENSE),
                      Member("y", np.dtype(np.float64))]


def shuffle_pass2(paths: CriteoPaths, day_rows: np.ndarray, cfg: PreprocessConfig, rng,
                  plan: "ShufflePlan") -> None:
    """Pass 2: permute each bucket into ``<npzfile>_<j>_reordered.npz``.

    Buckets whose file can be reused only replay their permutation draw (up to the last bucket
    to write)."""
    split_none = cfg.data_split == "none"
    with progress_bar(cfg.progress, int(day_rows.sum()), "shuffle pass 2") as bar:
        for j in range(plan.last_bucket + 1):
            rows = int(day_rows[j])
            order = None
            if _shuffled_bucket(j, paths.days, cfg.randomize, split_none):
                order = rng.permutation(rows)
            if not plan.reordered[j]:
                _write_reordered(paths, j, rows, order, bar, plan.record)


def _write_reordered(paths: CriteoPaths, j: int, rows: int, order, bar, record: dict) -> None:
    sources = [np.load(paths.intermediate_day(j, part), mmap_mode="r") for part in ("s", "d", "y")]
    path = paths.reordered_day(j)
    with provenance.recording(path, record), \
            NpzStreamWriter(path, _REORDERED_MEMBERS, rows) as writer:
        for start in range(0, rows, ROWS_PER_CHUNK):
            stop = min(rows, start + ROWS_PER_CHUNK)
            take = order[start:stop] if order is not None else slice(start, stop)
            writer.append(*(source[take] for source in sources))
            bar.update(stop - start)


@dataclass
class ShufflePlan:
    """Per-bucket decisions of the memory-map shuffle, and the record its files get."""

    pass1: bool             # the intermediates must be written
    reordered: List[bool]   # per bucket: its reordered file can be reused
    record: dict

    @property
    def last_bucket(self) -> int:
        """The last bucket whose reordered file must be written (-1: none)."""
        return max((j for j, ok in enumerate(self.reordered) if not ok), default=-1)

    def draws_needed(self, cfg: PreprocessConfig, days: int) -> bool:
        """Whether a stage that draws from the RNG still has to run."""
        split_none = cfg.data_split == "none"
        pass1_draws = cfg.randomize == "total" and self.pass1
        pass2_draws = any(_shuffled_bucket(j, days, cfg.randomize, split_none)
                          for j in range(self.last_bucket + 1))
        return pass1_draws or pass2_draws


def plan_shuffle(cfg: PreprocessConfig, paths: CriteoPaths, record: dict,
                 log: Callable[[str], None]) -> ShufflePlan:
    """Which shuffle files must be written (none without --memory-map); one note per stage redone."""
    if not cfg.memory_map:
        return ShufflePlan(False, [True] * paths.days, record)
    reordered = reusable([paths.reordered_day(j) for j in range(paths.days)], record,
                         "the reordered days", log)
    intermediates = [paths.intermediate_day(j, part)
                     for j in range(paths.days) for part in ("y", "d", "s")]
    pass1 = not all(reordered) and not all(reusable(intermediates, record, "shuffle pass 1", log))
    return ShufflePlan(pass1, reordered, record)
