"""Criteo preprocessing: raw tab-separated text to the reference's npz files.

This module runs the stages in order and decides which files are reused (:func:`preprocess_criteo`).
Its command line is the front door ``data_utils.py`` (:mod:`.command`). The stages' code:
:mod:`.text` (day ranges, blocks) and :mod:`.parse` (stage 1 and the parsing of 2),
:mod:`.dictionary` and :mod:`.days` (2 to 5, :mod:`.pool` for worker processes), :mod:`.concat` (6),
:mod:`.shuffle` (7); :mod:`.config` names the files, :mod:`.lock` makes runs take turns.

Stages, each resumable (its outputs are written under a temporary name and renamed when
complete, so a file with a final name is always whole, and then get a provenance record; see
"Reuse" below):

    1. split    day line ranges: Kaggle's ``train.txt`` is cut into 7 consecutive parts (N//7
                lines, the first N%7 parts one longer); Terabyte has one file per day
    2. parse    ``<npzfile>_<i>.npz``            X_cat_t (26,n) raw hashes, X_int (n,13) int32, y (n,) int32
    3. counts   ``<d_file>_day_count.npz``      total_per_file (lines kept per day)
    4. dicts    ``<d_file>_fea_dict_<j>.npz``   unique: raw values in id order (first seen, days in order)
                ``<d_file>_fea_count.npz``      counts (26,) int32
    5. ids      ``<npzfile>_<i>_processed.npz`` X_cat (n,26) int32 ids, X_int clamped at 0, y
    6. concat   ``<o_filename>.npz``            X_cat, X_int, y, counts   (not with --memory-map)
    7. shuffle  ``<npzfile>_<j>_intermediate_{y,d,s}.npy`` then ``<npzfile>_<j>_reordered.npz``
                (--memory-map only; the reference's two-pass "Fisher-Yates-Rao" shuffle)

Stages 2, 4 and 5 run fused, each day read once (see :mod:`.days`).

Speed: raw text is read in 8 MiB blocks; a second thread parses a block with pyarrow's CSV reader
and converts it while the main thread maps the previous one to ids and writes it. Hex hashes are
converted only for each block's distinct values; ids come from a sorted-array dictionary (binary
search); npz files are written uncompressed and streamed straight into their zip members, so no
day is ever held in memory; the concatenation copies the day files' bytes in the kernel.

Memory (peak, sequential): about 110 MB above the imports for block buffers, plus about 40 bytes
per distinct categorical value (the dictionaries, with merge temporaries). Stage 7 adds a
permutation of 8 bytes per row of the largest day, and pass 2 reads its bucket through a
read-only memory map (page cache the kernel can reclaim, but counted in RSS: up to 216 bytes per
row of the largest day). With --dataset-multiprocessing each worker holds block buffers and, while
mapping ids, its own copy of the dictionaries.

Disk, per kept line: parsed days 160 B, processed days 160 B, concatenated output 160 B; with
--memory-map instead of the output, intermediates 216 B and reordered days 216 B. Dictionaries:
4 B per distinct value. Raw hashes are stored as uint32 (int32, as the reference, when
0 < --max-ind-range <= 2**31). The text part files of the reference (``<npzfile>_0`` .. ``_6``)
are not written: days are read from their byte ranges of ``train.txt``.

The NumPy random stream (seeded with --numpy-rand-seed) is drawn from in the reference's order:
one uniform per raw line of each day when sub-sampling, then (memory-map, randomize total) each
day's bucket draws (one per row, the last day's too, then the re-draws of rows whose bucket was
full), then one permutation per shuffled bucket. When
a run resumes, draws of stages that already completed are replayed, so a resumed run writes the
same files as an uninterrupted one; when everything is complete nothing is drawn.

Reuse: the reference reuses any file that has the right name. Here every file gets a provenance
record (``<file>.provenance.json``, see provenance.py: the raw files' identity, the options that
change the file, the format version), and a stage's file is reused only when its record matches
this run; otherwise the stage is redone, with one note per stage saying why. Two runs on one directory
take turns: the second waits for the first (a lock on ``.dlrm-preprocess.lock`` there, removed
when the first is done) and then reuses its files, so no run removes another's files in flight. Files without a
record (made by the reference or an older version) are never reused, except an existing
--processed-data-file (the user named it; the loaders check its values when they open it) and,
when the raw data is missing, the final files (they are all there is). Raw values the model cannot
take are errors naming the file and line: a label other than 0 or 1 (an empty label reads as 0,
as in the reference), an empty line (the reference crashes on one; skipping it would move the
day boundaries, which come from the line count), an empty file.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np

from dlrm.common import ConfigError, DataError, Interrupted
from dlrm.data.criteo.concat import concatenate, link_processed_name
from dlrm.data.criteo.config import CriteoPaths, PreprocessConfig, raw_dtype, reusable
from dlrm.data.criteo.days import DayPlan, advance_uniforms, categorify, plan_days, write_day_counts
from dlrm.data.criteo.dictionary import dictionary_files
from dlrm.data.criteo.lock import preprocessing_lock
from dlrm.data.criteo.schema import NUM_DENSE, NUM_SPARSE
from dlrm.data.criteo.shuffle import plan_shuffle, shuffle_pass1, shuffle_pass2
from dlrm.data.criteo.text import TextRange, day_ranges, missing_raw_data, raw_files
from dlrm.io import provenance
from dlrm.io.atomic import atomic_open, remove_stale_temps, writing
from dlrm.io.npz import npz_rows

__all__ = ["preprocess_criteo", "processed_data_ready"]


def _estimate_disk_need(cfg: PreprocessConfig, plan: DayPlan, lines: List[int],
                        output_done: bool) -> int:
    """Bytes the remaining stages will write (upper bound: every line kept)."""
    parsed_row = 4 + 4 * NUM_DENSE + raw_dtype(cfg).itemsize * NUM_SPARSE
    processed_row = 4 + 4 * NUM_DENSE + 4 * NUM_SPARSE
    need = 0
    for i, count in enumerate(lines):
        writes_parsed = plan.from_text[i] and plan.write_parsed[i]
        need += count * (parsed_row * writes_parsed + processed_row * plan.write_processed[i])
    total = sum(lines)
    if cfg.memory_map:
        need += total * 2 * (8 + 8 * NUM_DENSE + 4 * NUM_SPARSE)
    elif not output_done:
        need += total * processed_row
    return need + (64 << 20)


def _check_disk_space(cfg, paths, plan, lines: List[int], output_done: bool) -> None:
    directory = os.path.abspath(paths.d_path)
    need = _estimate_disk_need(cfg, plan, lines, output_done)
    free = shutil.disk_usage(directory).free
    if need > free:
        raise DataError(f"{directory}: not enough free disk space for preprocessing: need about "
                        f"{need} bytes, {free} free")


def _line_estimates(ranges: Optional[List[TextRange]], paths: CriteoPaths,
                    plan: DayPlan) -> List[int]:
    """Lines per day: counted in the raw text, else rows of the reusable day files."""
    if ranges is not None:
        return [text.lines for text in ranges]
    return [npz_rows(paths.parsed_day(i) if plan.write_processed[i] else paths.processed_day(i))
            for i in range(paths.days)]


@dataclass(frozen=True)
class _Records:
    """The provenance records this run's files must carry (see provenance.py).

    ``parse``: parsed and processed days, dictionaries, counts, the concatenated output and its
    --processed-data-file name; ``shuffle``: the memory-map intermediates and reordered days.
    """

    parse: dict
    shuffle: dict


def _records(cfg: PreprocessConfig, paths: CriteoPaths,
             source: Optional[List[dict]] = None) -> _Records:
    """The records of this run's files: ``source`` identifies the raw files (computed from them
    when not given). Only options that change a stage's files are part of its record: the seed
    only where that stage draws (sub-sampling; the shuffle unless randomize is none),
    --data-randomize only in the shuffle's."""
    if source is None:
        source = [provenance.identity(path) for path in raw_files(cfg, paths)]
    parse = {"--data-set": cfg.data_set, "--max-ind-range": cfg.max_ind_range,
             "--data-sub-sample-rate": cfg.sub_sample_rate,
             "--numpy-rand-seed": cfg.seed if cfg.sub_sample_rate > 0 else None}
    shuffle = dict(parse, **{"--data-randomize": cfg.randomize, "data split": cfg.data_split})
    if cfg.randomize != "none":
        shuffle["--numpy-rand-seed"] = cfg.seed
    if cfg.randomize == "total":  # files of versions that drew pass 1 in another order are redone
        shuffle["bucket draws"] = "per day, then re-draws"
    return _Records(provenance.expected(source, parse), provenance.expected(source, shuffle))


