"""The command line of ``data_utils.py``: preprocess the Criteo raw data, print the file to read."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from dlrm.cli import FlagParser, run_command, take
from dlrm.common import DLRMError
from dlrm.data.criteo.config import RANDOMIZE_CHOICES, PreprocessConfig
from dlrm.data.criteo.preprocess import preprocess_criteo


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``data_utils.py`` (their dests name PreprocessConfig's checks in errors)."""
    parser = FlagParser(description="Preprocess the Criteo Kaggle/Terabyte raw data.")
    parser.add_argument("--data-set", default="kaggle", choices=["kaggle", "terabyte"])
    parser.add_argument("--raw-data-file", default="",
                        help="Kaggle: path of train.txt; Terabyte: day-file prefix (./input/day)")
    parser.add_argument("--processed-data-file", default="",
                        help="also make the concatenated output available under this name; an "
                             "existing file there without a provenance record (made by the "
                             "reference) is used as it is")
    parser.add_argument("--max-ind-range", type=int, default=-1,
                        help="if > 0, take categorical hashes modulo this (default -1: off)")
    parser.add_argument("--data-sub-sample-rate", dest="sub_sample_rate", type=float, default=0.0,
                        help="drop each negative sample with this probability (default 0)")
    parser.add_argument("--data-randomize", dest="randomize", default="total", choices=list(RANDOMIZE_CHOICES))
    parser.add_argument("--memory-map", action="store_true",
                        help="write per-day shuffled files instead of one output")
    parser.add_argument("--dataset-multiprocessing", dest="multiprocessing", action="store_true",
                        help="process days in parallel (same output)")
    parser.add_argument("--numpy-rand-seed", dest="seed", type=int, default=123)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def config_from_args(ns: argparse.Namespace) -> PreprocessConfig:
    """The PreprocessConfig of parsed flags; FlagError for a value that cannot work."""
    return take(PreprocessConfig, vars(ns), progress=not ns.no_progress)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Preprocess; print the output path (notes go to stderr). What stops it is reported in one line
    (:func:`dlrm.cli.run_command`); an OSError too, with exit code 2."""
    parser = build_parser()

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    def body(signals) -> int:
        output = preprocess_criteo(config_from_args(parser.parse_args(argv)), log)
        print(output)
        return 0

    return run_command(body, parser, errors=(DLRMError, OSError))
