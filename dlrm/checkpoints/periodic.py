"""``--checkpoint-every``: the training loop's periodic checkpoints into a chain."""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.nn as nn

from dlrm.checkpoints.chain import CheckpointChain, Link
from dlrm.checkpoints.config import CheckpointConfig
from dlrm.checkpoints.increments import TouchedRows

_WORKING_ROWS = re.compile(r"^emb_l\.rows_(\d+)$")  # a table in files: its parameter is a batch's rows


class PeriodicCheckpoints:
    """Every ``checkpoint_every`` training batches, the run's checkpoint into its chain: a base
    first (a run does not know what changed before it started), then increments of the rows its
    batches looked up since the last one.

    Args:
        cfg: the flags.
        model, optimizer: the run's (the optimizer's parameter order names its state entries).
        config: what the checkpoints belong to (a chain of another configuration is refused).
        table_sizes: R of each table.
    """

    def __init__(self, cfg: CheckpointConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 config: Dict[str, Any], table_sizes: Sequence[int]):
        self.every = cfg.checkpoint_every
        self.chain = CheckpointChain(cfg.checkpoint_dir, config, cfg.checkpoint_rebase_every)
        self.touched = TouchedRows(table_sizes)
        self.names = optimizer_parameter_names(model, optimizer)
        self.steps = 0
        self.written = 0

    def after_step(self, indices) -> bool:
        """Note a trained batch's ``indices``; whether a checkpoint is due now."""
        self.touched.add(indices)
        self.steps += 1
        return self.steps % self.every == 0

    def save(self, make_payload: Callable[[], Dict[str, Any]]) -> Link:
        """Write the checkpoint ``make_payload()`` gives (the single-process layout)."""
        rows = self.touched.take()
        link = self.chain.save(make_payload(), rows if self.written else None, self.names)
        self.written += 1
        return link


    def chain_bytes(self) -> int:
        """The bytes of the chain's files now (what the directory holds)."""
        return sum(link.bytes for link in self.chain.links)


def optimizer_parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> List[str]:
    """The state-dict names of the optimizer's parameters, in its order (a table in files is named
    ``emb_l.K.weight``, the whole table its state entry holds in a checkpoint)."""
    names = {id(p): n for n, p in model.named_parameters()}
    ordered = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names.get(id(param), "")
            working = _WORKING_ROWS.match(name)
            ordered.append(f"emb_l.{working.group(1)}.weight" if working else name)
    return ordered
