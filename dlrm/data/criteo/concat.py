"""Stage 6: the processed days concatenated into ``<o_filename>.npz``, and --processed-data-file
made a name of it.

The day files' bytes are copied in the kernel when their layout allows it.
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Sequence

import numpy as np

from dlrm.data.criteo.config import ROWS_PER_CHUNK, CriteoPaths, PreprocessConfig, progress_bar, reusable
from dlrm.data.criteo.days import PROCESSED_MEMBERS
from dlrm.io import provenance
from dlrm.io.atomic import atomic_path, writing
from dlrm.io.npz import Member, NpzReader, NpzStreamWriter, load_npz_array


def concatenate(paths: CriteoPaths, day_rows: np.ndarray, progress: bool, record: dict) -> None:
    """Write ``<o_filename>.npz``: processed days one after another, plus ``counts``."""
    counts = load_npz_array(paths.fea_count_file(), "counts").astype(np.int32)
    writer = NpzStreamWriter(paths.output_file(), PROCESSED_MEMBERS, int(day_rows.sum()),
                             extras={"counts": counts})
    bar = progress_bar(progress, int(day_rows.sum()), "concatenate")
    with provenance.recording(paths.output_file(), record), writer, bar:
        for i in range(paths.days):
            with NpzReader(paths.processed_day(i)) as reader:
                rows = int(reader.shape("y")[0])
                if _same_layout(reader, PROCESSED_MEMBERS):
                    writer.copy_members([reader.stored(m.key) for m in PROCESSED_MEMBERS], rows)
                    bar.update(rows)
                    continue
                for start in range(0, rows, ROWS_PER_CHUNK):
                    stop = min(rows, start + ROWS_PER_CHUNK)
                    writer.append(*(reader.rows(k, start, stop) for k in ("X_cat", "X_int", "y")))
                    bar.update(stop - start)


def _same_layout(reader: NpzReader, members: Sequence[Member]) -> bool:
    """Whether every member is stored uncompressed, C-order, with the dtype and width wanted
    (so its bytes can be copied as they are)."""
    for member in members:
        info = reader.stored(member.key)
        if info is None or info.fortran_order or info.dtype != np.dtype(member.dtype):
            return False
        if info.shape[1:] != ((member.width,) if member.width else ()):
            return False
    return True


def link_processed_name(cfg: PreprocessConfig, paths: CriteoPaths, record: dict,
                        log: Callable[[str], None]) -> str:
    """Make --processed-data-file name the output too: a hard link, or a copy where links are not
    possible; return the file to read. (The reference never writes that name, so its first run
    trains on its own output name and later runs on --processed-data-file: two different files
    if the names differ.)"""
    target, output = cfg.processed_data_file, paths.output_file()
    if not target or os.path.abspath(target) == os.path.abspath(output):
        return output
    if reusable([target], record, "the link to the output", log)[0]:
        return target
    with provenance.recording(target, record), writing(target):
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        with atomic_path(target) as tmp:
            try:
                os.link(output, tmp)
            except OSError:
                shutil.copyfile(output, tmp)
    return target
