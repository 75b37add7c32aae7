"""This rank's pieces of the embedding tables, looked up for the whole batch and exchanged.

A plan (:mod:`dlrm.shard.plan`) gives each table a kind:

- ``table``: one rank holds it whole (the reference's layout);
- ``row``: contiguous row blocks on several ranks; each owner pools the indices that fall in its
  block, and the partial sums are added (in block order) by the rank that uses them;
- ``column``: column blocks on several ranks; the pooled pieces are concatenated.

State-dict keys stay ``emb_l.K.weight`` (a piece's shape on each rank); :func:`join_pieces` and
:func:`cut_piece` turn pieces into the whole tensor and back, for checkpoints in the single-process
layout. Initial values are the single process's: every rank makes every table's draws and keeps
its piece.
"""
from __future__ import annotations

import functools
import operator
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn

from dlrm.distributed import DistInfo
from dlrm.kernels import fast_draw
from dlrm.shard.exchange import A2A_PRECISIONS, ExchangeLayout, exchange
from dlrm.shard.plan import Placement, ShardingPlan, TableSpec, plan_sharding

_DRAW_CHUNK_VALUES = 1 << 22
"""Values per draw when a column piece is cut out of a table drawn row block by row block."""


def table_specs(table_sizes: Sequence[int], dims: Sequence[int], lookups: Sequence[float],
                whole_only: bool) -> List[TableSpec]:
    """What the planner needs of each table; ``whole_only`` for QR and mixed-dimension models,
    whose tables are drawn from torch's RNG and placed whole."""
    return [TableSpec(rows=int(r), dim=int(d), lookups_per_step=float(n), whole_only=whole_only)
            for r, d, n in zip(table_sizes, dims, lookups)]


def reference_plan(table_sizes: Sequence[int], dims: Sequence[int], world_size: int) -> ShardingPlan:
    """The reference's layout: rank r holds the contiguous tables ``shard(T, W, r)``, whole."""
    specs = table_specs(table_sizes, dims, [0.0] * len(table_sizes), whole_only=False)
    return plan_sharding(specs, world_size, "table", None)


