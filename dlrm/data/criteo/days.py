"""Stages 2, 4 and 5, day by day: raw text (or a parsed day file) to parsed days, dictionaries and ids.

Sequentially they run fused: ids are given in first-seen order, so day i's ids are final as soon
as days 0..i have been read, and each day is read once. With ``--dataset-multiprocessing`` days
are parsed in worker processes (:mod:`.pool`), the per-day first-seen values are merged in day
order, and days are then mapped to ids in parallel; the files are the same. Every day file is
written as it is read (npz members streamed), so no day is ever held in memory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np

from dlrm.data.criteo.config import CriteoPaths, PreprocessConfig, progress_bar, raw_dtype, reusable
from dlrm.data.criteo.dictionary import (ColumnDictionary, check_no_growth, dictionary_files, load_dictionaries,
                                         save_dictionaries)
from dlrm.data.criteo.parse import Block
from dlrm.data.criteo.pool import run_pool
from dlrm.data.criteo.schema import NUM_DENSE, NUM_SPARSE
from dlrm.data.criteo.text import TextRange, iter_parsed_day, iter_text_day
from dlrm.io import provenance
from dlrm.io.npz import Member, NpzStreamWriter, npz_rows, save_npz


@dataclass(frozen=True)
class _DayJob:
    """What to do for one day (picklable, for worker processes).

    ``text`` set: read the raw text (and write the parsed day when ``write_parsed``); otherwise
    read the parsed day file. ``write_processed``: map to ids and write the processed day.
    ``rng_state``: NumPy RandomState state at this day's first sub-sample draw (workers only).
    ``record``: the provenance record of the files written.
    """

    day: int
    paths: CriteoPaths
    text: Optional[TextRange]
    write_parsed: bool
    write_processed: bool
    raw_dtype: np.dtype
    sub_sample_rate: float
    max_ind_range: int
    record: dict
    rng_state: Optional[tuple] = None
    dictionary_files: bool = False  # worker: load the finished dictionaries from their files


def _parsed_members(raw_dtype: np.dtype) -> List[Member]:
    return [Member("X_cat_t", raw_dtype, NUM_SPARSE, by_column=True),
            Member("X_int", np.dtype(np.int32), NUM_DENSE), Member("y", np.dtype(np.int32))]


PROCESSED_MEMBERS = [Member("X_cat", np.dtype(np.int32), NUM_SPARSE),
                     Member("X_int", np.dtype(np.int32), NUM_DENSE),
                     Member("y", np.dtype(np.int32))]


def _day_blocks(job: _DayJob, rng: Optional[np.random.RandomState]):
    """(source rows, block) of the day, from text or from the parsed day file."""
    if job.text is not None:
        draws = rng if job.sub_sample_rate > 0 else None
        return iter_text_day(job.text, draws, job.sub_sample_rate, job.max_ind_range)
    return iter_parsed_day(job.paths.parsed_day(job.day))


def run_day(job: _DayJob, dictionaries: List[ColumnDictionary],
            rng: Optional[np.random.RandomState], on_rows: Callable[[int], None]) -> int:
    """Read one day, grow/use ``dictionaries``, write the files ``job`` asks for; return the
    number of rows kept."""
    max_rows = job.text.lines if job.text is not None else npz_rows(job.paths.parsed_day(job.day))
    outputs = []
    if job.write_parsed:
        outputs.append((job.paths.parsed_day(job.day), _parsed_members(job.raw_dtype)))
    if job.write_processed:
        outputs.append((job.paths.processed_day(job.day), PROCESSED_MEMBERS))
    kept = 0
    with contextlib.ExitStack() as stack:
        # entered last to first, so that they are completed (renamed) first to last
        writers = []
        for path, members in reversed(outputs):
            stack.enter_context(provenance.recording(path, job.record))
            writers.insert(0, stack.enter_context(NpzStreamWriter(path, members, max_rows)))
        for source_rows, block in _day_blocks(job, rng):
            _write_block(job, block, dictionaries, writers)
            kept += len(block.labels)
            on_rows(source_rows)
    return kept


def _write_block(job: _DayJob, block: Block, dictionaries: List[ColumnDictionary],
                 writers: List[NpzStreamWriter]) -> None:
    """Map a block to ids (growing the dictionaries) and append it to the day's writers."""
    count = len(block.labels)
    ids = np.empty((NUM_SPARSE, count), dtype=np.int32)
    raw = np.empty((NUM_SPARSE, count), dtype=job.raw_dtype) if job.write_parsed else None
    for k, codes in enumerate(block.codes):
        np.take(dictionaries[k].encode(codes.values).astype(np.int32), codes.index, out=ids[k])
        if raw is not None:
            np.take(codes.values.astype(job.raw_dtype), codes.index, out=raw[k])
    position = 0
    if job.write_parsed:
        writers[0].append(raw, block.dense, block.labels)
        position = 1
    if job.write_processed:
        writers[position].append(ids.T, np.maximum(block.dense, 0), block.labels)


