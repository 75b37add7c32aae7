"""Input data for the DLRM benchmark: random and trace-based synthetic batches, and the Criteo loaders.

Every loader yields :class:`dlrm_common.Batch` objects, one whole mini-batch at a time (see that class
for the layout). Dimension vocabulary: B batch, T tables, M dense features, N_t indices of table t.

Random data (``--data-generation=random``) reproduces the reference's numbers exactly: every value
is drawn from one NumPy legacy stream (``np.random.RandomState``), in the reference's order, and the
stream is re-seeded whenever batch 0 is generated. Unlike the reference, the draws are made in large
vectorised calls, not per sample. With ``--num-workers`` W >= 1 the reference drew its batches in W
loader worker processes, each with a NumPy stream of its own; :class:`BatchLoader` reproduces those
streams in this process (see there).

The front door ``dlrm_data_pytorch.py`` re-exports these names and runs the reference's
trace-profiling tool (:mod:`dlrm.data.synthetic_trace`).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Iterator, List, Tuple

import numpy as np
import torch

from dlrm.common import Batch
from dlrm.data.config import RandomDataConfig

__all__ = [
    "RandomDataConfig",
    "RandomDataset",
    "BatchLoader",
    "generate_random_batch",
    "make_random_data_and_loaders",
    "worker_numpy_seed",
]


# ---------------------------------------------------------------------------------------------
# Exact, vectorised random batches
# ---------------------------------------------------------------------------------------------


class _DoubleStream:
    """Uniform doubles read ahead from a RandomState, given back exactly when done.

    The reference draws ``random(1)`` for a bag's size and then ``random(size)`` for its indices,
    bag after bag, so how many doubles a table consumes is only known after reading them. This
    class draws large chunks (the same doubles, since legacy ``random_sample``/``rand``/``random``
    all read one double per value from the same stream), and :meth:`finish` rewinds the generator
    to exactly the consumed position: it restores the state saved before the last chunk that was
    only partly used and re-draws the used part of it.
    """

    def __init__(self, rng: np.random.RandomState, capacity: int = 0):
        self.rng = rng
        self._buffer = np.empty(capacity)
        self._size = 0
        self._chunks: List[Tuple[int, tuple]] = []  # (start offset, state before drawing it)

    def ensure(self, end: int) -> np.ndarray:
        """Make sure doubles [0, end) are drawn; returns all drawn doubles."""
        have = self._size
        if end > have:
            if end > self._buffer.size:
                grown = np.empty(max(end, 2 * self._buffer.size))
                grown[:have] = self._buffer[:have]
                self._buffer = grown
            self._chunks.append((have, self.rng.get_state()))
            self._buffer[have:end] = self.rng.random_sample(end - have)
            self._size = end
        return self._buffer[: self._size]

    def finish(self, consumed: int) -> None:
        """Leave the generator exactly ``consumed`` doubles after where this stream started."""
        if consumed == self._size:
            return
        for start, state in reversed(self._chunks):
            if start <= consumed:
                self.rng.set_state(state)
                self.rng.random_sample(consumed - start)
                return


def _bag_starts(u: np.ndarray, start: int, n: int, cap: int) -> np.ndarray:
    """Positions of the n bag-size draws of one table, beginning at ``start`` of ``u``.

    Bag i's size is round(max(1, u[p_i] * cap)) and its index draws follow it, so
    p_{i+1} = p_i + 1 + size_i. Each position depends on the previous bag's draw, so this walk is
    inherently sequential; it is kept to scalar arithmetic (about 0.2 us a bag), while all the
    NumPy work around it is vectorised. ``u`` must hold at least ``start + n * (1 + cap)`` values.
    """
    view = memoryview(u)
    positions = [0] * n
    p = start
    for i in range(n):
        positions[i] = p
        p += 1 + round(max(1.0, view[p] * cap))  # Python's round is half-to-even, like np.round
    return np.asarray(positions, dtype=np.int64)


def _unique_rows(values: np.ndarray, lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted unique values of each row's first ``lengths[i]`` entries.

    Args:
        values: (n, L) int64; entries past a row's length are ignored.
        lengths: (n,) valid entries per row.
    Returns:
        (indices, counts): the rows' unique values concatenated in row order, (sum counts,), and
        the unique count of each row, (n,).
    """
    n, width = values.shape
    valid = np.arange(width)[None, :] < lengths[:, None]
    rows = np.sort(np.where(valid, values, np.iinfo(np.int64).max), axis=1)
    keep = np.ones_like(valid)
    keep[:, 1:] = rows[:, 1:] != rows[:, :-1]
    keep &= np.arange(width)[None, :] < lengths[:, None]  # sentinels sort last
    return rows[keep], keep.sum(axis=1)


