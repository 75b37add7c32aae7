"""Trace-based synthetic embedding indices and the trace-profiling tool.

A *trace* is a sequence of line addresses (embedding rows). Profiling a trace measures the LRU
stack distance of every access: 0 for the first access to an address (a "new reference"), else
1 + the number of distinct addresses touched since its previous access. The result is stored as a
three-line *distribution file*; generation draws stack distances from that distribution and replays
them against an LRU stack to produce a synthetic trace with the same reuse behaviour.

Files (text, values separated by comma + space, as the reference's shipped ``input/*.log``)::

    1, 2, 3, 4, 5, 6              <- line 1: unique addresses in first-appearance order
    0, 1, 3, 4, 5                 <- line 2: sorted distinct stack distances
    0.55, 0.64, 0.82, 0.91, 1.0   <- line 3: cumulative probability of each distance

A trace file is one such line (``1, 2, 3, 4, 5, 3, 4, 1, 1, 6, 3``) or raw little-endian uint64.

Standalone use (``python dlrm_data_pytorch.py`` runs :func:`trace_main`)::

    python dlrm_data_pytorch.py --trace-file=./input/trace.log --dist-file=./input/dist.log \\
        --synthetic-file=./input/trace_synthetic.log

Randomness: every draw comes from an explicit ``np.random.RandomState`` in the reference's order:
one uniform per generated access, and for a batch: dense ``rand(B, M)``, then per table and sample a
bag-size ``random_sample(1)`` (unless fixed) followed by the bag's trace draws, then targets
``rand(B, 1)``.

Dimension vocabulary: B samples in a batch, M dense features, T tables, N_t indices of table t,
U unique line addresses, K distinct stack distances, L trace length.
"""
from __future__ import annotations

import argparse
import bisect
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from dlrm.common import Batch, ConfigError, DataError, DLRMError, parse_bool
from dlrm.data.config import RandomDataConfig
from dlrm.io.atomic import atomic_open
from dlrm.io.path_collisions import NamedFile, check_collisions

_CDF_TOLERANCE = 1e-6  # how far the last cumulative probability may sit from 1.0
_PROGRESS_CHUNK = 1 << 16  # accesses between progress-bar updates


# ------------------------------------------------------------------------------------------------
# The distribution


def _address_array(values, what: str) -> np.ndarray:
    """Return integer addresses as int64, or uint64 when they exceed int64 (raw uint64 traces).

    Raises DataError for non-integer values or values outside both ranges.
    """
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "iu":
            raise DataError(f"{what} must be integers, got dtype {values.dtype}")
        return values.astype(np.uint64 if values.dtype == np.uint64 else np.int64).reshape(-1)
    values = list(values)
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise DataError(f"{what} must be integers")
    for dtype in (np.int64, np.uint64):
        try:
            return np.array(values, dtype=dtype)
        except OverflowError:
            continue
    raise DataError(f"{what} do not fit in int64 or uint64")


def _distribution_problem(dist: "TraceDistribution") -> Optional[str]:
    """Return a one-line description of what makes ``dist`` unusable, or None if it is valid."""
    accesses, distances, cdf = dist.line_accesses, dist.distances, dist.cdf
    if accesses.size == 0:
        return "line accesses (line 1) are empty"
    if distances.size == 0 or distances.size != cdf.size:
        return (f"distances (line 2) and cdf (line 3) must be non-empty and of equal length, "
                f"got {distances.size} and {cdf.size}")
    if distances[0] != 0 or np.any(np.diff(distances) <= 0):
        return "distances (line 2) must start at 0 and be strictly increasing"
    if distances[-1] > accesses.size:
        return (f"largest stack distance {int(distances[-1])} exceeds the {accesses.size} "
                f"line addresses")
    if not np.all(np.isfinite(cdf)) or cdf[0] < 0 or np.any(np.diff(cdf) < 0):
        return "cdf (line 3) must be finite, non-negative and non-decreasing"
    if abs(cdf[-1] - 1.0) > _CDF_TOLERANCE:
        return f"cdf (line 3) must end at 1.0, got {cdf[-1]!r}"
    return None


