"""The MLPerf binary files: packed rows as little-endian int32, no header, one file per split.

``<processed stem>_{train,test,val}.bin``: train holds days 0..D-2, test the first ceil(n/2) rows
of day D-1, val its remaining rows. They are rewritten unless their provenance records say they
were made from the reordered day files as they are now.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Callable, Dict, Mapping, Optional, Sequence

import numpy as np
from torch.utils.data import Dataset
from tqdm import tqdm

from dlrm.common import Batch, DataError, first_line, non_regular_kind
from dlrm.data.criteo.config import PreprocessConfig
from dlrm.data.criteo.row_cache import derived_record, npz_row_count, read_npz_rows
from dlrm.data.criteo.rows import check_values, rows_to_batch, split_rows
from dlrm.data.criteo.schema import NUM_FIELDS, RECORD_BYTES
from dlrm.data.criteo.text import missing_raw_data
from dlrm.io import provenance
from dlrm.io.atomic import remove_stale_temps, writing
from dlrm.io.npz import AppendWriter
from dlrm.outputs.metrics import stderr_is_terminal

SPLITS = ("train", "test", "val")


class CriteoBinDataset(Dataset):
    """MLPerf binary file reader: item k is batch k, read through a memory map.

    Args:
        path: file of 160-byte records [y, X_int(M), X_cat(T)] as little-endian int32, no header.
        batch_size: B; the last batch is partial.
        max_ind_range: sparse ids are taken modulo it when > 0.
        counts: (T,) table sizes stored with the data; when given, every record is checked once,
            here (``check_values``), so a bad value is an error at open, never an IndexError in
            the middle of training. Give it for files from elsewhere (without a provenance
            record); the files ``write_criteo_bins`` writes hold checked values.
    Attributes:
        num_samples: records in the file (the reference's class has no such attribute, though its
            callers read one).
    """

    def __init__(self, path: str, batch_size: int, max_ind_range: int = -1,
                 counts: Optional[np.ndarray] = None):
        try:
            status = os.stat(path)
        except OSError:
            raise DataError(f"{path}: file not found") from None
        size, kind = status.st_size, non_regular_kind(status.st_mode)
        if kind is not None:
            raise DataError(f"{path}: is {kind}, not a binary data file")
        if size % RECORD_BYTES:
            raise DataError(f"{path}: size {size} bytes is not a multiple of the "
                            f"{RECORD_BYTES}-byte record")
        self.path = path
        self.batch_size = batch_size
        self.max_ind_range = max_ind_range
        self.num_samples = size // RECORD_BYTES
        self._records: Optional[np.ndarray] = None
        records = self.records()  # mapped now: a file removed during training is still read
        if counts is not None:
            check_values(lambda start, stop: split_rows(records[start:stop]), 0,
                         self.num_samples, counts, path)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_records": None}

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def records(self) -> np.ndarray:
        """All records as a read-only (n, R) int32 memory map."""
        if self._records is None:
            if self.num_samples == 0:
                self._records = np.empty((0, NUM_FIELDS), "<i4")
            else:
                try:
                    self._records = np.memmap(self.path, dtype="<i4", mode="r",
                                              shape=(self.num_samples, NUM_FIELDS))
                except OSError as err:
                    raise DataError(f"{self.path}: cannot read ({first_line(err)})") from None
        return self._records

    def __getitem__(self, k: int) -> Batch:
        if not 0 <= k < len(self):
            raise IndexError(f"batch {k} out of range 0..{len(self) - 1}")
        rows = self.records()[k * self.batch_size:(k + 1) * self.batch_size]
        return rows_to_batch(rows, self.max_ind_range)


def bin_record(day_files: Sequence[str], split: str) -> dict:
    """The provenance record of a binary file: train is made from days 0..D-2, test and val from
    day D-1."""
    return derived_record(day_files[:-1] if split == "train" else day_files[-1:])


def write_criteo_bins(day_files: Sequence[str], outputs: Mapping[str, str],
                      progress: bool = True) -> None:
    """Write MLPerf binary files from the reordered day files, each atomically.

    Args:
        day_files: the D reordered npz files, in day order.
        outputs: split -> path for the files to write: "train" = days 0..D-2 concatenated,
            "test" = the first ceil(n/2) rows of day D-1, "val" = its remaining rows. Each gets
            a provenance record naming the day files it was made from (``bin_record``).
    """
    bar = tqdm(unit="rows", desc="writing binary files", disable=not (progress and stderr_is_terminal()),
               file=sys.stderr)
    with bar, contextlib.ExitStack() as stack:
        files = {}
        for split, path in outputs.items():
            with writing(path):
                remove_stale_temps(path)
            stack.enter_context(provenance.recording(path, bin_record(day_files, split)))
            files[split] = stack.enter_context(AppendWriter(path))
        if "train" in files:
            for day_file in day_files[:-1]:
                for rows in read_npz_rows(day_file):
                    files["train"].append(rows.astype("<i4", copy=False))
                    bar.update(rows.shape[0])
        if "test" in files or "val" in files:
            n_test = math.ceil(npz_row_count(day_files[-1]) / 2)
            written = 0
            for rows in read_npz_rows(day_files[-1]):
                cut = min(max(n_test - written, 0), rows.shape[0])
                for split, part in (("test", rows[:cut]), ("val", rows[cut:])):
                    if split in files:
                        files[split].append(part.astype("<i4", copy=False))
                written += rows.shape[0]
                bar.update(rows.shape[0])


def bin_file_paths(processed_data_file: str) -> Dict[str, str]:
    """split -> ``<dir(processed)>/<stem(processed)>_<split>.bin``, the reference's names."""
    stem = os.path.splitext(processed_data_file)[0]
    return {split: f"{stem}_{split}.bin" for split in SPLITS}


def unchecked(path: str, sources: Sequence[str]) -> bool:
    """Whether the values of ``path`` were never checked: it has no provenance record, or was
    made from ``sources`` of which one has none (a binary file written from reference-made day
    files)."""
    return provenance.read(path) is None or any(
        os.path.exists(source) and provenance.read(source) is None for source in sources)


def bins_alone(cfg: PreprocessConfig, day_files: Sequence[str], needed: Sequence[str]) -> bool:
    """Whether the binary files (and counts) are all there is: no raw data, no day files."""
    return (missing_raw_data(cfg) is not None
            and not all(os.path.exists(path) for path in day_files)
            and all(os.path.exists(path) for path in needed))


def write_stale_bins(day_files: Sequence[str], files: Mapping[str, str], progress: bool,
                     log: Callable[[str], None]) -> None:
    """Write the binary files that are missing or were not made from ``day_files`` as they are."""
    stale = {}
    for split, path in files.items():
        reason = (provenance.mismatch(path, bin_record(day_files, split))
                  if os.path.exists(path) else None)
        if reason:
            log(f"note: {path} {reason}; writing it again")
        if reason or not os.path.exists(path):
            stale[split] = path
    if stale:
        log(f"Writing binary files {', '.join(stale.values())}")
        write_criteo_bins(day_files, stale, progress)
