"""Periodic checkpoints: the ``--checkpoint-every`` flags, checked on their own."""
from __future__ import annotations

from dataclasses import dataclass

from dlrm.common import FlagError


@dataclass(frozen=True)
class CheckpointConfig:
    """A base and increments written every few steps into a directory (beside ``--save-model``,
    which keeps the reference's behaviour).

    Attributes:
        checkpoint_every: batches between two checkpoints (0: none).
        checkpoint_dir: the directory of the chain (its manifest, base and increments).
        checkpoint_rebase_every: increments after which a new base replaces the chain.
        checkpoint_quantize: the tables' rows in 8, 4 or 2 bits a value (0: exact).
        checkpoint_writer: ``async`` (a background thread writes a copy) or ``sync`` (the step writes).
    """

    checkpoint_every: int = 0
    checkpoint_dir: str = ""
    checkpoint_rebase_every: int = 16
    checkpoint_quantize: int = 0
    checkpoint_writer: str = "async"

    def __post_init__(self):
        if self.checkpoint_every < 0:
            raise FlagError(f"{{checkpoint_every}} must not be negative, got {self.checkpoint_every}")
        if self.checkpoint_rebase_every < 1:
            raise FlagError(f"{{checkpoint_rebase_every}} must be at least 1, got {self.checkpoint_rebase_every}")
        if self.checkpoint_quantize not in (0, 8, 4, 2):
            raise FlagError(f"{{checkpoint_quantize}} takes 8, 4 or 2 (bits a value), got {self.checkpoint_quantize}")
        if self.checkpoint_writer not in ("async", "sync"):
            raise FlagError(f"{{checkpoint_writer}} takes async or sync, got {self.checkpoint_writer!r}")
        if bool(self.checkpoint_every) != bool(self.checkpoint_dir):
            raise FlagError("{checkpoint_every}=N and {checkpoint_dir}=DIR go together")

    @property
    def on(self) -> bool:
        return self.checkpoint_every > 0
