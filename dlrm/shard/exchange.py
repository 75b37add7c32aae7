"""The all-to-all of pooled embeddings between the ranks that look them up and the ranks that use them.

Every rank looks up its pieces of the tables (whole tables, row blocks or column blocks) for the
whole global batch; :class:`PooledExchange` then gives every rank every piece for its contiguous
slice of the batch (``torch.distributed.all_to_all_single``, one call each way), which
:class:`dlrm.shard.tables.ShardedTables` joins into the T tables' outputs.

``--a2a-precision=bf16|fp16`` sends the float32 values (forward pieces, backward gradients) in that
type and turns them back into float32 on arrival; ``fp32`` (the default) sends them as they are.
The reduced types go over the wire as their bytes (a ``uint8`` view), which every backend moves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as torch_dist

from dlrm.distributed import DistInfo, shard

A2A_PRECISIONS: Dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--a2a-precision`` choices and the type each sends (None: the values' own type)."""


@dataclass(frozen=True)
class ExchangeLayout:
    """Who sends what: every rank's piece widths, in that rank's piece order.

    Attributes:
        info: where this rank stands.
        widths: per rank, the widths (columns) of its pieces, in the order it sends them.
        wire: the type sent (bf16 or fp16), or None to send the values' own type.
    """

    info: DistInfo
    widths: Tuple[Tuple[int, ...], ...]
    wire: Optional[torch.dtype] = None

    def batch_rows(self, batch: int) -> List[Tuple[int, int]]:
        """Each rank's [start, stop) rows of a global batch of ``batch`` rows."""
        return [shard(batch, self.info.world_size, r) for r in range(self.info.world_size)]

    def bytes_sent(self, batch: int, value_bytes: int = 4) -> int:
        """Bytes this rank sends to the other ranks in one direction for a batch of ``batch`` rows."""
        rows = self.batch_rows(batch)
        mine = sum(self.widths[self.info.rank])
        size = value_bytes if self.wire is None else 2
        return sum((stop - start) * mine * size for r, (start, stop) in enumerate(rows) if r != self.info.rank)


def _all_to_all(send: torch.Tensor, out_splits: List[int], in_splits: List[int],
                wire: Optional[torch.dtype]) -> torch.Tensor:
    """``all_to_all_single`` of the flat ``send``, in ``wire``'s type when given; returns the received
    values (flat) in ``send``'s type.

    The reduced type travels as its bytes (a ``uint8`` view, twice the elements): gloo's all-to-all
    takes no 16-bit integer and, in some versions, no bfloat16; every backend moves bytes."""
    if wire is None or send.dtype == wire:
        received = send.new_empty(sum(out_splits))
        torch_dist.all_to_all_single(received, send, out_splits, in_splits)
        return received
    size = torch.finfo(wire).bits // 8
    packed = send.to(wire).view(torch.uint8)
    received = packed.new_empty(sum(out_splits) * size)
    torch_dist.all_to_all_single(received, packed, [n * size for n in out_splits], [n * size for n in in_splits])
    return received.view(wire).to(send.dtype)


class PooledExchange(torch.autograd.Function):
    """All-to-all of pooled pieces: this rank's pieces x the whole batch -> every rank's pieces x this
    rank's batch rows.

    Forward input: the global batch size B, an empty anchor (see :func:`exchange`) and this rank's
    pieces, each (B, w_p) for the whole global batch, in its piece order.
    Forward output: every rank's pieces, in rank order and then piece order, each (B_local, w_p).
    Backward sends the gradients the other way and divides them by W: each rank's loss is a mean
    over its B/W rows, so the sum of their gradients is W times the gradient of the global mean.
    """

    @staticmethod
    def forward(ctx, layout: ExchangeLayout, batch: int, anchor: torch.Tensor, *local: torch.Tensor):
        info = layout.info
        rows = layout.batch_rows(batch)
        mine = rows[info.rank][1] - rows[info.rank][0]
        width = sum(layout.widths[info.rank])
        send = (torch.cat(local, dim=1) if local else anchor.new_empty(batch, 0)).contiguous()  # row blocks in rank order
        in_splits = [(stop - start) * width for start, stop in rows]
        out_splits = [mine * sum(w) for w in layout.widths]
        received = _all_to_all(send.view(-1), out_splits, in_splits, layout.wire)
        ctx.layout, ctx.batch, ctx.anchor = layout, batch, anchor.shape
        outputs = []
        for chunk, widths in zip(received.split(out_splits), layout.widths):
            outputs.extend(chunk.view(mine, sum(widths)).split(list(widths), dim=1))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        layout, batch = ctx.layout, ctx.batch
        info = layout.info
        rows = layout.batch_rows(batch)
        mine = rows[info.rank][1] - rows[info.rank][0]
        # Rank s must receive (B_local, sum of its widths) row-major, so the send buffer is one such
        # block per rank, in rank order.
        blocks, first = [], 0
        for widths in layout.widths:
            blocks.append(torch.cat(grads[first:first + len(widths)], dim=1).reshape(-1))
            first += len(widths)
        send = torch.cat(blocks)
        width = sum(layout.widths[info.rank])
        in_splits = [mine * sum(w) for w in layout.widths]
        out_splits = [(stop - start) * width for start, stop in rows]
        received = _all_to_all(send, out_splits, in_splits, layout.wire)
        full = received.view(batch, width) / info.world_size  # row blocks arrive in rank order
        pieces = full.split(list(layout.widths[info.rank]), dim=1) if layout.widths[info.rank] else ()
        return (None, None, full.new_zeros(ctx.anchor)) + tuple(g.contiguous() for g in pieces)


def exchange(layout: ExchangeLayout, batch: int, local: Sequence[torch.Tensor], dtype: torch.dtype,
             device: torch.device) -> List[torch.Tensor]:
    """:class:`PooledExchange` of ``local`` (each (B, w) for a batch of ``batch`` rows); every
    rank's pieces for this rank's rows, in rank order.

    An empty anchor that requires a gradient goes along, so that every rank takes part in the
    backward all-to-all, also one that holds no piece."""
    anchor = torch.zeros(0, dtype=dtype, device=device, requires_grad=torch.is_grad_enabled())
    return list(PooledExchange.apply(layout, batch, anchor, *local))
