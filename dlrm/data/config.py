"""What the random and trace-based synthetic generators draw: :class:`RandomDataConfig`, which checks
itself when built (:func:`check_random_config`), and the batch checks every data source shares
(:func:`check_batching`).

A leaf: the generators (:mod:`dlrm.data.random`, :mod:`dlrm.data.synthetic_trace`) and the run's
configuration import it, and it imports neither.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Tuple

from dlrm.common import FlagError, check_number


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
        distribution: "uniform" or "gaussian" index distribution (``--rand-data-dist``), or (not in
            the reference) "zipf": the uniform draws mapped through a power law's inverse CDF, so
            row r is looked up with probability about proportional to (r + 1) ** -zipf_exponent.
        zipf_exponent: the power law's exponent s > 0 (``--rand-data-zipf-exponent``).
        rand_min, rand_max, rand_mu, rand_sigma: the gaussian's clip range, mean (-1: the midpoint)
            and standard deviation.
        round_targets: targets rounded to 0/1.
        seed: the seed that batch 0 re-seeds the stream with.
        generation: "random" or "synthetic" (trace-based indices).
        trace_file: synthetic only: the distribution-file template (``j`` = table number).
        trace_padding: synthetic only: ``--data-trace-enable-padding``.
        num_workers: the reference's loader workers (``--num-workers``): batch i is drawn from
            worker i mod W's stream (see :class:`BatchLoader`); 0 draws every batch from one stream.
        test_batch_size, test_num_workers: checked only (-1: the training ones); test batches are
            drawn as the training batches are, as in the reference.
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
    zipf_exponent: float = 1.05
    round_targets: bool = False
    seed: int = 123
    generation: str = "random"
    trace_file: str = "./input/dist_emb_j.log"
    trace_padding: bool = False
    num_workers: int = 0
    test_batch_size: int = -1
    test_num_workers: int = -1
    fix_reference_bugs: bool = False

    def __post_init__(self):
        check_random_config(self)

    @property
    def gaussian_mu(self) -> float:
        """The gaussian's mean: ``rand_mu``, or the clip range's midpoint when it is -1."""
        return (self.rand_min + self.rand_max) / 2 if self.rand_mu == -1 else self.rand_mu

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


def check_random_flags(values: Mapping[str, object]) -> None:
    """Raise FlagError for a gaussian's clip range, mean or deviation that is not a number, or a
    range upside down; ``values`` holds them by field name (a config's, or the flags of a run that
    does not draw random data, which are checked all the same)."""
    for field, lowest in (("rand_min", None), ("rand_max", None), ("rand_mu", None), ("rand_sigma", 0.0)):
        check_number(field, values[field], lowest)
    low, high = values["rand_min"], values["rand_max"]
    if values["distribution"] == "gaussian" and low > high:
        raise FlagError(f"{{rand_min}}={low:g} is above {{rand_max}}={high:g}")


def check_random_config(cfg: RandomDataConfig) -> None:
    """Raise FlagError for values the generators cannot draw from."""
    check_batching(cfg.batch_size, cfg.num_workers, cfg.test_batch_size, cfg.test_num_workers)
    check_random_flags(vars(cfg))
    for t, rows in enumerate(cfg.table_sizes):
        if rows < 1:
            raise FlagError(f"{{table_sizes}}: table {t} has {rows} rows (must be at least 1)")
    if cfg.distribution not in ("uniform", "gaussian", "zipf"):
        raise FlagError(f"{{distribution}}={cfg.distribution} is not supported (use uniform, gaussian or zipf)")
    check_number("zipf_exponent", cfg.zipf_exponent)
    if cfg.zipf_exponent <= 0:
        raise FlagError(f"{{zipf_exponent}} must be positive, got {cfg.zipf_exponent:g}")
    if cfg.num_indices_per_lookup < 1:
        raise FlagError(f"{{num_indices_per_lookup}} must be at least 1, got {cfg.num_indices_per_lookup}")
    if cfg.total_samples < 1:
        raise FlagError(f"{{data_size}} must be at least 1, got {cfg.data_size}")
    if cfg.distribution == "gaussian" and cfg.generation == "random":
        _check_gaussian_reach(cfg)


_LARGEST_NORMAL = math.sqrt(208 * math.log(2))
"""The largest |value| (about 12.007) NumPy's legacy normal generator can return: its polar method
scales a coordinate x by sqrt(-2 ln(r) / r), r = x**2 + y**2 >= 2**-104 (53-bit uniforms)."""


def _check_gaussian_reach(cfg: RandomDataConfig) -> None:
    """Raise FlagError when gaussian draws can give an index outside a table.

    Indices are the draws clipped to [min, max] and truncated, so they run from trunc(clip(mu - z s))
    to trunc(clip(mu + z s)), z being the largest normal value the generator can return. A run
    whose draws cannot leave the table (a wide clip range but a narrow gaussian) is left alone."""
    mu, reach = cfg.gaussian_mu, _LARGEST_NORMAL * cfg.rand_sigma
    lowest, highest = (int(min(max(v, cfg.rand_min), cfg.rand_max)) for v in (mu - reach, mu + reach))
    rows = min(cfg.table_sizes, default=0)
    if highest >= rows and cfg.table_sizes:
        table = cfg.table_sizes.index(rows)
        raise FlagError(f"{{rand_max}}={cfg.rand_max:g} lets gaussian indices reach {highest}, but table "
                        f"{table} has {rows} rows (indices 0..{rows - 1}): lower {{rand_max}} "
                        f"(or {{rand_mu}} / {{rand_sigma}})")
    if lowest < 0:
        raise FlagError(f"{{rand_min}}={cfg.rand_min:g} lets gaussian indices reach {lowest}: "
                        f"indices must not be negative")