def _stream(cfg: PreprocessConfig, rng: Optional[np.random.RandomState]) -> np.random.RandomState:
    """The stream to draw from: a fresh one seeded with --numpy-rand-seed, or ``rng`` if it is
    in that very state (the records name the seed, so the draws must follow from it)."""
    seeded = np.random.RandomState(cfg.seed)
    if rng is None:
        return seeded
    mine, theirs = seeded.get_state(), rng.get_state()
    if not (np.array_equal(mine[1], theirs[1]) and mine[2:] == theirs[2:]):
        raise ConfigError(f"the NumPy stream given to the preprocessing is not a fresh one seeded "
                          f"with --numpy-rand-seed={cfg.seed}")
    return rng


def _final_files(cfg: PreprocessConfig, paths: CriteoPaths,
                 records: _Records) -> List[Tuple[str, dict]]:
    """What the loaders read, each with the record it must carry: memory-map: the reordered days
    and both count files; otherwise the concatenated output and the day counts."""
    if cfg.memory_map:
        return ([(paths.reordered_day(i), records.shuffle) for i in range(paths.days)]
                + [(paths.day_count_file(), records.parse), (paths.fea_count_file(), records.parse)])
    return [(paths.output_file(), records.parse), (paths.day_count_file(), records.parse)]


