"""No output over an input, nor two outputs on one file: the start-up check of every writer.

Two names are one file when they resolve to the same path, or, for files that exist, when they
have the same device and inode (a hard link has another path and the same inode; a symbolic link
resolves to its target). A collision is a one-line ConfigError naming both flags.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Collection, Dict, List, Sequence, Tuple

from dlrm.common import ConfigError


@dataclass(frozen=True)
class NamedFile:
    """A path a program reads or writes, and how to name it in a message: the flag that gives it,
    and for a file derived from a flag's value (a day file), what it is."""

    flag: str
    path: str
    role: str = ""

    def describe(self) -> str:
        return f"{self.path} ({self.role} of {self.flag})" if self.role else f"{self.flag}={self.path}"


def _identities(path: str) -> List[tuple]:
    """What makes two names one file: the resolved path, and where the file exists its device and
    inode."""
    keys: List[tuple] = [("path", os.path.realpath(path))]
    try:
        st = os.stat(path)
    except OSError:
        return keys
    return keys + [("inode", st.st_dev, st.st_ino)]


def check_collisions(outputs: Sequence[NamedFile], inputs: Sequence[NamedFile],
                     allowed: Collection[Tuple[str, str]] = ()) -> None:
    """Raise ConfigError naming both flags when an output is an input, or two outputs are one file.
    ``allowed`` holds (output flag, input flag) pairs that may name one file."""
    seen: Dict[tuple, Tuple[NamedFile, bool]] = {}
    for named in inputs:
        for key in _identities(named.path):
            seen.setdefault(key, (named, True))
    for out in outputs:
        keys = _identities(out.path)
        for key in keys:
            other, is_input = seen.get(key, (None, False))
            if other is None or (out.flag, other.flag) in allowed:
                continue
            if is_input:
                raise ConfigError(f"{out.describe()} is the same file as {other.describe()}: it would "
                                  "overwrite an input; give another path")
            raise ConfigError(f"{out.describe()} is the same file as {other.describe()}: both would be "
                              "written there; give each its own path")
        for key in keys:
            seen.setdefault(key, (out, False))
