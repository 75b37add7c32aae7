"""What a data file was made from, recorded beside it, so that it is reused only when that is known.

Every file the data pipeline writes (preprocessing outputs, row caches, MLPerf binary files) gets a
record ``<file>.provenance.json`` (beside the file the name resolves to), so the data files keep
the reference's names and contents::

    {"format": 1,
     "source": [{"name": "train.txt", "size": 11147184845, "mtime_ns": 1700000000000000000,
                 "sha256": "..."}],
     "options": {"--data-set": "kaggle", "--max-ind-range": -1, ...},
     "file": {"size": 7326000000, "mtime_ns": 1700000300000000000}}

``source`` identifies each input by name, size, modification time and a SHA-256 of its content
(of all of it up to 64 MiB; beyond that of its first and last MiB and 64 blocks of 64 KiB spread
evenly between, which reads 6 MiB whatever the size); ``options`` holds every setting that changes
the output; ``format`` is the version of the files' layout; ``file`` is the file itself when the
record was written, so a file replaced afterwards (by the reference, or by hand) is not taken for
the one described.

A record is removed before its file is rewritten and written after the file is complete, so a
record never describes another file than the one beside it: an interrupted write leaves a file
without a record, which is redone.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence

from dlrm.io.atomic import atomic_open, writing

FORMAT_VERSION = 1
SUFFIX = ".provenance.json"

_WHOLE_FILE_BYTES = 64 << 20
_EDGE_BYTES = 1 << 20
_SAMPLES = 64
_SAMPLE_BYTES = 64 << 10

NO_RECORD = "has no provenance record (made by the reference or by an older version)"


def record_path(path: str) -> str:
    """Where the record of ``path`` lives: beside the file the name resolves to."""
    return os.path.realpath(path) + SUFFIX


def _content_digest(path: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        if size <= _WHOLE_FILE_BYTES:
            for block in iter(lambda: src.read(8 << 20), b""):
                digest.update(block)
            return digest.hexdigest()
        pieces = [(0, _EDGE_BYTES)]
        pieces += [(k * size // (_SAMPLES + 1), _SAMPLE_BYTES) for k in range(1, _SAMPLES + 1)]
        pieces.append((size - _EDGE_BYTES, _EDGE_BYTES))
        for offset, length in pieces:
            src.seek(offset)
            digest.update(src.read(length))
    return digest.hexdigest()


def identity(path: str) -> Dict[str, object]:
    """Name, size, modification time and content digest of an input file."""
    status = os.stat(path)
    return {"name": os.path.basename(path), "size": status.st_size,
            "mtime_ns": status.st_mtime_ns, "sha256": _content_digest(path, status.st_size)}


def expected(source: Sequence[Dict[str, object]], options: Dict[str, object]) -> Dict[str, object]:
    """The record a file made now from ``source`` with ``options`` gets (less its ``file`` part)."""
    return json.loads(json.dumps({"format": FORMAT_VERSION, "source": list(source),
                                  "options": options}))


def read(path: str) -> Optional[dict]:
    """The record of ``path``; None when it has none. An unreadable record reads as {}."""
    try:
        with open(record_path(path)) as src:
            record = json.load(src)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _file_part(path: str) -> Dict[str, int]:
    status = os.stat(path)
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns}


def _source_change(made: List[dict], now: List[dict]) -> Optional[str]:
    names = [item.get("name") for item in made]
    if names != [item["name"] for item in now]:
        return f"was made from {', '.join(map(str, names))}, not {', '.join(i['name'] for i in now)}"
    for old, new in zip(made, now):
        if old.get("size") != new["size"]:
            return f"was made from {new['name']} of {old.get('size')} bytes (now {new['size']})"
        if old.get("sha256") != new["sha256"]:
            return f"was made from an earlier {new['name']} (its content differs now)"
        if old.get("mtime_ns") != new["mtime_ns"]:
            return f"was made from an earlier {new['name']} (it was modified since)"
    return None


def _option_change(made: dict, now: dict) -> Optional[str]:
    for key in sorted(set(made) | set(now)):
        if made.get(key) == now.get(key):
            continue
        return f"was made with {key}={made.get(key)} (this run: {now.get(key)})"
    return None


def mismatch(path: str, wanted: Dict[str, object], check_source: bool = True) -> Optional[str]:
    """Why the existing file ``path`` may not be reused as one made as ``wanted`` says (a phrase
    that follows the file name), or None when it may. ``check_source=False`` compares all but
    the source (for when the inputs are gone)."""
    record = read(path)
    if record is None:
        return NO_RECORD
    if not record:
        return "has an unreadable provenance record"
    if record.get("format") != wanted["format"]:
        return (f"was made in data format version {record.get('format')} (this version writes "
                f"{wanted['format']})")
    if record.get("file") != _file_part(path):
        return "was changed after it was made"
    if check_source:
        change = _source_change(record.get("source") or [], wanted["source"])
        if change:
            return change
    return _option_change(record.get("options") or {}, wanted["options"])


def reusable(path: str, wanted: Dict[str, object]) -> bool:
    """Whether ``path`` exists and was made as ``wanted`` says."""
    return os.path.exists(path) and mismatch(path, wanted) is None


def forget(path: str) -> None:
    """Remove the record of ``path`` (before the file is rewritten)."""
    with writing(record_path(path)):
        try:
            os.remove(record_path(path))
        except (FileNotFoundError, NotADirectoryError):
            pass


def write(path: str, wanted: Dict[str, object]) -> None:
    """Record that the complete file ``path`` was made as ``wanted`` says."""
    record = dict(wanted, file=_file_part(path))
    with writing(record_path(path)), atomic_open(record_path(path), "w") as out:
        json.dump(record, out, indent=1)
        out.write("\n")


@contextmanager
def recording(path: str, wanted: Dict[str, object]) -> Iterator[None]:
    """Around the writing of ``path``: forget its old record first, record ``wanted`` once the
    block (which must leave ``path`` complete) succeeds."""
    forget(path)
    yield
    write(path, wanted)