def _complete(cfg: PreprocessConfig, paths: CriteoPaths, records: _Records) -> bool:
    return all(provenance.reusable(path, wanted)
               for path, wanted in _final_files(cfg, paths, records))


def _named_file_as_it_is(cfg: PreprocessConfig, log: Callable[[str], None]) -> Optional[str]:
    """--processed-data-file when it exists without a provenance record (made by the reference or
    an older version): used as it is, because the user named it (the loaders check its values
    when they open it)."""
    named = cfg.processed_data_file
    if cfg.memory_map or not named or not os.path.exists(named) or provenance.read(named) is not None:
        return None
    log(f"note: using {named} as it is: it {provenance.NO_RECORD}, and you named it with "
        "--processed-data-file; delete it to preprocess again")
    return named


def _without_raw_data(cfg: PreprocessConfig, paths: CriteoPaths, missing: DataError,
                      log: Callable[[str], None]) -> str:
    """The raw data is gone: the final files are used as they are if they all exist and those
    with a record were made with this run's options; else ``missing`` is raised."""
    records = _records(cfg, paths, source=[])
    files = _final_files(cfg, paths, records)
    named = cfg.processed_data_file
    if not cfg.memory_map and named and os.path.exists(named):
        files[0] = (named, records.parse)
    if not all(os.path.exists(path) for path, _ in files):
        raise missing
    for path, wanted in files:
        reason = provenance.mismatch(path, wanted, check_source=False)
        if reason and reason != provenance.NO_RECORD:
            raise DataError(f"{path} {reason}; the raw data to make it again is missing: {missing}")
    read = paths.npzfile + "_*_reordered.npz" if cfg.memory_map else files[0][0]
    log(f"note: the raw data is missing; using {read} as it is (what it was made from cannot be "
        "checked)")
    return paths.npzfile if cfg.memory_map else files[0][0]


def _check_writable(directory: str, why: str) -> None:
    """DataError naming ``directory`` unless a file can be created there."""
    probe = os.path.join(directory, ".dlrm-write-test")
    try:
        remove_stale_temps(probe)
        with atomic_open(probe):
            pass
        os.remove(probe)
    except OSError as err:
        raise DataError(f"{directory}: cannot write there ({err.strerror or err}); {why}") from None


def _pipeline_files(cfg: PreprocessConfig, paths: CriteoPaths) -> List[str]:
    """Every file preprocessing may write."""
    files = [paths.day_count_file(), paths.output_file(), cfg.processed_data_file or None]
    files += dictionary_files(paths)
    for i in range(paths.days):
        files += [paths.parsed_day(i), paths.processed_day(i), paths.reordered_day(i)]
        files += [paths.intermediate_day(i, part) for part in ("y", "d", "s")]
    return [path for path in files if path]


def _prepare_directory(cfg: PreprocessConfig, paths: CriteoPaths) -> None:
    """Fail at once (before any parsing) when the data directory, or the one of
    --processed-data-file, cannot be written."""
    _check_writable(os.path.abspath(paths.d_path), "preprocessing writes its files beside the "
                                                    "raw data")
    if cfg.processed_data_file and not cfg.memory_map:
        directory = os.path.dirname(os.path.abspath(cfg.processed_data_file))
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise DataError(f"{cfg.processed_data_file}: cannot write: {directory} is not a "
                            "directory")
        with writing(cfg.processed_data_file):
            os.makedirs(directory, exist_ok=True)
        _check_writable(directory, "the output is also written to --processed-data-file")


def _remove_stale_temps(cfg: PreprocessConfig, paths: CriteoPaths) -> None:
    """Remove the temporary files an interrupted run left beside the files it was writing."""
    for path in _pipeline_files(cfg, paths):
        with writing(path):
            remove_stale_temps(path)
            remove_stale_temps(provenance.record_path(path))


def processed_data_ready(cfg: PreprocessConfig) -> bool:
    """Whether ``preprocess_criteo(cfg, ...)`` would find everything done: the final files
    were made from the raw data as it is now, with these options (or --processed-data-file exists
    without a record, see ``preprocess_criteo``)."""
    paths = cfg.paths
    if missing_raw_data(cfg) is not None:
        return False
    named = cfg.processed_data_file
    if not cfg.memory_map and named and os.path.exists(named) and provenance.read(named) is None:
        return True
    records = _records(cfg, paths)
    ready = _complete(cfg, paths, records)
    if ready and named and not cfg.memory_map:
        return provenance.reusable(named, records.parse)
    return ready