class ShardedTables(nn.ModuleDict):
    """This rank's pieces of the tables, in a multi-process run.

    Keys are the global table numbers, so the state-dict keys stay ``emb_l.K.weight`` (and
    ``emb_l.K.weight_q``, ``emb_l.K.embs.weight``, ... for QR and mixed-dimension tables, which are
    only placed whole). ``forward`` has :class:`dlrm.model.dlrm.PerTableEmbeddings`' signature: it
    looks up this rank's pieces for the whole global batch and returns, through the all-to-all, all
    T tables' outputs for this rank's batch rows. ``all_parameter_names`` names every table's
    parameters (all ranks'), in the single-process ``parameters()`` order, relative to this module.

    Args:
        pieces: this rank's piece of each table it holds, by table number.
        plan: where every table lives.
        dims: each table's output width D_t (a column block's share of it is its width).
        info: where this rank stands.
        all_parameter_names: see above.
        a2a_precision: "fp32", "bf16" or "fp16", the type the all-to-all sends.
        stores: the :class:`dlrm.store.tables.StoredTables` holding the pieces in files, one per
            piece width (:mod:`dlrm.shard.stored`); none for pieces in memory.

    Shape:
        - offsets: (T, B); indices: (T, N) or list of T (N_t,), for the whole batch.
        - pooling_weights: None, or per table this rank's per-row weights (its rows of a row
          block, all rows otherwise), None where no piece is held here.
        - Output: a list of T tensors (B_local, D_t).
    """

    def __init__(self, pieces: Dict[int, nn.Module], plan: ShardingPlan, dims: Sequence[int], info: DistInfo,
                 all_parameter_names: Sequence[str] = (), a2a_precision: str = "fp32", stores: Sequence = ()):
        super().__init__({str(k): piece for k, piece in sorted(pieces.items())})
        self._stores = list(stores)  # a plain list: the stores are no submodules (their pieces are)
        # pieces in files: coming batches read ahead, id of their indices -> (the indices, lookups per store)
        self._coming: Dict[int, tuple] = {}
        self.plan, self.info, self.dims = plan, info, list(dims)
        self.all_parameter_names = tuple(all_parameter_names)
        widths = tuple(tuple(_width(p, self.dims[p.table], r) for p in plan.pieces_on(r)) for r in range(info.world_size))
        self.layout = ExchangeLayout(info, widths, A2A_PRECISIONS[a2a_precision])
        self.column_groups = _column_groups(plan, info)

    @property
    def stores(self) -> list:
        """The stores holding this rank's pieces in files (empty for pieces in memory)."""
        return list(self._stores)

    def attach_optimizer(self, optimizer) -> None:
        """Pieces in files: let their stores set and keep the working rows' optimizer state."""
        for store in self._stores:
            store.attach_optimizer(optimizer)

    def local_tables(self) -> List[int]:
        """The global numbers of the tables of which a piece is held here, ascending."""
        return [int(k) for k in self.keys()]

    def placement(self, table: int) -> Placement:
        return self.plan.placements[table]

    def held_rows(self, table: int, rows: int) -> Tuple[int, int]:
        """The [start, stop) rows of ``table`` (``rows`` in all) held here: a row block, else all."""
        placement = self.placement(table)
        return placement.block_on(self.info.rank) if placement.kind == "row" else (0, rows)

    def forward(self, offsets: torch.Tensor, indices, pooling_weights: Optional[List[Optional[torch.Tensor]]] = None
                ) -> List[torch.Tensor]:
        placements = self.plan.pieces_on(self.info.rank)
        if self._stores:
            local = self._lookup_stored(placements, offsets, indices, pooling_weights)
        else:
            local = []  # one (B, w) per piece held here, in plan order
            for placement in placements:
                t = placement.table
                weights = None if pooling_weights is None else pooling_weights[t]
                local.append(self._lookup(placement, offsets[t], indices[t], weights))
        batch = offsets.shape[1] if isinstance(offsets, torch.Tensor) else len(offsets[0])
        weight = next(iter(self.parameters()), None)
        dtype = weight.dtype if weight is not None else torch.get_default_dtype()
        received = exchange(self.layout, batch, local, dtype, offsets[0].device)
        return self._join(received)

    def _lookup(self, placement: Placement, offsets: torch.Tensor, indices: torch.Tensor,
                weights: Optional[torch.Tensor]) -> torch.Tensor:
        """This rank's piece of one table pooled over the whole batch: (B, w)."""
        offsets, indices = self._piece_lookups(placement, offsets, indices)
        return self[str(placement.table)](indices, offsets,
                                          per_sample_weights=None if weights is None else weights[indices])

    def prefetch(self, indices, offsets) -> None:
        """Pieces in files: start reading the rows that a coming batch (its whole-batch ``indices``
        and ``offsets``) needs, as :meth:`dlrm.store.tables.StoredTables.prefetch` does; that
        batch's forward, given the same ``indices`` object, uses them."""
        if not self._stores:
            return
        groups = self._store_lookups(self.plan.pieces_on(self.info.rank), offsets, indices)
        while len(self._coming) >= 2:  # as many as the stores read ahead (an unused one is dropped)
            del self._coming[next(iter(self._coming))]
        self._coming[id(indices)] = (indices, groups)  # its forward passes the stores these same lists
        for store in self._stores:
            if id(store) in groups:
                store.prefetch(groups[id(store)][1])

    def _store_lookups(self, placements: Sequence[Placement], offsets, indices) -> Dict[int, tuple]:
        """Per store (by id): the positions of its pieces among ``placements``, and their indices,
        offsets and table numbers for the whole batch, as lists."""
        groups: Dict[int, tuple] = {}
        for position, placement in enumerate(placements):
            t = placement.table
            piece_offsets, piece_indices = self._piece_lookups(placement, offsets[t], indices[t])
            positions, piece_index_list, offsets_list, tables = groups.setdefault(
                id(self[str(t)].store), ([], [], [], []))
            positions.append(position)
            piece_index_list.append(piece_indices)
            offsets_list.append(piece_offsets)
            tables.append(t)
        return groups

    def _lookup_stored(self, placements: Sequence[Placement], offsets, indices, pooling_weights) -> List[torch.Tensor]:
        """This rank's pieces in files pooled over the whole batch, one call per store: (B, w) per
        piece, in plan order."""
        coming = self._coming.pop(id(indices), None)
        if coming is not None and coming[0] is indices:
            groups = coming[1]  # read ahead: the same lists, which the stores recognise
        else:
            groups = self._store_lookups(placements, offsets, indices)
        local: List[Optional[torch.Tensor]] = [None] * len(placements)
        for store in self._stores:
            if id(store) not in groups:
                continue
            positions, piece_indices, piece_offsets, tables = groups[id(store)]
            weights = None if pooling_weights is None else [pooling_weights[t] for t in tables]  # the piece's rows'
            for position, value in zip(positions, store(piece_offsets, piece_indices, weights)):
                local[position] = value
        return local

    def _piece_lookups(self, placement: Placement, offsets: torch.Tensor, indices: torch.Tensor):
        """(offsets, indices) of this rank's piece of one table over the whole batch (a row block's
        indices renumbered into it)."""
        if placement.kind != "row":
            return offsets, indices
        start, stop = placement.block_on(self.info.rank)
        local, local_offsets = rows_in_block(offsets, indices, start, stop)
        return local_offsets, local

    def _join(self, received: List[torch.Tensor]) -> List[torch.Tensor]:
        """The T tables' outputs (B_local, D_t) from every rank's pieces (in rank, then piece order)."""
        by_table: Dict[int, Dict[int, torch.Tensor]] = {}
        pieces = iter(received)
        for rank in range(self.info.world_size):
            for placement in self.plan.pieces_on(rank):
                by_table.setdefault(placement.table, {})[placement.ranks.index(rank)] = next(pieces)
        outputs = []
        for placement in self.plan.placements:
            blocks = [by_table[placement.table][i] for i in range(len(placement.ranks))]  # block order
            if placement.kind == "row":
                outputs.append(functools.reduce(operator.add, blocks))
            elif placement.kind == "column":
                outputs.append(torch.cat(blocks, dim=1))
            else:
                outputs.append(blocks[0])
        return outputs

    def sum_pooling_gradients(self, pooling: Dict[int, torch.Tensor]) -> None:
        """Add up, over its owners, the gradient of each column-split table's learned pooling
        weights (each owner computed the part its columns contribute), in table order."""
        for t, group in self.column_groups.items():
            weights = pooling.get(t)
            if weights is not None and weights.grad is not None:
                torch_dist.all_reduce(weights.grad, group=group)

    def whole_row_squares(self, param: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
        """The squared gradient values of whole rows, (K, D_t), from this piece's (K, w) ones.

        For a column piece the owners all-gather their columns (the same K rows on every owner:
        they looked up the same indices), so the row-wise Adagrad sees the whole row's mean, as in
        one process; any other parameter's ``squares`` are returned as they are."""
        for t, group in self.column_groups.items():
            table = self[str(t)] if str(t) in self else None
            if table is not None and param is table.weight:
                return _gather_columns(squares, self.placement(t), group)
        return squares


def _width(placement: Placement, dim: int, rank: int) -> int:
    """The width of ``rank``'s pooled piece of a table of output width ``dim``."""
    if placement.kind != "column":
        return dim
    start, stop = placement.block_on(rank)
    return stop - start


def _column_groups(plan: ShardingPlan, info: DistInfo) -> Dict[int, Optional[object]]:
    """A process group per column-split table with several owners (None: all ranks), made on
    every rank in table order, as ``new_group`` requires; only the owners keep theirs."""
    made: Dict[Tuple[int, ...], Optional[object]] = {}
    groups = {}
    for placement in plan.placements:
        if placement.kind != "column" or len(placement.ranks) < 2:
            continue
        ranks = tuple(sorted(placement.ranks))
        if ranks not in made:
            made[ranks] = None if len(ranks) == info.world_size else torch_dist.new_group(list(ranks))
        if info.rank in ranks:
            groups[placement.table] = made[ranks]
    return groups


def _gather_columns(squares: torch.Tensor, placement: Placement, group) -> torch.Tensor:
    """(K, D) from every owner's (K, w_i) column block, in block order (padded to the widest block
    for ``all_gather``)."""
    widths = [stop - start for start, stop in placement.blocks]
    padded = squares.new_zeros(squares.shape[0], max(widths))
    padded[:, :squares.shape[1]] = squares
    gathered = [torch.empty_like(padded) for _ in placement.ranks]
    torch_dist.all_gather(gathered, padded, group=group)  # in group rank order: ascending global ranks
    by_rank = dict(zip(sorted(placement.ranks), gathered))
    return torch.cat([by_rank[r][:, :w] for r, w in zip(placement.ranks, widths)], dim=1)


def rows_in_block(offsets: torch.Tensor, indices: torch.Tensor, start: int, stop: int
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The bags cut down to the rows [start, stop): (local indices (n,), offsets (B,)).

    Each bag keeps its indices in that range, in their order, renumbered from ``start``; a bag
    with none is empty (it pools to zeros)."""
    batch = offsets.shape[0]
    lengths = torch.diff(offsets, append=offsets.new_tensor([indices.shape[0]]))
    bag = torch.repeat_interleave(torch.arange(batch, device=offsets.device), lengths)
    keep = (indices >= start) & (indices < stop)
    counts = torch.bincount(bag[keep], minlength=batch)
    return indices[keep] - start, torch.cumsum(counts, 0) - counts


# ---------------------------------------------------------------------------------------------
# Pieces of whole tensors, for checkpoints in the single-process layout
# ---------------------------------------------------------------------------------------------


def join_pieces(placement: Placement, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """A table's whole tensor (weight, pooling weights or optimizer state) from its owners' pieces,
    in block order: row blocks are stacked; column blocks of a 2-D tensor are put side by side,
    and the 1-D ones (per-row values every owner holds whole) are the first owner's."""
    if placement.kind == "row" and pieces[0].dim() > 0:
        return torch.cat(list(pieces), dim=0)
    if placement.kind == "column" and pieces[0].dim() == 2:
        return torch.cat(list(pieces), dim=1)
    return pieces[0]


def cut_piece(placement: Placement, whole: torch.Tensor, rank: int) -> torch.Tensor:
    """``rank``'s piece of a table's whole tensor: the inverse of :func:`join_pieces`.

    Raises:
        ValueError: ``whole`` has not the plan's rows (row blocks) or columns (column blocks).
    """
    start, stop = placement.block_on(rank)
    extent = placement.blocks[-1][1]
    if placement.kind == "row" and whole.dim() > 0 and whole.shape[0] != extent:
        raise ValueError(f"and this model's table has {extent} rows")
    if placement.kind == "column" and whole.dim() == 2 and whole.shape[1] != extent:
        raise ValueError(f"and this model's table has {extent} columns")
    if placement.kind == "row" and whole.dim() > 0:
        return whole[start:stop].clone()
    if placement.kind == "column" and whole.dim() == 2:
        return whole[:, start:stop].clone()
    return whole


# ---------------------------------------------------------------------------------------------
# Drawing this rank's pieces as one process draws the whole tables
# ---------------------------------------------------------------------------------------------


def draw_piece(rng: np.random.RandomState, placement: Placement, rows: int, dim: int,
               rank: int) -> Optional[torch.Tensor]:
    """Move ``rng`` past one plain table's uniform(-sqrt(1/rows), sqrt(1/rows)) draws, (rows, dim)
    in C order, and return the float32 values of ``rank``'s piece (None when it holds none).

    Only the piece is ever in memory: a row block is drawn straight into place, a column block
    from the table's rows a few million values at a time."""
    bound = float(np.sqrt(1 / rows))
    block = placement.block_on(rank)
    if block is None:
        fast_draw.skip(rng, rows * dim)
        return None
    start, stop = block
    if placement.kind != "column":
        fast_draw.skip(rng, start * dim)
        piece = torch.empty(stop - start, dim)
        fast_draw.uniform_into(rng, piece, -bound, bound)
        fast_draw.skip(rng, (rows - stop) * dim)
        return piece
    piece = torch.empty(rows, stop - start)
    step = max(1, _DRAW_CHUNK_VALUES // dim)
    buffer = torch.empty(min(step, rows), dim)
    for first in range(0, rows, step):
        count = min(step, rows - first)
        fast_draw.uniform_into(rng, buffer[:count], -bound, bound)
        piece[first:first + count] = buffer[:count, start:stop]
    return piece