@dataclass(frozen=True, eq=False)
class TraceDistribution:
    """A stack-distance distribution: the content of one distribution file.

    Construction converts the fields to arrays and raises DataError if they are inconsistent
    (distances must start at 0, increase strictly and not exceed U; the cdf must be non-decreasing
    and end at 1.0).

    Attributes:
        line_accesses: (U,) int64 (uint64 for addresses above 2**63 - 1); unique addresses in
            first-appearance order (line 1). Generation takes new references from its front.
        distances: (K,) int64 sorted distinct stack distances, starting at 0 (line 2).
        cdf: (K,) float64 cumulative probability of each distance (line 3).
    """

    line_accesses: np.ndarray
    distances: np.ndarray
    cdf: np.ndarray

    def __post_init__(self) -> None:
        accesses = _address_array(self.line_accesses, "line accesses")
        object.__setattr__(self, "line_accesses", accesses)
        distances = _address_array(self.distances, "distances")
        if distances.dtype != np.int64:
            raise DataError("distances (line 2) do not fit in int64")
        object.__setattr__(self, "distances", distances)
        object.__setattr__(self, "cdf", np.asarray(self.cdf, dtype=np.float64).reshape(-1))
        problem = _distribution_problem(self)
        if problem is not None:
            raise DataError(problem)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TraceDistribution):
            return NotImplemented
        return (np.array_equal(self.line_accesses, other.line_accesses)
                and np.array_equal(self.distances, other.distances)
                and np.array_equal(self.cdf, other.cdf))

    __hash__ = None  # mutable arrays inside: not hashable


# ------------------------------------------------------------------------------------------------
# Files


def _read_text(path: str) -> str:
    """Return the text of ``path``; DataError naming the file if it is missing or unreadable."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file (a binary trace needs "
                        f"--trace-file-binary-type)") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None


def _write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` under a temporary name and rename it over ``path``; DataError on failure."""
    try:
        with atomic_open(path) as handle:
            handle.write(data)
    except OSError as err:
        raise DataError(f"{path}: cannot write ({err.strerror})") from None


def _parse_line(line: str, convert: Callable[[str], object], kind: str,
                path: str, line_number: int) -> list:
    """Parse one comma-separated line of numbers; DataError naming file, line and bad value."""
    tokens = line.split(",")
    try:
        return [convert(token) for token in tokens]
    except ValueError:
        pass
    for token in tokens:
        try:
            convert(token)
        except ValueError:
            raise DataError(f"{path}:{line_number}: bad value {token.strip()!r} "
                            f"(expected {kind})") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _format_line(values: Iterable) -> str:
    """Comma + space list: integers as integers, floats in Python's shortest round-trip form."""
    return ", ".join(repr(float(v)) if isinstance(v, (float, np.floating)) else str(int(v))
                     for v in values)


def read_distribution(path: str) -> TraceDistribution:
    """Read a three-line distribution file (addresses / distances / cdf).

    Raises DataError naming the file (and line) if it is missing, malformed or inconsistent.
    """
    lines = _read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != 3:
        raise DataError(f"{path}: expected 3 lines (addresses, distances, cdf), found {len(lines)}")
    accesses = _parse_line(lines[0], int, "an integer address", path, 1)
    distances = _parse_line(lines[1], int, "an integer distance", path, 2)
    cdf = _parse_line(lines[2], float, "a probability", path, 3)
    try:
        return TraceDistribution(accesses, distances, cdf)
    except DataError as err:
        raise DataError(f"{path}: {err}") from None


def write_distribution(path: str, dist: TraceDistribution) -> None:
    """Write ``dist`` in the three-line text format :func:`read_distribution` reads (atomically)."""
    lines = [dist.line_accesses.tolist(), dist.distances.tolist(), dist.cdf.tolist()]
    text = "\n".join(_format_line(values) for values in lines) + "\n"
    _write_atomic(path, text.encode("utf-8"))


