"""What preprocessing is asked to do (:class:`PreprocessConfig`), the names of the files it writes
(:class:`CriteoPaths`), and the helpers every stage shares.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from dlrm.common import FlagError, check_number
from dlrm.io import provenance
from dlrm.outputs.metrics import stderr_is_terminal

ROWS_PER_CHUNK = 1 << 18  # rows per read/write of npz data
RANDOMIZE_CHOICES = ("total", "day", "none")
SPLIT_CHOICES = ("train", "test", "val", "none")


@dataclass(frozen=True)
class CriteoPaths:
    """File names derived from (--data-set, --raw-data-file), as the reference derives them.

    Attributes:
        d_path: directory of the raw file, with a trailing "/" ("./" for a bare file name).
        d_file: Kaggle: the raw basename up to its first "."; Terabyte: the whole basename.
        npzfile: stem of the per-day files (Kaggle: d_path + d_file + "_day"; Terabyte: d_path + d_file).
        days: 7 (Kaggle) or 24 (Terabyte).
        o_filename: base name of the concatenated output.
    """

    d_path: str
    d_file: str
    npzfile: str
    days: int
    o_filename: str

    def day_count_file(self) -> str:
        return f"{self.d_path}{self.d_file}_day_count.npz"

    def fea_count_file(self) -> str:
        return f"{self.d_path}{self.d_file}_fea_count.npz"

    def fea_dict_file(self, j: int) -> str:
        return f"{self.d_path}{self.d_file}_fea_dict_{j}.npz"

    def parsed_day(self, i: int) -> str:
        return f"{self.npzfile}_{i}.npz"

    def processed_day(self, i: int) -> str:
        return f"{self.npzfile}_{i}_processed.npz"

    def intermediate_day(self, j: int, part: str) -> str:
        """``part`` is "y" (labels), "d" (dense) or "s" (sparse ids)."""
        return f"{self.npzfile}_{j}_intermediate_{part}.npy"

    def reordered_day(self, i: int) -> str:
        return f"{self.npzfile}_{i}_reordered.npz"

    def output_file(self) -> str:
        return f"{self.d_path}{self.o_filename}.npz"


def criteo_paths(data_set: str, raw_data_file: str) -> CriteoPaths:
    """Derive every file name of the pipeline from the data set and the raw file.

    ``./input/train.txt`` (kaggle) gives day files ``./input/train_day_<i>...``; ``./input/day``
    (terabyte) gives ``./input/day_<i>...``.
    """
    if data_set not in ("kaggle", "terabyte"):
        raise FlagError(f"{{data_set}} must be kaggle or terabyte, got {data_set!r}")
    if not raw_data_file:
        raise FlagError("{raw_data_file} is required for the Criteo data sets")
    d_path = (os.path.dirname(raw_data_file) or ".") + "/"
    base = os.path.basename(raw_data_file)
    if data_set == "kaggle":
        d_file = base.split(".")[0]
        return CriteoPaths(d_path, d_file, d_path + d_file + "_day", 7,
                           "kaggleAdDisplayChallenge_processed")
    return CriteoPaths(d_path, base, d_path + base, 24, "terabyte_processed")


def check_sub_sample_rate(rate: float) -> None:
    """Raise FlagError unless ``rate`` (the share of negative samples dropped) is in [0, 1]."""
    check_number("sub_sample_rate", rate, 0.0)
    if rate > 1:
        raise FlagError(f"{{sub_sample_rate}} must be in [0, 1], got {rate:g}")


@dataclass(frozen=True)
class PreprocessConfig:
    """What to preprocess and how (the reference's data flags).

    ``data_split`` is the reference's internal split argument; only "none" changes anything
    (memory-map shuffle: every day, the last included, is shuffled across all days). ``seed``
    (--numpy-rand-seed) seeds the NumPy stream that sub-sampling and the memory-map shuffle draw
    from.
    """

    data_set: str
    raw_data_file: str
    processed_data_file: str = ""
    max_ind_range: int = -1
    sub_sample_rate: float = 0.0
    randomize: str = "total"
    memory_map: bool = False
    multiprocessing: bool = False
    progress: bool = True
    data_split: str = "train"
    seed: int = 123

    def __post_init__(self):
        """Raise FlagError for a value that cannot work, naming its flag (the parser's ``dest``)."""
        if self.randomize not in RANDOMIZE_CHOICES:
            raise FlagError(f"{{randomize}} must be total, day or none, got {self.randomize!r}")
        check_sub_sample_rate(self.sub_sample_rate)
        if self.data_split not in SPLIT_CHOICES:
            raise FlagError(f"{{data_split}} must be one of {', '.join(SPLIT_CHOICES)}, got {self.data_split!r}")
        criteo_paths(self.data_set, self.raw_data_file)  # --data-set and --raw-data-file

    @property
    def paths(self) -> CriteoPaths:
        """Every file name of the pipeline (:func:`criteo_paths`)."""
        return criteo_paths(self.data_set, self.raw_data_file)


def raw_dtype(cfg: PreprocessConfig) -> np.dtype:
    """dtype of raw hashes in parsed days and dictionaries: int32 (as the reference) when
    --max-ind-range keeps them below 2**31, else uint32, which holds every 8-hex-digit hash
    (the reference stores int32, which overflows, or on NumPy 2 raises, for hashes >= 2**31)."""
    return np.dtype(np.int32 if 0 < cfg.max_ind_range <= 2**31 else np.uint32)


def progress_bar(progress: bool, total: Optional[int], desc: str, unit: str = "lines") -> tqdm:
    """A tqdm progress bar on stderr when it is a terminal, or a disabled one."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True,
                disable=not (progress and stderr_is_terminal()),
                file=sys.stderr, dynamic_ncols=True, leave=False)


def reusable(files: Sequence[str], record: dict, stage: str,
             log: Callable[[str], None]) -> List[bool]:
    """Which of ``files`` exist and were made as ``record`` says; one note (the first reason) when
    an existing one was not, so the stage is redone."""
    usable, told = [], False
    for path in files:
        reason = provenance.mismatch(path, record) if os.path.exists(path) else None
        usable.append(os.path.exists(path) and reason is None)
        if reason and not told:
            log(f"note: {path} {reason}; redoing {stage}")
            told = True
    return usable
