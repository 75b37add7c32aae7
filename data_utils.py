"""Criteo preprocessing's command line: raw tab-separated text to the reference's npz files.

    python data_utils.py --data-set=kaggle --raw-data-file=./input/train.txt

The stages, their files and how they are reused are described in :mod:`dlrm.data.criteo.preprocess`;
the command line is :mod:`dlrm.data.criteo.command`. Their main names are re-exported here for code
that imports this script.
"""
from dlrm.data.criteo.command import build_parser, config_from_args, main
from dlrm.data.criteo.config import PreprocessConfig, criteo_paths
from dlrm.data.criteo.preprocess import preprocess_criteo, processed_data_ready

__all__ = ["PreprocessConfig", "build_parser", "config_from_args", "criteo_paths", "main", "preprocess_criteo",
           "processed_data_ready"]

if __name__ == "__main__":
    raise SystemExit(main())