def _read_binary_trace(path: str) -> List[int]:
    """Read raw little-endian uint64 addresses."""
    try:
        size = os.path.getsize(path)
        if size % 8:
            raise DataError(f"{path}: size {size} bytes is not a multiple of 8 (raw uint64 trace)")
        return np.fromfile(path, dtype="<u8").tolist()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None


def read_trace(path: str, binary: bool = False) -> List[int]:
    """Read a trace: text ``a, b, c`` (any number of such lines) or raw uint64 when ``binary``.

    Returns the L addresses in order. Raises DataError naming the file (and line) if it is missing,
    malformed or holds no addresses.
    """
    if binary:
        trace = _read_binary_trace(path)
    else:
        trace = []
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            if line.strip():
                trace.extend(_parse_line(line, int, "an integer address", path, number))
    if not trace:
        raise DataError(f"{path}: holds no addresses")
    return trace


def write_trace(path: str, trace: Sequence[int]) -> None:
    """Write a trace as one comma + space separated text line (atomically)."""
    values = trace.tolist() if isinstance(trace, np.ndarray) else trace
    _write_atomic(path, (_format_line(values) + "\n").encode("utf-8"))


def distribution_paths(template: str, num_tables: int) -> List[str]:
    """Return the distribution file of each of the T tables: the LAST ``j`` of the file name
    (basename) replaced by the table number, e.g. ``./input/dist_emb_j.log`` ->
    ``./input/dist_emb_0.log``, ``./input/dist_emb_1.log``, ...

    The reference replaced every ``j`` in the whole path, so
    ``/home/joe/dist_emb_j.log`` pointed into ``/home/0oe/``. A name without ``j`` is used for
    every table.
    """
    directory, name = os.path.split(template)
    cut = name.rfind("j")
    if cut < 0:
        return [template] * num_tables
    return [os.path.join(directory, f"{name[:cut]}{t}{name[cut + 1:]}") for t in range(num_tables)]


# ------------------------------------------------------------------------------------------------
# Profiling


def _stack_distances(trace: Sequence[int], show_progress: bool) -> Tuple[list, np.ndarray]:
    """LRU stack distance of every access (0 = first access to an address).

    Equals the reference's stack walk (distance = stack length - position, then move to the top)
    but runs in O(L log L): a Fenwick tree over access times marks the latest access of every
    address, so the distance is 1 + the number of marks after the previous access.

    Returns:
        (line accesses in first-appearance order (U,), distances (L,) int64).
    """
    length = len(trace)
    tree = [0] * (length + 1)  # Fenwick tree over access times 1..L
    latest = {}  # address -> time of its latest access
    new_lines = []
    distances = np.zeros(length, dtype=np.int64)
    with tqdm(total=length, disable=not show_progress, desc="profiling", unit="access") as bar:
        for time, address in enumerate(trace, start=1):
            previous = latest.get(address)
            if previous is None:
                new_lines.append(address)
            else:
                marks_up_to, i = 0, previous
                while i > 0:
                    marks_up_to += tree[i]
                    i -= i & -i
                distances[time - 1] = len(latest) - marks_up_to + 1
                i = previous
                while i <= length:
                    tree[i] -= 1
                    i += i & -i
            i = time
            while i <= length:
                tree[i] += 1
                i += i & -i
            latest[address] = time
            if time % _PROGRESS_CHUNK == 0:
                bar.update(_PROGRESS_CHUNK)
        bar.update(length % _PROGRESS_CHUNK)
    return new_lines, distances


