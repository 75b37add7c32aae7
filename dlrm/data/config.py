"""What the random and trace-based synthetic generators draw: :class:`RandomDataConfig`.

A leaf: the generators (:mod:`dlrm.data.random`, :mod:`dlrm.data.synthetic_trace`) and the run's
configuration import it, and it imports neither.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

from dlrm.common import FlagError


@dataclass(frozen=True)
class RandomDataConfig:
    """What the random and synthetic generators draw (the reference's data flags).

    Attributes:
        dense_dim: M, dense features per sample (the bottom MLP's input width).
        table_sizes: rows of each of the T tables.
        data_size: samples in the data set (``--data-size``).
        batch_size: samples per batch (``--mini-batch-size``).
        num_batches: if > 0, the data set is exactly this many full batches (``--num-batches``).
        num_indices_per_lookup: the largest (or, with ``fixed``, the exact) bag size.
        fixed: every bag draws exactly ``num_indices_per_lookup`` indices.
        distribution: "uniform" or "gaussian" index distribution (``--rand-data-dist``).
        rand_min, rand_max, rand_mu, rand_sigma: the gaussian's clip range, mean (-1: the midpoint)
            and standard deviation.
        round_targets: targets rounded to 0/1.
        seed: the seed that batch 0 re-seeds the stream with.
        generation: "random" or "synthetic" (trace-based indices).
        trace_file: synthetic only: the distribution-file template (``j`` = table number).
        trace_padding: synthetic only: ``--data-trace-enable-padding``.
        num_workers: the reference's loader workers (``--num-workers``): batch i is drawn from
            worker i mod W's stream (see :class:`BatchLoader`); 0 draws every batch from one stream.
        fix_reference_bugs: test batches from their own stream (seed + 1) instead of the training
            stream, gaussian bags deduplicated after truncation to integers, and the data the same for
            any ``num_workers`` (one stream, as with none).
    """

    dense_dim: int
    table_sizes: Tuple[int, ...]
    data_size: int = 1
    batch_size: int = 1
    num_batches: int = 0
    num_indices_per_lookup: int = 10
    fixed: bool = False
    distribution: str = "uniform"
    rand_min: float = 0.0
    rand_max: float = 1.0
    rand_mu: float = -1.0
    rand_sigma: float = 1.0
    round_targets: bool = False
    seed: int = 123
    generation: str = "random"
    trace_file: str = "./input/dist_emb_j.log"
    trace_padding: bool = False
    num_workers: int = 0
    fix_reference_bugs: bool = False

    @property
    def total_samples(self) -> int:
        """Samples in the data set: ``num_batches * batch_size`` when ``num_batches`` is set."""
        return self.num_batches * self.batch_size if self.num_batches > 0 else self.data_size

    @property
    def batches(self) -> int:
        """Batches in the data set: ceil(samples / batch_size)."""
        return math.ceil(self.total_samples / self.batch_size)


def check_batching(batch_size: int, num_workers: int, test_batch_size: int = -1, test_num_workers: int = -1) -> None:
    """Raise FlagError for a batch size or a loader-worker count that cannot work (every data
    source's config checks its own with this, so each is checked once, in one wording)."""
    if batch_size < 1:
        raise FlagError(f"{{batch_size}} must be at least 1, got {batch_size}")
    if test_batch_size == 0:
        raise FlagError("{test_batch_size} must be at least 1 (or -1 for the training size)")
    if num_workers < 0 or test_num_workers < -1:
        raise FlagError("{num_workers} must not be negative, nor {test_num_workers} below -1 (-1: {num_workers})")
