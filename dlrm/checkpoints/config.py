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
    """

    checkpoint_every: int = 0
    checkpoint_dir: str = ""
    checkpoint_rebase_every: int = 16

    def __post_init__(self):
        if self.checkpoint_every < 0:
            raise FlagError(f"{{checkpoint_every}} must not be negative, got {self.checkpoint_every}")
        if self.checkpoint_rebase_every < 1:
            raise FlagError(f"{{checkpoint_rebase_every}} must be at least 1, got {self.checkpoint_rebase_every}")
        if bool(self.checkpoint_every) != bool(self.checkpoint_dir):
            raise FlagError("{checkpoint_every}=N and {checkpoint_dir}=DIR go together")

    @property
    def on(self) -> bool:
        return self.checkpoint_every > 0