def profile_trace(trace: Sequence[int], enable_padding: bool = False, *,
                  show_progress: bool = False) -> TraceDistribution:
    """Measure the stack-distance distribution of a trace (the reference's standalone mode).

    Args:
        trace: (L,) integer addresses, L >= 1.
        enable_padding: add ceil(L / largest distance) extra distance-0 accesses to the empirical
            distribution (the reference crashed with this option; no padding when every
            access is new, where the reference would divide by zero).
        show_progress: tqdm bar on stderr.

    Returns:
        The distribution: addresses in first-appearance order, distinct distances, and
        cdf = cumulative count / total count (so the last value is exactly 1.0).
    """
    trace = trace.tolist() if isinstance(trace, np.ndarray) else list(trace)
    if not trace:
        raise DataError("cannot profile an empty trace")
    new_lines, distances = _stack_distances(trace, show_progress)
    values, counts = np.unique(distances, return_counts=True)  # values[0] == 0: first access
    if enable_padding and values[-1] > 0:
        counts[0] += math.ceil(len(trace) / int(values[-1]))
    cdf = np.cumsum(counts) / counts.sum()
    return TraceDistribution(new_lines, values, cdf)


# ------------------------------------------------------------------------------------------------
# Generation


class _LRUTraceGenerator:
    """Replays sampled stack distances against an LRU stack, one trace at a time.

    The reference keeps the full address list and rotates it. Because a distance never exceeds
    the number of new references made so far, only the first L addresses can be reached in a
    trace of length L, so this keeps those plus a recency list: same output, O(L) per trace.
    """

    def __init__(self, dist: TraceDistribution, enable_padding: bool) -> None:
        self.line_accesses = dist.line_accesses
        self.distances = dist.distances.tolist()
        self.cdf = dist.cdf.tolist()
        self.largest = self.distances[-1]
        self.enable_padding = enable_padding

    def distance(self, u: float, new_refs: int) -> int:
        """Stack distance for uniform ``u`` after ``new_refs`` new references in this trace."""
        if new_refs < self.largest:
            # only distances up to new_refs can be served: shrink u's range to their mass
            u = u * self.cdf[bisect.bisect_right(self.distances, new_refs) - 1]
        elif self.enable_padding:
            first = self.cdf[0]
            u = (1.0 - first) * u + first  # remap past the distance-0 (new reference) mass
        position = bisect.bisect_left(self.cdf, u)  # first cdf >= u
        return self.distances[min(position, len(self.distances) - 1)]

    def trace(self, uniforms: np.ndarray, bar: Optional[tqdm] = None) -> np.ndarray:
        """One trace: (L,) uniforms in [0, 1) -> (L,) addresses (dtype of the line accesses).

        ``bar``, if given, is advanced as accesses are generated.
        """
        unused = self.line_accesses[:len(uniforms)].tolist()
        recent = []  # addresses touched in this trace, least recently used first
        new_refs = 0
        out = []
        for step, u in enumerate(uniforms.tolist(), start=1):
            if bar is not None and step % _PROGRESS_CHUNK == 0:
                bar.update(_PROGRESS_CHUNK)
            distance = self.distance(u, new_refs)
            if distance == 0:  # new reference: front of the (rotated) address list
                address = unused[new_refs] if new_refs < len(unused) else recent.pop(0)
                new_refs += 1
            else:  # reuse: position l - distance of the list, i.e. distance-th most recent
                address = recent.pop(len(recent) - distance)
            recent.append(address)
            out.append(address)
        if bar is not None:
            bar.update(len(out) % _PROGRESS_CHUNK)
        return np.array(out, dtype=self.line_accesses.dtype)


def generate_lru_trace(rng: np.random.RandomState, dist: TraceDistribution, length: int,
                       enable_padding: bool = False) -> np.ndarray:
    """Generate a synthetic trace of ``length`` accesses from a stack-distance distribution.

    Draws exactly one uniform from ``rng`` per access (the reference's ``rand(1)`` per access;
    drawn here as one ``rand(length)``, which is the same stream).

    Args:
        rng: the NumPy legacy stream to draw from.
        dist: the distribution (new references are taken from ``dist.line_accesses`` in order).
        length: L, number of accesses.
        enable_padding: once the new references reach the largest distance, never draw
            distance 0 again (as the reference).

    Returns:
        (L,) addresses, int64 (uint64 for a uint64 distribution).
    """
    generator = _LRUTraceGenerator(dist, enable_padding)
    uniforms = rng.rand(length) if length > 0 else np.zeros(0)
    return generator.trace(uniforms)


