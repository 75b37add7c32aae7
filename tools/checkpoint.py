"""A ``--checkpoint-dir``'s chain, looked at and turned into one file.

    python -m tools.checkpoint inspect DIR
    python -m tools.checkpoint consolidate DIR -o model.pt

``inspect`` lists the chain: each file's kind, position, bits and bytes, and what it restores.
``consolidate`` writes the checkpoint the chain restores (its base with every increment applied,
quantized rows as restored) as one file in the reference's layout, which ``--load-model`` reads
like any ``--save-model`` file. Errors are one ``error:`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from dlrm.checkpoints.chain import describe_chain, load_chain, read_manifest
from dlrm.cli import run_command
from dlrm.common import DLRMError
from dlrm.run.checkpoint import save_checkpoint
from dlrm.run.preflight import human


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.checkpoint", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    look = commands.add_parser("inspect", help="list the chain: files, kinds, positions, bits and bytes")
    look.add_argument("directory", help="a --checkpoint-dir")
    merge = commands.add_parser("consolidate", help="write what the chain restores as one --load-model file")
    merge.add_argument("directory", help="a --checkpoint-dir")
    merge.add_argument("-o", "--output", required=True, help="the file to write (the reference's layout)")
    return parser


def inspect_lines(directory: str) -> List[str]:
    """The chain of ``directory`` as lines of a table, then what it restores."""
    links = read_manifest(directory)
    lines = [f"{'#':>2}  {'kind':<9} {'epoch':>5} {'iteration':>9} {'bits':>4} {'bytes':>10}  file"]
    for i, link in enumerate(links):
        on_disk = os.path.join(directory, link.file)
        missing = "" if os.path.isfile(on_disk) else "  (missing)"
        lines.append(f"{i:>2}  {link.kind:<9} {link.epoch:>5} {link.iter:>9} {link.bits:>4} "
                     f"{human(link.bytes):>10}  {link.file}{missing}")
    lines.append(f"{len(links)} files, {human(sum(link.bytes for link in links))}; the chain restores "
                 f"{describe_chain(directory)}")
    return lines


def consolidate(directory: str, output: str) -> str:
    """Write the checkpoint ``directory``'s chain restores to ``output``; a line saying what was written."""
    payload = load_chain(directory)
    save_checkpoint(output, payload)
    return f"wrote {output}: epoch {payload.get('epoch', 0)}, iteration {payload.get('iter', 0)}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()

    def body(signals) -> int:
        args = parser.parse_args(argv)
        if args.command == "inspect":
            print("\n".join(inspect_lines(args.directory)))
        else:
            print(consolidate(args.directory, args.output))
        return 0

    return run_command(body, parser, errors=(DLRMError,))


if __name__ == "__main__":
    sys.exit(main())
