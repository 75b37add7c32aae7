"""A rank's pieces of sharded tables kept in files (``--embedding-store=disk`` with several processes).

The rank's pieces go into :class:`dlrm.store.tables.StoredTables`, one store per piece width (whole
tables and row blocks are D wide, column blocks narrower), drawn as their blocks of the whole
tables' stream, so every rank's pieces hold the single-process values. Each piece is seen through a
:class:`StoredPiece` under its table's number, whose ``weight`` is the store's working rows of that
piece: the state-dict keys (``emb_l.K.weight``, the whole piece, read through its file) and the
parameter names stay those of pieces in memory, and the sharded checkpoints gather and cut them as
they do those.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from dlrm.distributed import DistInfo
from dlrm.kernels import fast_draw
from dlrm.shard.plan import ShardingPlan
from dlrm.shard.tables import ShardedTables
from dlrm.store.files import RowFile
from dlrm.store.tables import StoredTables, fill_draws

MakeStore = Callable[[Sequence[int], int, Callable[[np.random.RandomState, List[RowFile]], None]], StoredTables]
"""Builds a store of the given piece sizes and width, filled by the given draw."""


class StoredPiece(nn.Module):
    """Piece ``t`` of a :class:`StoredTables` (not a submodule: the sharded tables hold the store).

    Its ``weight`` is the store's working rows of the piece (a batch's rows, set at each forward);
    its state dict holds the whole piece under ``weight``, and loading one writes the file."""

    def __init__(self, store: StoredTables, t: int):
        super().__init__()
        self._store = [store]  # in a list: not registered as a submodule
        self.t = t
        self.weight = getattr(store, f"rows_{t}")

    @property
    def store(self) -> StoredTables:
        return self._store[0]

    def file(self) -> RowFile:
        """The piece's weights file."""
        return self.store.cache.weights[self.t]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[f"{prefix}weight"] = self.store.table(self.t)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.store.load_entry(self.t, f"{prefix}weight", state_dict, missing_keys, error_msgs)


def stored_pieces(table_sizes: Sequence[int], dim: int, rng: np.random.RandomState, plan: ShardingPlan,
                  info: DistInfo, make_store: MakeStore) -> Tuple[List[StoredTables], Dict[int, StoredPiece], List[str]]:
    """This rank's pieces of the plain tables of ``table_sizes`` (dim D) in files, one store per
    piece width, drawn from ``rng`` as one process draws the whole tables. Returns the stores, the
    pieces by table number, and every table's parameter name (``K.weight``)."""
    blocks = {p.table: p.block_on(info.rank) for p in plan.placements}
    kinds = {p.table: p.kind for p in plan.placements}
    held = [t for t in range(len(table_sizes)) if blocks[t] is not None]
    widths = {t: blocks[t][1] - blocks[t][0] if kinds[t] == "column" else dim for t in held}
    stores, pieces = [], {}
    for width in sorted(set(widths.values()), reverse=True):
        mine = [t for t in held if widths[t] == width]
        sizes = [table_sizes[t] if kinds[t] != "row" else blocks[t][1] - blocks[t][0] for t in mine]
        stores.append(make_store(sizes, width, lambda rng, files: None))  # drawn below, in table order
        pieces.update((t, StoredPiece(stores[-1], i)) for i, t in enumerate(mine))
    for t, rows in enumerate(table_sizes):
        if t not in pieces:
            fast_draw.skip(rng, rows * dim)
            continue
        _draw_piece_into(rng, pieces[t].file(), kinds[t], blocks[t], rows, dim)
    return stores, pieces, [f"{t}.weight" for t in range(len(table_sizes))]


def _draw_piece_into(rng: np.random.RandomState, file: RowFile, kind: str, block: Tuple[int, int], rows: int,
                     dim: int) -> None:
    """Move ``rng`` past one (rows, D) table's U(-sqrt(1/rows), sqrt(1/rows)) draws, writing the
    piece ``block`` (a row or a column block, or the whole table) into ``file`` a few million values
    at a time."""
    bound = float(np.sqrt(1 / rows))
    start, stop = block
    if kind != "column":
        fast_draw.skip(rng, start * dim)
        fill_draws(rng, file, bound)
        fast_draw.skip(rng, (rows - stop) * dim)
        return

    def columns(first: int, last: int) -> torch.Tensor:
        whole = torch.empty(last - first, dim)
        fast_draw.uniform_into(rng, whole, -bound, bound)
        return whole[:, start:stop].contiguous()

    file.fill(columns, max(1, (64 << 20) // (4 * dim)))


def stored_sharded_tables(table_sizes: Sequence[int], dim: int, width: int, rng: np.random.RandomState,
                          plan: ShardingPlan, info: DistInfo, a2a_precision: str, make_store: MakeStore
                          ) -> ShardedTables:
    """This rank's pieces of the tables in files, as :class:`ShardedTables` (outputs ``width`` wide)."""
    stores, pieces, names = stored_pieces(table_sizes, dim, rng, plan, info, make_store)
    return ShardedTables(pieces, plan, [width] * len(table_sizes), info, names, a2a_precision, stores=stores)
