"""A checkpoint directory: a manifest, a base (a full checkpoint) and a chain of increments.

``manifest.json`` names the format version, the configuration the checkpoints belong to (the
model's flags and the optimizer), and the chain in order: each link's file, kind (``base`` or
``increment``), position (epoch and iteration, as the checkpoint's ``epoch`` and ``iter``) and
bytes. Every file is written under a temporary name and renamed, and the manifest is rewritten
(the same way) only after the file it adds is complete: a process killed at any moment leaves the
last complete chain restorable. Files no manifest names (a write cut short) are removed when the
directory is next opened for writing.

A new base replaces the chain every ``rebase_every`` increments, or once the increments since the
base hold more than ``rebase_fraction`` of its bytes (restoring would read more than a base).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from dlrm.checkpoints.increments import apply_increment, make_increment
from dlrm.checkpoints.quantize import dequantize_tables, quantize_tables, written_bytes
from dlrm.common import CheckpointError
from dlrm.io.atomic import TEMP_SUFFIX, atomic_path, writing

MANIFEST = "manifest.json"
FORMAT = 1


@dataclass
class Pending:
    """A link's content, taken at a step and not yet written."""

    kind: str  # "base" or "increment"
    content: Dict[str, Any]  # the checkpoint or increment, tables exact
    epoch: int
    iter: int
    bytes: int  # as it will be written
    bits: Optional[int]


@dataclass(frozen=True)
class Link:
    """One file of the chain."""

    file: str
    kind: str  # "base" or "increment"
    epoch: int
    iter: int
    bytes: int  # the tensors' bytes, as written
    bits: int = 32  # the tables' rows: 32 exact, else quantized to 8, 4 or 2 bits

    def position(self) -> str:
        return f"epoch {self.epoch}, iteration {self.iter}"


class CheckpointChain:
    """The checkpoints of a run in ``directory``.

    Args:
        directory: ``--checkpoint-dir``; made if missing.
        config: what the checkpoints belong to (the model's flags and the optimizer): a directory
            holding another configuration's chain is refused.
        rebase_every, rebase_fraction: when a new base replaces the chain (see the module).
        bits: the tables' rows in 8, 4 or 2 bits (None: exact).
        quantized_restores: restores from quantized checkpoints in the run's past (the manifest
            keeps the count for the runs restored from this chain).

    Raises:
        CheckpointError: the directory holds another configuration's chain, or an unreadable manifest.
    """

    def __init__(self, directory: str, config: Dict[str, Any], rebase_every: int = 16, rebase_fraction: float = 0.5,
                 bits: Optional[int] = None, quantized_restores: int = 0):
        self.directory, self.config = directory, dict(config)
        self.rebase_every, self.rebase_fraction = rebase_every, rebase_fraction
        self.bits, self.quantized_restores = bits, quantized_restores
        with writing(directory, what="the checkpoint directory"):
            os.makedirs(directory, exist_ok=True)
        self.links = read_manifest(directory, self.config) if os.path.exists(self._manifest) else []
        self._remove_unnamed()

    @property
    def _manifest(self) -> str:
        return os.path.join(self.directory, MANIFEST)

    def save(self, payload: Dict[str, Any], touched: Optional[Dict[int, np.ndarray]],
             parameter_names: Sequence[str]) -> Link:
        """Add the checkpoint ``payload`` (the single-process layout) to the chain now: see
        :meth:`snapshot` and :meth:`write`."""
        return self.write(self.snapshot(payload, touched, parameter_names, copy=False))

    def snapshot(self, payload: Dict[str, Any], touched: Optional[Dict[int, np.ndarray]],
                 parameter_names: Sequence[str], copy: bool = True) -> "Pending":
        """What the next link will hold, taken from ``payload`` (the single-process layout): an
        increment of the ``touched`` rows, or a new base (also when ``touched`` is None: the rows
        changed since the last checkpoint are not known). With ``copy``, every tensor is copied, so
        training may go on while :meth:`write` writes it. The link before must be written."""
        since_base = self.links[next((i for i in range(len(self.links) - 1, -1, -1)
                                      if self.links[i].kind == "base"), 0):]
        content = None
        if touched is not None and since_base and len(since_base) - 1 < self.rebase_every:
            content = make_increment(payload, touched, parameter_names)
            grown = sum(link.bytes for link in since_base[1:]) + written_bytes(content, self.bits)
            if grown > self.rebase_fraction * since_base[0].bytes:
                content = None
        kind = "increment" if content is not None else "base"
        content = content if content is not None else payload
        return Pending(kind, owned(content) if copy else content, int(payload.get("epoch", 0)),
                       int(payload.get("iter", 0)), written_bytes(content, self.bits), self.bits)

    def write(self, pending: "Pending") -> Link:
        """Write ``pending``'s file, then the manifest that adds it to the chain (a new base replaces
        the chain). Safe to run beside training when the snapshot was copied."""
        from dlrm.run.checkpoint import refuse_to_save_non_finite, save_checkpoint

        name = f"{pending.kind}-e{pending.epoch}-i{pending.iter}-{len(self.links)}.pt"
        path = os.path.join(self.directory, name)
        content = pending.content
        if pending.bits is not None:
            refuse_to_save_non_finite(content, path)
            content = quantize_tables(content, pending.bits)
        save_checkpoint(path, content)
        link = Link(name, pending.kind, pending.epoch, pending.iter, pending.bytes, pending.bits or 32)
        self.links = [link] if pending.kind == "base" else self.links + [link]
        self._write_manifest()
        self._remove_unnamed()
        return link

    def _write_manifest(self) -> None:
        document = {"format": FORMAT, "config": self.config, "quantized_restores": self.quantized_restores,
                    "chain": [asdict(link) for link in self.links]}
        with writing(self._manifest, what="the checkpoint manifest"):
            with atomic_path(self._manifest) as tmp:
                with open(tmp, "w") as out:
                    json.dump(document, out, indent=1)
                    out.flush()
                    os.fsync(out.fileno())

    def _remove_unnamed(self) -> None:
        """Remove the checkpoint files the manifest does not name (an older chain, a cut write)."""
        named = {link.file for link in self.links}
        for entry in os.listdir(self.directory):
            cut_short = TEMP_SUFFIX in entry  # a write that a kill stopped
            ours = entry.startswith(("base-", "increment-", MANIFEST + "."))
            if ours and (cut_short or (entry.endswith(".pt") and entry not in named)):
                os.remove(os.path.join(self.directory, entry))


