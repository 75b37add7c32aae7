"""``--checkpoint-every``: the training loop's periodic checkpoints into a chain."""
from __future__ import annotations

import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from dlrm.checkpoints.chain import CheckpointChain, Pending
from dlrm.checkpoints.config import CheckpointConfig
from dlrm.checkpoints.increments import TouchedRows
from dlrm.checkpoints.quantize import widened_bits
from dlrm.checkpoints.writer import BackgroundWriter
from dlrm.run.preflight import human

_WORKING_ROWS = re.compile(r"^emb_l\.rows_(\d+)$")  # a table in files: its parameter is a batch's rows


class PeriodicCheckpoints:
    """Every ``checkpoint_every`` training batches, the run's checkpoint into its chain: a base
    first (a run does not know what changed before it started), then increments of the rows its
    batches looked up since the last one.

    Asynchronous by default: the step that takes a checkpoint copies what it will hold (the
    snapshot) and a background thread writes it, one write at a time; the next checkpoint first
    waits for the write before it. The stall a step sees is the wait and the copy.

    Args:
        cfg: the flags.
        model, optimizer: the run's (the optimizer's parameter order names its state entries).
        config: what the checkpoints belong to (a chain of another configuration is refused).
        table_sizes: R of each table.
        note: prints a line.
        quantized_restores: restores from quantized checkpoints in the run's past (it widens the
            bits of ``--checkpoint-quantize``).
    """

    def __init__(self, cfg: CheckpointConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 config: Dict[str, Any], table_sizes: Sequence[int], note: Callable[[str], None] = print,
                 quantized_restores: int = 0):
        self.every = cfg.checkpoint_every
        self.bits = widened_bits(cfg.checkpoint_quantize or None, quantized_restores)
        self.chain = CheckpointChain(cfg.checkpoint_dir, config, cfg.checkpoint_rebase_every, bits=self.bits,
                                     quantized_restores=quantized_restores)
        self.asynchronous = cfg.checkpoint_writer == "async"
        self.touched = TouchedRows(table_sizes)
        self.names = optimizer_parameter_names(model, optimizer)
        self.note = note
        self.writer = BackgroundWriter()
        self.in_flight: Optional[Tuple[Pending, str]] = None
        self.steps = 0
        self.stalls: List[float] = []  # seconds, one a checkpoint

    def after_step(self, indices) -> bool:
        """Note a trained batch's ``indices``; whether a checkpoint is due now."""
        self.touched.add(indices)
        self.steps += 1
        return self.steps % self.every == 0

    def save(self, make_payload: Callable[[], Dict[str, Any]], where: str) -> None:
        """Take the checkpoint ``make_payload()`` gives (the single-process layout) of the step at
        ``where`` (words), and write it or hand it to the writer."""
        started = time.perf_counter()
        self._finish_write()
        rows = self.touched.take()
        pending = self.chain.snapshot(make_payload(), rows if self.stalls else None, self.names,
                                      copy=self.asynchronous)
        if self.asynchronous:
            self.writer.submit(lambda: self.chain.write(pending))
            self.in_flight = (pending, where)
        else:
            self.chain.write(pending)
        self.stalls.append(time.perf_counter() - started)
        how = "copied for the writer" if self.asynchronous else "written"
        self.note(f"checkpoint: {pending.kind} of {where}{self._bits_text()}, {human(pending.bytes)} {how} in "
                  f"{self.stalls[-1]:.2f} s (the step's stall)" + ("" if self.asynchronous else
                                                                   f", the chain {human(self.chain_bytes())}"))

    def close(self) -> None:
        """Wait for the write in flight, then say what the checkpoints cost the run."""
        self._finish_write()
        if self.stalls:
            increments = len(self.chain.links) - 1
            self.note(f"checkpoints: {len(self.stalls)} taken, the chain now a base and {increments} "
                      f"increment{'' if increments == 1 else 's'}, {human(self.chain_bytes())}; the steps stalled "
                      f"{sum(self.stalls):.2f} s in all, {1000 * sum(self.stalls) / len(self.stalls):.0f} ms a checkpoint")

    def _finish_write(self) -> None:
        if self.in_flight is None:
            return
        (pending, where), self.in_flight = self.in_flight, None
        _, seconds = self.writer.finish()
        self.note(f"checkpoint: {pending.kind} of {where} written in {seconds:.2f} s beside training, "
                  f"the chain {human(self.chain_bytes())}")

    def _bits_text(self) -> str:
        return f" (tables in {self.bits} bits)" if self.bits else ""

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