def _offsets_from_counts(counts: np.ndarray) -> np.ndarray:
    """Bag start offsets from bag lengths: [0, c0, c0+c1, ...] without the total."""
    offsets = np.zeros(counts.size, dtype=np.int64)
    np.cumsum(counts[:-1], out=offsets[1:])
    return offsets


_POOL_MIN_DRAWS = 1 << 16
"""Below this many index draws a batch's tables are computed on one thread: a thread pool costs more."""


def _uniform_tables(
    stream: _DoubleStream, pos: int, n: int, cfg: RandomDataConfig
) -> Tuple[List[np.ndarray], List[np.ndarray], int]:
    """Uniform-distribution bags of every table, reading the stream from ``pos``.

    First every table's bags are located in the stream (in order: each table starts where the
    previous one ended); then the tables' indices are computed from those fixed draws, on two
    threads for large batches (NumPy releases the GIL; the results do not depend on the threads).
    Fixed-size bags sit at known places, so all tables are computed in one pass.

    Returns (offsets per table, indices per table, position after the last draw).
    """
    if cfg.fixed:
        return _fixed_uniform_tables(stream, pos, n, cfg)
    k = cfg.num_indices_per_lookup
    located = []
    for size in cfg.table_sizes:
        cap = min(size, k)
        u = stream.ensure(pos + n * (cap + 1))
        starts = _bag_starts(u, pos, n, cap)
        lengths = np.round(np.maximum(1.0, u[starts] * cap)).astype(np.int64)
        first = starts + 1
        located.append((u, first, lengths, size, cfg))
        pos = int(first[-1] + lengths[-1])
    if len(located) > 1 and sum(int(a[2].sum()) for a in located) >= _POOL_MIN_DRAWS:
        with ThreadPoolExecutor(max_workers=2) as pool:
            tables = list(pool.map(lambda args: _table_bags(*args), located))
    else:
        tables = [_table_bags(*args) for args in located]
    return [t[0] for t in tables], [t[1] for t in tables], pos


def _fixed_uniform_tables(
    stream: _DoubleStream, pos: int, n: int, cfg: RandomDataConfig
) -> Tuple[List[np.ndarray], List[np.ndarray], int]:
    """:func:`_uniform_tables` for bags of exactly k draws: table t's bag i is the k draws at
    ``pos + (t * n + i) * k``, so the (T * n, k) block of draws is mapped and deduplicated at once."""
    k, num_tables = cfg.num_indices_per_lookup, len(cfg.table_sizes)
    stop = pos + num_tables * n * k
    draws = stream.ensure(stop)[pos:stop].reshape(num_tables * n, k)
    sizes = np.repeat(np.asarray(cfg.table_sizes, dtype=np.float64), n)[:, None]  # per bag
    values = _to_rows(draws, sizes, cfg)
    bag_indices, counts = _unique_rows(values, np.full(num_tables * n, k, dtype=np.int64))
    counts = counts.reshape(num_tables, n)
    ends = np.cumsum(counts.sum(axis=1))
    indices = np.split(bag_indices, ends[:-1]) if num_tables else []
    return [_offsets_from_counts(c) for c in counts], indices, stop


def _to_rows(draws: np.ndarray, sizes, cfg: RandomDataConfig) -> np.ndarray:
    """Row numbers of uniform draws in [0, 1) for tables of ``sizes`` rows: the reference's
    round(draw * (size - 1)); under zipf, the inverse CDF of a power law of exponent s over the
    ranks 1..size + 1, rank floor(r) - 1 with r = (1 + u ((size + 1)^(1-s) - 1))^(1/(1-s)) (r =
    (size + 1)^u for s = 1), so row 0 is the most frequent."""
    if cfg.distribution != "zipf":
        return np.round(draws * (sizes - 1)).astype(np.int64)
    s, top = cfg.zipf_exponent, np.asarray(sizes, dtype=np.float64) + 1
    if abs(s - 1.0) < 1e-12:
        ranks = np.power(top, draws)
    else:
        ranks = np.power(1.0 + draws * (np.power(top, 1.0 - s) - 1.0), 1.0 / (1.0 - s))
    return np.clip(np.floor(ranks).astype(np.int64) - 1, 0, np.asarray(sizes, dtype=np.int64) - 1)