def read_manifest(directory: str, config: Optional[Dict[str, Any]] = None) -> List[Link]:
    """The chain of ``directory``'s manifest, checked against ``config`` when given.

    Raises:
        CheckpointError: no manifest, an unreadable one, another format, or another configuration
            (naming the first field that differs).
    """
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as source:
            document = json.load(source)
        links = [Link(**entry) for entry in document["chain"]]
        version, saved = document["format"], document["config"]
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no checkpoint manifest ({MANIFEST}) there") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint manifest ({type(exc).__name__})") from None
    if version != FORMAT:
        raise CheckpointError(f"{path}: format {version}, this version reads format {FORMAT}")
    if config is not None:
        for field in sorted(set(saved) | set(config)):
            if saved.get(field) != config.get(field):
                raise CheckpointError(f"{directory}: holds checkpoints of another configuration: {field} is "
                                      f"{saved.get(field)!r} there and {config.get(field)!r} in this run")
    if not links or links[0].kind != "base":
        raise CheckpointError(f"{path}: the chain does not start with a base")
    return links


def load_chain(directory: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """The full checkpoint (the single-process layout) that ``directory``'s chain restores: its base
    with every increment applied in order.

    Raises:
        CheckpointError: a missing or damaged manifest or file (naming it and the last good position).
    """
    from dlrm.run.checkpoint import load_checkpoint

    links = read_manifest(directory)
    payload: Optional[Dict[str, Any]] = None
    for i, link in enumerate(links):
        path = os.path.join(directory, link.file)
        try:
            part = dequantize_tables(load_checkpoint(path, map_location=map_location))
            payload = part if payload is None else apply_increment(payload, part, path)
        except (CheckpointError, ValueError) as exc:
            good = f"the last good checkpoint is at {links[i - 1].position()}" if i else "no checkpoint is complete"
            raise CheckpointError(f"{exc} ({good})") from None
    return payload


def owned(value: Any) -> Any:
    """``value`` with every tensor in it copied (dicts, lists and tuples rebuilt around them)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: owned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(owned(v) for v in value)
    return value


def quantized_restores(directory: str) -> int:
    """The restores from quantized checkpoints in the past of a run restored from ``directory``'s
    chain: the manifest's count, and this one when the chain holds quantized rows."""
    with open(os.path.join(directory, MANIFEST)) as source:
        document = json.load(source)
    quantized = any(entry.get("bits", 32) < 32 for entry in document["chain"])
    return int(document.get("quantized_restores", 0)) + int(quantized)


def describe_chain(directory: str) -> str:
    """What ``directory``'s chain restores, in words: its last position, from a base and increments."""
    links = read_manifest(directory)
    bits = sorted({link.bits for link in links if link.bits < 32})
    rounded = f"; tables in {'/'.join(map(str, bits))} bits" if bits else ""
    return (f"{links[-1].position()} (a base at {links[0].position()} and {len(links) - 1} "
            f"increment{'' if len(links) == 2 else 's'}{rounded})")