def _worker_run_day(job: _DayJob) -> Tuple[int, Optional[List[np.ndarray]]]:
    """Process-pool entry: run one day; return (rows kept, first-seen values per column when the
    day was read with its own dictionaries)."""
    rng = None
    if job.rng_state is not None:
        rng = np.random.RandomState()
        rng.set_state(job.rng_state)
    if job.dictionary_files:
        dictionaries = load_dictionaries(job.paths)
        sizes = [len(d) for d in dictionaries]
        kept = run_day(job, dictionaries, rng, lambda rows: None)
        check_no_growth(job.paths, dictionaries, sizes)
        return kept, None
    dictionaries = [ColumnDictionary() for _ in range(NUM_SPARSE)]
    kept = run_day(job, dictionaries, rng, lambda rows: None)
    return kept, [d.values_in_id_order() for d in dictionaries]


def advance_uniforms(rng: np.random.RandomState, count: int) -> None:
    """Draw and drop ``count`` uniforms (a stage that already ran would have drawn them)."""
    for start in range(0, count, 1 << 22):
        rng.random_sample(min(1 << 22, count - start))


@dataclass
class DayPlan:
    """Per-day decisions of the categorify stages, and the record their files get."""

    from_text: List[bool]
    write_parsed: List[bool]
    write_processed: List[bool]
    build_dictionaries: bool
    record: dict

    @property
    def any_text(self) -> bool:
        return any(self.from_text)

    @property
    def any_work(self) -> bool:
        return self.build_dictionaries or any(self.write_processed) or self.any_text


def plan_days(paths: CriteoPaths, record: dict, log: Callable[[str], None]) -> DayPlan:
    """Which days must be read from text, which files must be (re)written, whether dictionaries
    must be built; a file counts only if it was made as ``record`` says. A day is read from text
    when its parsed file is missing and either its processed file or the dictionaries (which need
    every day's raw values) are missing."""
    build = not all(reusable(dictionary_files(paths), record, "the dictionaries", log))
    parsed = reusable([paths.parsed_day(i) for i in range(paths.days)], record,
                      "the parsed days", log)
    processed = reusable([paths.processed_day(i) for i in range(paths.days)], record,
                         "the processed days", log)
    from_text = [not p and (build or not q) for p, q in zip(parsed, processed)]
    return DayPlan(from_text, [not p for p in parsed], [not q for q in processed], build, record)


def _day_job(i: int, plan: DayPlan, paths: CriteoPaths, cfg: PreprocessConfig,
             ranges: Optional[List[TextRange]], processed: bool) -> _DayJob:
    return _DayJob(i, paths, ranges[i] if plan.from_text[i] else None,
                   plan.from_text[i] and plan.write_parsed[i], processed and plan.write_processed[i],
                   raw_dtype(cfg), cfg.sub_sample_rate, cfg.max_ind_range, plan.record)


def categorify(cfg: PreprocessConfig, paths: CriteoPaths, plan: DayPlan, ranges: Optional[List[TextRange]],
               rng: np.random.RandomState) -> None:
    """Stages 2, 4, 5 as ``plan`` says, in this process or (--dataset-multiprocessing) in workers."""
    (_categorify_parallel if cfg.multiprocessing else _categorify_sequential)(cfg, paths, plan, ranges, rng)


