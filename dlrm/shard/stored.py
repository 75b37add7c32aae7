"""A rank's pieces of sharded tables kept in files (``--embedding-store=disk`` with several processes).

The rank's pieces (whole tables, or row blocks) go into one :class:`dlrm.store.tables.StoredTables`,
drawn as their blocks of the whole tables' stream, so every rank's pieces hold the single-process
values. Each piece is seen through a :class:`StoredPiece` under its table's number, whose ``weight``
is the store's working rows of that piece: the state-dict keys (``emb_l.K.weight``, the whole
piece, read through its file) and the parameter names stay those of pieces in memory, and the
sharded checkpoints gather and cut them as they do those.

Column blocks are not stored in files (a store holds rows of one width): such plans are refused.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch.nn as nn

from dlrm.distributed import DistInfo
from dlrm.kernels import fast_draw
from dlrm.shard.plan import ShardingPlan
from dlrm.shard.tables import ShardedTables
from dlrm.store.files import RowFile
from dlrm.store.tables import StoredTables, fill_draws

MakeStore = Callable[[Sequence[int], Callable[[np.random.RandomState, List[RowFile]], None]], StoredTables]
"""Builds the store over the given piece sizes, filled by the given draw."""


class StoredPiece(nn.Module):
    """Piece ``t`` of a :class:`StoredTables` (not a submodule: the sharded tables hold the store).

    Its ``weight`` is the store's working rows of the piece (a batch's rows, set at each forward);
    its state dict holds the whole piece under ``weight``, and loading one writes the file."""

    def __init__(self, store: StoredTables, t: int):
        super().__init__()
        self._store = [store]  # in a list: not registered as a submodule
        self.t = t
        self.weight = getattr(store, f"rows_{t}")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[f"{prefix}weight"] = self._store[0].table(self.t)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = f"{prefix}weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        store, value = self._store[0], state_dict[key]
        shape = (store.table_sizes[self.t], store.dim)
        if tuple(value.shape) != shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                              f"the piece has {shape}")
            return
        store.load_table(self.t, value)


def check_storable(plan: ShardingPlan) -> None:
    """Raise ValueError when the plan has column blocks (not stored in files)."""
    columns = [p.table for p in plan.placements if p.kind == "column"]
    if columns:
        raise ValueError(f"table {columns[0]} is split into column blocks, which are not kept in files "
                         "(use --sharding=table or row)")


def stored_pieces(table_sizes: Sequence[int], dim: int, rng: np.random.RandomState, plan: ShardingPlan,
                  info: DistInfo, make_store: MakeStore) -> Tuple[StoredTables, Dict[int, StoredPiece], List[str]]:
    """This rank's pieces of the plain tables of ``table_sizes`` (dim D) in one store, drawn from
    ``rng`` as one process draws the whole tables. Returns the store, the pieces by table number,
    and every table's parameter name (``K.weight``)."""
    check_storable(plan)
    blocks = {p.table: p.block_on(info.rank) for p in plan.placements}
    held = [t for t in range(len(table_sizes)) if blocks[t] is not None]

    def draw(rng: np.random.RandomState, files: List[RowFile]) -> None:
        mine = dict(zip(held, files))
        for t, rows in enumerate(table_sizes):
            if t not in mine:
                fast_draw.skip(rng, rows * dim)
                continue
            start, stop = blocks[t]
            fast_draw.skip(rng, start * dim)
            fill_draws(rng, mine[t], float(np.sqrt(1 / rows)))
            fast_draw.skip(rng, (rows - stop) * dim)

    store = make_store([blocks[t][1] - blocks[t][0] for t in held], draw)
    pieces = {t: StoredPiece(store, i) for i, t in enumerate(held)}
    return store, pieces, [f"{t}.weight" for t in range(len(table_sizes))]


def stored_sharded_tables(table_sizes: Sequence[int], dim: int, width: int, rng: np.random.RandomState,
                          plan: ShardingPlan, info: DistInfo, a2a_precision: str, make_store: MakeStore
                          ) -> ShardedTables:
    """This rank's pieces of the tables in files, as :class:`ShardedTables` (outputs ``width`` wide)."""
    store, pieces, names = stored_pieces(table_sizes, dim, rng, plan, info, make_store)
    return ShardedTables(pieces, plan, [width] * len(table_sizes), info, names, a2a_precision, store=store)