def _table_bags(u: np.ndarray, first: np.ndarray, lengths: np.ndarray, size: int,
                cfg: RandomDataConfig) -> Tuple[np.ndarray, np.ndarray]:
    """One table's (offsets, indices): bag i's draws are u[first[i] : first[i] + lengths[i]], each
    mapped to a row (:func:`_to_rows`), then sorted and deduplicated within the bag."""
    width = max(int(lengths.max()), 1)
    cols = first[:, None] + np.arange(width)[None, :]
    draws = u[np.minimum(cols, u.size - 1)]
    values = _to_rows(draws, size, cfg)
    bag_indices, counts = _unique_rows(values, lengths)
    return _offsets_from_counts(counts), bag_indices


def _gaussian_values(draws: np.ndarray, cfg: RandomDataConfig) -> np.ndarray:
    """One gaussian bag's indices from its normal draws, clipped to [min, max].

    The reference takes the sorted unique clipped floats and then truncates them to integers, so a
    bag can repeat an index (two draws in [3, 4) both give 3); that is the default.
    ``fix_reference_bugs`` truncates first and then deduplicates."""
    clipped = np.clip(draws, cfg.rand_min, cfg.rand_max)
    if cfg.fix_reference_bugs:
        return np.unique(clipped.astype(np.int64))
    return np.unique(clipped).astype(np.int64)


