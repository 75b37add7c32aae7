"""Where the embedding tables live: the ``--embedding-store`` flags, checked on their own."""
from __future__ import annotations

from dataclasses import dataclass

from dlrm.common import FlagError, check_number

STORES = ("memory", "disk")


@dataclass(frozen=True)
class StoreConfig:
    """The tables in memory (the reference) or in files behind a row cache.

    Attributes:
        embedding_store: "memory" or "disk".
        embedding_store_dir: the directory the run makes its own store directory in ("disk" only;
            on a disk, not a RAM file system, or the store saves nothing).
        embedding_cache_gib: RAM for cached rows (weights and optimizer state), GiB.
        keep_embedding_store: leave the files when the run ends (a working copy, not a checkpoint).
    """

    embedding_store: str = "memory"
    embedding_store_dir: str = ""
    embedding_cache_gib: float = 1.0
    keep_embedding_store: bool = False

    def __post_init__(self):
        if self.embedding_store not in STORES:
            raise FlagError(f"{{embedding_store}} must be one of {', '.join(STORES)}, got {self.embedding_store!r}")
        check_number("embedding_cache_gib", self.embedding_cache_gib)
        if self.embedding_cache_gib < 0:
            raise FlagError(f"{{embedding_cache_gib}} must not be negative, got {self.embedding_cache_gib:g}")
        if self.embedding_store == "disk" and not self.embedding_store_dir:
            raise FlagError("{embedding_store}=disk needs {embedding_store_dir}=DIR, a directory on the disk that "
                            "will hold the tables")

    @property
    def on_disk(self) -> bool:
        return self.embedding_store == "disk"

    @property
    def cache_bytes(self) -> int:
        return int(self.embedding_cache_gib * (1 << 30))
