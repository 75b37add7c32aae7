"""Write realistic fake Criteo raw files (:mod:`dlrm.data.criteo.fake`) from the command line.

    python -m bench.make_fake_criteo kaggle   OUT/train.txt --lines 2000000 [--seed 0]
    python -m bench.make_fake_criteo terabyte OUT/day --days 24 --lines 100000 [--seed 0]
"""
from __future__ import annotations

import argparse

from dlrm.data.criteo.fake import write_fake_kaggle, write_fake_terabyte

__all__ = ["main", "write_fake_kaggle", "write_fake_terabyte"]


def main(argv=None) -> int:
    """Write the files the arguments ask for."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("layout", choices=["kaggle", "terabyte"])
    parser.add_argument("path", help="Kaggle: the train.txt path; Terabyte: the day prefix")
    parser.add_argument("--lines", type=int, default=2_000_000, help="lines (per day for terabyte)")
    parser.add_argument("--days", type=int, default=24, help="terabyte only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.layout == "kaggle":
        write_fake_kaggle(args.path, args.lines, args.seed)
    else:
        write_fake_terabyte(args.path, args.days, args.lines, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