def _gaussian_tables(
    rng: np.random.RandomState, n: int, cfg: RandomDataConfig
) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Gaussian-distribution bags, drawn straight from ``rng`` in the reference's order.

    Fixed bag sizes are drawn in one call per table; variable sizes interleave a uniform size draw
    with the normal draws of each bag (and the legacy normal caches half of each pair), so they are
    drawn bag by bag.
    """
    k = cfg.num_indices_per_lookup
    offsets, indices = [], []
    for size in cfg.table_sizes:
        if cfg.fixed:
            draws = rng.normal(cfg.gaussian_mu, cfg.rand_sigma, n * k).reshape(n, k)
            bags = [_gaussian_values(row, cfg) for row in draws]
        else:
            bags = []
            for _ in range(n):
                count = int(np.round(max(1.0, rng.random_sample(1)[0] * min(size, k))))
                bags.append(_gaussian_values(rng.normal(cfg.gaussian_mu, cfg.rand_sigma, count), cfg))
        counts = np.array([b.size for b in bags], dtype=np.int64)
        bag_indices = np.concatenate(bags) if bags else np.empty(0, np.int64)
        offsets.append(_offsets_from_counts(counts))
        indices.append(bag_indices)
    return offsets, indices


def generate_random_batch(rng: np.random.RandomState, n: int, cfg: RandomDataConfig) -> Batch:
    """Draw one batch of n samples exactly as the reference's ``generate_dist_input_batch``.

    Draw order (the reference's): dense ``rand(n, M)``; then per table, per sample, the bag size
    (``random(1)``, unless fixed) and the bag's indices; then targets ``rand(n, 1)``.

    Returns:
        Batch with dense_x (n, M), offsets (T, n), indices a list of T tensors (N_t,), labels (n, 1).
    """
    m = cfg.dense_dim
    if cfg.distribution in ("uniform", "zipf"):  # zipf maps the same draws to other rows
        k = cfg.num_indices_per_lookup
        upper = n * (m + 1) + sum(n * (1 + min(size, k)) for size in cfg.table_sizes)
        stream = _DoubleStream(rng, capacity=upper if not cfg.fixed else n * (m + 1 + k * len(cfg.table_sizes)))
        u = stream.ensure(n * m)
        dense = u[: n * m].reshape(n, m).astype(np.float32)
        offsets, indices, pos = _uniform_tables(stream, n * m, n, cfg)
        labels = stream.ensure(pos + n)[pos : pos + n].reshape(n, 1).astype(np.float32)
        stream.finish(pos + n)
    else:
        dense = rng.rand(n, m).astype(np.float32)
        offsets, indices = _gaussian_tables(rng, n, cfg)
        labels = rng.rand(n, 1).astype(np.float32)
    if cfg.round_targets:
        labels = np.round(labels)
    return Batch(
        dense_x=torch.from_numpy(dense),
        offsets=torch.from_numpy(np.stack(offsets)) if offsets else torch.zeros(0, n, dtype=torch.long),
        indices=[torch.from_numpy(i) for i in indices],
        labels=torch.from_numpy(labels),
    )


# ---------------------------------------------------------------------------------------------
# Datasets and loaders
# ---------------------------------------------------------------------------------------------


class RandomDataset(torch.utils.data.Dataset):
    """Random (or trace-based synthetic) batches; item i is the whole batch i.

    Generating batch 0 re-seeds ``rng`` with ``cfg.seed``, so every epoch sees the same data, as in
    the reference. Batches must be generated in order, since each continues the stream
    where the previous one stopped.

    Args:
        cfg: what to draw.
        rng: the stream to draw from (the reference's global NumPy stream).
        log: where the synthetic generator reports out-of-range trace indices. Random generation
            never logs, so by default (and only here) messages are dropped.
    """

    def __init__(self, cfg: RandomDataConfig, rng: np.random.RandomState,
                 log: Callable[[str], None] = lambda message: None):
        self.cfg = cfg
        self.rng = rng
        self.log = log
        self._distributions = None
        if cfg.generation == "synthetic":
            self._distributions = self._read_distributions()

    def _read_distributions(self):
        from dlrm.data.synthetic_trace import distribution_paths, read_distribution

        paths = distribution_paths(self.cfg.trace_file, len(self.cfg.table_sizes))
        return [read_distribution(path) for path in paths]

    def __len__(self) -> int:
        return self.cfg.batches

    def __getitem__(self, i: int) -> Batch:
        return self.draw(i, self.rng)

    def draw(self, i: int, rng: np.random.RandomState) -> Batch:
        """Batch i drawn from ``rng`` (re-seeded first when i is 0)."""
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} out of range [0, {len(self)})")
        cfg = self.cfg
        if i == 0:
            rng.seed(cfg.seed)
        n = min(cfg.batch_size, cfg.total_samples - i * cfg.batch_size)
        if self._distributions is None:
            return generate_random_batch(rng, n, cfg)
        from dlrm.data.synthetic_trace import generate_synthetic_batch

        return generate_synthetic_batch(rng, n, cfg, self._distributions, self.log)


def worker_numpy_seed(base_seed: int, worker_id: int) -> List[int]:
    """The seed torch's DataLoader gives NumPy's global generator in worker ``worker_id``, for an
    iterator whose base seed is ``base_seed`` (torch's own derivation, called, not copied)."""
    from torch.utils.data._utils.worker import _generate_state

    return _generate_state(base_seed, worker_id)


class BatchLoader:
    """Iterates a :class:`RandomDataset` in order, in this process; ``len()`` is its batch count.

    Every ``iter()`` first takes one int64 draw from torch's global generator, as a torch DataLoader
    iterator takes its base seed, so torch's stream moves as in the reference. With no workers every
    batch comes from the dataset's stream. With W workers the reference's batch i was drawn in worker
    i mod W, a fresh process per iterator whose NumPy stream torch seeds from the base seed and the
    worker's number; that stream goes on from batch to batch of that worker, and batch 0 re-seeds
    worker 0's. This loader keeps the W streams itself, so the batches are the reference's without
    processes, and, as there, the dataset's own stream is not touched.
    (Generating the next batch on a background thread was measured and rejected: on a 2-core
    machine it slowed the training step by more than it saved.)
    """

    def __init__(self, dataset: RandomDataset, num_workers: int = 0):
        self.dataset = dataset
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Batch]:
        base_seed = int(torch.empty((), dtype=torch.int64).random_().item())
        if self.num_workers == 0:
            return (self.dataset[i] for i in range(len(self.dataset)))
        streams = [np.random.RandomState(worker_numpy_seed(base_seed, w)) for w in range(self.num_workers)]
        return (self.dataset.draw(i, streams[i % self.num_workers]) for i in range(len(self.dataset)))


def make_random_data_and_loaders(cfg: RandomDataConfig, rng: np.random.RandomState,
                                 log: Callable[[str], None]):
    """Train and test data for ``--data-generation=random`` or ``synthetic``.

    As in the reference, the test batches are the training batches: the same data set, drawn from
    the same stream (``rng``) and re-seeded at test batch 0. So a test pass moves the stream that
    the following training batches draw from, and the printed test accuracy is measured on the
    training data. With ``cfg.fix_reference_bugs`` the test set has its own stream, seeded with
    seed + 1: training numbers then do not depend on whether or how often you test, nor on
    ``cfg.num_workers``. ``log`` receives the synthetic generator's warnings about out-of-range trace addresses.

    Returns:
        (train_data, train_loader, test_data, test_loader).
    """
    train_data = RandomDataset(cfg, rng, log)
    if cfg.fix_reference_bugs:
        test_cfg = replace(cfg, seed=cfg.seed + 1)
        test_data = RandomDataset(test_cfg, np.random.RandomState(test_cfg.seed), log)
    else:
        test_data = RandomDataset(cfg, rng, log)
    workers = 0 if cfg.fix_reference_bugs else cfg.num_workers
    return train_data, BatchLoader(train_data, workers), test_data, BatchLoader(test_data, workers)