def _bag_size(rng: np.random.RandomState, table_size: int, num_indices: int, fixed: bool) -> int:
    """Bag size, as the reference: k if fixed, else round-half-even(max(1, r * min(s, k)))."""
    if fixed:
        return num_indices
    r = rng.random_sample(1)[0]
    return int(np.round(max(1.0, r * min(table_size, num_indices))))


def _table_bags(rng: np.random.RandomState, generator: _LRUTraceGenerator, table: int,
                table_size: int, batch_size: int, num_indices: int, fixed: bool,
                log: Callable[[str], None]) -> List[np.ndarray]:
    """The B bags of one table: sorted unique trace addresses, taken modulo s if out of range."""
    bags = []
    for sample in range(batch_size):
        size = _bag_size(rng, table_size, num_indices, fixed)
        bag = np.unique(generator.trace(rng.rand(size)))
        if bag[0] < 0 or bag[-1] >= table_size:  # sorted: the ends are the extremes
            log(f"WARNING: table {table} sample {sample}: trace addresses outside "
                f"[0, {table_size}), taking them modulo {table_size}")
            bag = np.mod(bag, table_size)
        bags.append(bag.astype(np.int64))
    return bags


def _check_batch_config(batch_size: int, dense_dim: int, table_sizes: Sequence[int],
                        num_indices_per_lookup: int, distributions: Sequence) -> None:
    """ConfigError for shapes that cannot make a batch."""
    if batch_size < 1 or dense_dim < 0 or num_indices_per_lookup < 1:
        raise ConfigError(f"batch size {batch_size}, dense width {dense_dim} and indices per "
                          f"lookup {num_indices_per_lookup} must be >= 1, >= 0 and >= 1")
    if any(size < 1 for size in table_sizes):
        raise ConfigError(f"embedding table sizes must be >= 1, got {list(table_sizes)}")
    if len(distributions) != len(table_sizes):
        raise ConfigError(f"{len(distributions)} trace distributions for {len(table_sizes)} tables")


def generate_synthetic_batch(rng: np.random.RandomState, batch_size: int, cfg: "RandomDataConfig",
                             distributions: Sequence[TraceDistribution],
                             log: Callable[[str], None]) -> Batch:
    """One mini-batch of trace-based synthetic data, drawn as the reference draws it.

    Draw order (the reference's): dense ``rand(B, M)``; for each table t, for each sample: bag
    size (``random_sample(1)`` unless ``fixed``) then one uniform per trace access; targets
    ``rand(B, 1)``. Each bag is ``unique`` of a fresh LRU trace from table t's distribution; a bag
    with addresses outside [0, s_t) triggers one ``log("WARNING: ...")`` and is taken modulo s_t.

    Args:
        rng: the NumPy legacy stream (seeded by the caller with ``--numpy-rand-seed``).
        batch_size: B.
        cfg: what to draw: ``dense_dim`` (M), ``table_sizes`` (T rows s_t),
            ``num_indices_per_lookup`` (k, the bag size when ``fixed``, else its upper bound),
            ``trace_padding`` (see :func:`generate_lru_trace`) and ``round_targets`` (0/1 targets).
        distributions: (T,) one distribution per table, read once by the caller (the reference
            re-read the file for every sample).
        log: receives the out-of-range warnings.

    Returns:
        Batch with dense_x (B, M) float32, offsets (T, B) int64, indices a list of T (N_t,) int64
        tensors, labels (B, 1) float32.
    """
    _check_batch_config(batch_size, cfg.dense_dim, cfg.table_sizes, cfg.num_indices_per_lookup,
                        distributions)
    dense_x = rng.rand(batch_size, cfg.dense_dim).astype(np.float32)
    offsets = np.zeros((len(cfg.table_sizes), batch_size), dtype=np.int64)
    indices = []
    for table, (size, dist) in enumerate(zip(cfg.table_sizes, distributions)):
        generator = _LRUTraceGenerator(dist, cfg.trace_padding)
        bags = _table_bags(rng, generator, table, size, batch_size, cfg.num_indices_per_lookup,
                           cfg.fixed, log)
        offsets[table, 1:] = np.cumsum([len(bag) for bag in bags])[:-1]
        indices.append(torch.from_numpy(np.concatenate(bags)))
    labels = rng.rand(batch_size, 1).astype(np.float32)
    if cfg.round_targets:
        labels = np.round(labels)
    return Batch(torch.from_numpy(dense_x), torch.from_numpy(offsets), indices,
                 torch.from_numpy(labels))