def _replay_sub_sample_draws(cfg, paths, ranges, rng) -> None:
    """Draw the sub-sample uniforms of an already completed parse stage, so that later draws
    match an uninterrupted run (the raw files are there: their lines are counted)."""
    for text in ranges or day_ranges(cfg, paths):
        advance_uniforms(rng, text.lines)


def preprocess_criteo(cfg: PreprocessConfig, log: Callable[[str], None],
                      rng: Optional[np.random.RandomState] = None) -> str:
    """Run every preprocessing stage whose files cannot be reused; return the file to read.

    That is, without memory-map, --processed-data-file when given (made a name of the output),
    else the concatenated ``<d_path><o_filename>.npz``; with memory-map, the ``npzfile`` stem (as
    the reference's getCriteoAdData returns). Notes go to ``log``. The draws (see the module
    docstring) come from a NumPy stream seeded with ``cfg.seed``, the same draws the reference
    made from its global stream, which preprocessing was the first to use; ``rng``, when given,
    is that stream (a test can then count the draws) and must still be as freshly seeded.

    Reuse: a file is reused only when its provenance record (provenance.py) says it was made from
    the raw files as they are now, with the options of this run that change it, in this format;
    otherwise its stage is redone, with a note saying why. Files without a record (made by the
    reference or an older version) are never reused, with two exceptions: an existing
    --processed-data-file (the user named it), and the final files when the raw data is missing
    (then they are all there is; those with a record must still match the options).
    Resumable; each file appears atomically, its record after it. One run at a time per
    directory: a run that finds another preprocessing there waits for it (one note), then
    reuses what it made. Raises ConfigError for bad settings, DataError for missing, malformed or
    unwritable data, and passes on a signal's Interrupted saying what is kept.
    """
    try:
        return _preprocess(cfg, log, rng)
    except Interrupted as exc:
        raise exc.during(f"preprocessing {cfg.raw_data_file}").keeping(
            "the preprocessed files finished so far (the next run goes on from them)")


def _preprocess(cfg: PreprocessConfig, log: Callable[[str], None],
                rng: Optional[np.random.RandomState]) -> str:
    paths = cfg.paths
    rng = _stream(cfg, rng)
    with preprocessing_lock(cfg, paths, log):
        return _preprocess_locked(cfg, paths, rng, log)


def _preprocess_locked(cfg: PreprocessConfig, paths: CriteoPaths, rng: np.random.RandomState,
                log: Callable[[str], None]) -> str:
    """``preprocess_criteo`` once no other run writes in its directories."""
    _remove_stale_temps(cfg, paths)
    missing = missing_raw_data(cfg)
    if missing is not None:
        return _without_raw_data(cfg, paths, missing, log)
    named = _named_file_as_it_is(cfg, log)
    if named:
        return named
    records = _records(cfg, paths)
    if _complete(cfg, paths, records):
        return _finish(cfg, paths, records, log)
    _prepare_directory(cfg, paths)
    plan = plan_days(paths, records.parse, log)
    shuffle = plan_shuffle(cfg, paths, records.shuffle, log)
    ranges = day_ranges(cfg, paths) if plan.any_text else None
    output_done = provenance.reusable(paths.output_file(), records.parse)
    _check_disk_space(cfg, paths, plan, _line_estimates(ranges, paths, plan), output_done)
    if plan.any_work:
        categorify(cfg, paths, plan, ranges, rng)
    if not plan.any_text and cfg.sub_sample_rate > 0 and shuffle.draws_needed(cfg, paths.days):
        _replay_sub_sample_draws(cfg, paths, ranges, rng)
    day_rows = write_day_counts(paths, records.parse, log)
    if not cfg.memory_map:
        if not reusable([paths.output_file()], records.parse, "the concatenation", log)[0]:
            concatenate(paths, day_rows, cfg.progress, records.parse)
        return _finish(cfg, paths, records, log)
    if shuffle.pass1 or (cfg.randomize == "total" and shuffle.draws_needed(cfg, paths.days)):
        shuffle_pass1(paths, day_rows, cfg, rng, not shuffle.pass1, records.shuffle)
    shuffle_pass2(paths, day_rows, cfg, rng, shuffle)
    return paths.npzfile


def _finish(cfg: PreprocessConfig, paths: CriteoPaths, records: _Records,
            log: Callable[[str], None]) -> str:
    if cfg.memory_map:
        return paths.npzfile
    return link_processed_name(cfg, paths, records.parse, log)