def _categorify_sequential(cfg, paths, plan, ranges, rng) -> None:
    """Stages 2, 4, 5 fused: days in order, one shared set of growing dictionaries."""
    dictionaries = ([ColumnDictionary() for _ in range(NUM_SPARSE)] if plan.build_dictionaries
                    else load_dictionaries(paths))
    sizes = [len(d) for d in dictionaries]
    total = sum(r.lines for r in ranges) if ranges and plan.any_text else None
    with progress_bar(cfg.progress, total, "parse+categorify") as bar:
        for i in range(paths.days):
            job = _day_job(i, plan, paths, cfg, ranges, processed=True)
            draws = rng if job.text is not None else None
            if job.text is None and plan.any_text and cfg.sub_sample_rate > 0:
                advance_uniforms(rng, ranges[i].lines)
            if job.text is None and not job.write_processed and not plan.build_dictionaries:
                continue
            run_day(job, dictionaries, draws, bar.update)
    if plan.build_dictionaries:
        save_dictionaries(paths, dictionaries, raw_dtype(cfg), plan.record)
    else:
        check_no_growth(paths, dictionaries, sizes)


def _categorify_parallel(cfg, paths, plan, ranges, rng) -> None:
    """Stages 2, 4, 5 with one process per day: read days (own dictionaries), merge their
    first-seen values in day order, then map days to ids from the saved dictionaries."""
    if plan.build_dictionaries:
        jobs = []
        for i in range(paths.days):
            job = _day_job(i, plan, paths, cfg, ranges, processed=False)
            state = None
            if plan.any_text and cfg.sub_sample_rate > 0:
                state = rng.get_state() if job.text is not None else None
                advance_uniforms(rng, ranges[i].lines)
            jobs.append(dataclasses.replace(job, rng_state=state))
        results = _run_days(cfg, "parse", jobs)
        dictionaries = [ColumnDictionary() for _ in range(NUM_SPARSE)]
        for _, distinct in results:
            for k in range(NUM_SPARSE):
                dictionaries[k].encode_distinct(distinct[k])
        save_dictionaries(paths, dictionaries, raw_dtype(cfg), plan.record)
        plan = plan_days(paths, plan.record, log=lambda message: None)  # every parsed day exists
    elif plan.any_text and cfg.sub_sample_rate > 0:
        _parallel_text_with_dictionaries(cfg, paths, plan, ranges, rng)
        return
    jobs = [dataclasses.replace(_day_job(i, plan, paths, cfg, ranges, processed=True), dictionary_files=True)
            for i in range(paths.days) if plan.write_processed[i]]
    _run_days(cfg, "categorify", jobs)


def _parallel_text_with_dictionaries(cfg, paths, plan, ranges, rng) -> None:
    """Dictionaries exist but some days must be read from text with sub-sampling."""
    jobs = []
    for i in range(paths.days):
        job = dataclasses.replace(_day_job(i, plan, paths, cfg, ranges, processed=True), dictionary_files=True)
        state = rng.get_state() if job.text is not None else None
        advance_uniforms(rng, ranges[i].lines)
        if job.text is not None or job.write_processed:
            jobs.append(dataclasses.replace(job, rng_state=state))
    _run_days(cfg, "parse+categorify", jobs)


def _run_days(cfg: PreprocessConfig, desc: str, jobs: List[_DayJob]):
    """Run day jobs in worker processes (:func:`run_pool`); results in job order."""
    directories = {os.path.dirname(os.path.abspath(path)) for job in jobs
                   for path in (job.paths.parsed_day(job.day), job.paths.processed_day(job.day))}
    return run_pool(_worker_run_day, jobs, sorted(directories), cfg.progress, desc)


def write_day_counts(paths: CriteoPaths, record: dict, log: Callable[[str], None]) -> np.ndarray:
    """Stage 3: ``_day_count.npz`` with the rows kept per day (unless it was made as ``record``
    says); return the counts. Every processed day is complete by now."""
    counts = np.array([npz_rows(paths.processed_day(i)) for i in range(paths.days)],
                      dtype=np.int64)
    if not reusable([paths.day_count_file()], record, "the day counts", log)[0]:
        with provenance.recording(paths.day_count_file(), record):
            save_npz(paths.day_count_file(), total_per_file=counts)
    return counts