# ------------------------------------------------------------------------------------------------
# Standalone tool


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{text} is negative")
    return value


def build_trace_parser() -> argparse.ArgumentParser:
    """The standalone tool's flags (the reference's spellings and defaults)."""
    parser = argparse.ArgumentParser(
        description="Profile a memory-access trace into a stack-distance distribution file, then "
                    "generate a synthetic LRU trace of the same length from it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--trace-file", dest="trace_file", default="./input/trace.log",
                        help="trace to profile: text 'a, b, c' or raw uint64 (see next flag)")
    parser.add_argument("--trace-file-binary-type", dest="binary_trace", type=parse_bool,
                        nargs="?", const=True, default=False, metavar="BOOL",
                        help="the trace file is raw little-endian uint64 (true/false)")
    parser.add_argument("--trace-enable-padding", dest="enable_padding", type=parse_bool,
                        nargs="?", const=True, default=False, metavar="BOOL",
                        help="pad the distribution with ceil(L / largest distance) new references "
                             "and stop drawing new references once all are possible (true/false)")
    parser.add_argument("--dist-file", dest="dist_file", default="./input/dist.log",
                        help="where to write the distribution (3 lines: addresses, distances, cdf)")
    parser.add_argument("--synthetic-file", dest="synthetic_file",
                        default="./input/trace_synthetic.log",
                        help="where to write the synthetic trace")
    parser.add_argument("--numpy-rand-seed", dest="seed", type=int, default=123,
                        help="seed of the NumPy RandomState used for generation")
    parser.add_argument("--print-precision", dest="print_precision", type=_non_negative_int,
                        default=5, help="digits of the cdf in the printed summary")
    parser.add_argument("--no-progress", dest="show_progress", action="store_false",
                        help="hide the progress bars (stderr)")
    return parser


def _summary(dist: TraceDistribution, length: int, precision: int) -> str:
    """Human-readable description of a profiled trace (stdout of the tool)."""
    cdf = np.array2string(dist.cdf, precision=precision, separator=", ")
    distances = np.array2string(dist.distances, separator=", ")
    return (f"profiled {length} accesses to {dist.line_accesses.size} unique addresses\n"
            f"stack distances: {distances}\ncdf: {cdf}")


def trace_main(argv: Optional[Sequence[str]] = None) -> int:
    """Profile ``--trace-file``, write ``--dist-file``, generate and write ``--synthetic-file``.

    Returns 0, or 2 after printing ``error: ...`` on stderr for a missing or malformed file.
    """
    args = build_trace_parser().parse_args(argv)
    try:
        check_collisions([NamedFile("--dist-file", args.dist_file), NamedFile("--synthetic-file", args.synthetic_file)],
                         [NamedFile("--trace-file", args.trace_file)])
        trace = read_trace(args.trace_file, binary=args.binary_trace)
        dist = profile_trace(trace, args.enable_padding, show_progress=args.show_progress)
        write_distribution(args.dist_file, dist)
        print(_summary(dist, len(trace), args.print_precision))
        rng = np.random.RandomState(args.seed)
        generator = _LRUTraceGenerator(dist, args.enable_padding)
        uniforms = rng.rand(len(trace))  # one per access, as generate_lru_trace draws them
        with tqdm(total=len(trace), disable=not args.show_progress, desc="generating",
                  unit="access") as bar:
            synthetic = generator.trace(uniforms, bar)
        write_trace(args.synthetic_file, synthetic)
    except DLRMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.dist_file} and {args.synthetic_file}")
    return 0

