"""A multi-process model's state in the single-process layout, and back.

Checkpoints always hold the single-process layout: every table whole (``emb_l.K.weight``,
``v_W_l.K``), parameters in one process's order. Saving gathers every rank's pieces of the tables
(and of their optimizer state) on rank 0 and joins them; loading cuts each rank's pieces out, so a
file written by any number of ranks and any sharding loads into any other.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from dlrm.distributed import DistInfo, gather_objects
from dlrm.shard.tables import cut_piece, join_pieces

SHARDED_PREFIXES = ("emb_l.", "v_W_l.")  # the tables and their learned pooling weights, held in pieces


def is_sharded(name: str) -> bool:
    """Whether the state key ``name`` belongs to a table (held in pieces in a multi-process run)."""
    return name.startswith(SHARDED_PREFIXES)


def table_of(name: str) -> int:
    """The table number of a sharded key (``emb_l.3.weight``, ``v_W_l.3``: 3)."""
    return int(name.split(".")[1])


def _single_process_position(name: str) -> Tuple[int, int]:
    """Where a sharded key sits in the single-process order: all tables, then all pooling weights,
    each in table order."""
    prefix = name.split(".")[0] + "."
    return SHARDED_PREFIXES.index(prefix), table_of(name)


def _join(parts_by_rank: Sequence[dict], model: nn.Module, key_of=lambda k: k) -> dict:
    """One value per key from every rank's ``{key: value}``: the pieces of a table's tensor joined
    in block order (``key_of`` maps a key to its state-dict name); a value held whole (not a tensor,
    or a table held whole) is the first owner's."""
    by_key: Dict[object, Dict[int, object]] = {}
    for rank, part in enumerate(parts_by_rank):
        for key, value in part.items():
            by_key.setdefault(key, {})[rank] = value
    joined = {}
    for key, by_rank in by_key.items():
        placement = model.emb_l.placement(table_of(key_of(key)))
        values = [by_rank[r] for r in placement.ranks]
        joined[key] = join_pieces(placement, values) if isinstance(values[0], torch.Tensor) else values[0]
    return joined


def full_state_dict(model: nn.Module, info: DistInfo) -> Dict[str, torch.Tensor]:
    """The model's state dict with every table whole, gathered from all ranks in a multi-process
    run, keys in the single-process order (tables first). Complete on rank 0, the rank that saves."""
    state = model.state_dict()
    if info.world_size == 1:
        return state
    parts = gather_objects({k: v for k, v in state.items() if is_sharded(k)}, info, main_only=True)
    if not info.is_main:
        return {k: v for k, v in state.items() if not is_sharded(k)}
    tables = _join(parts, model)
    ordered = {k: tables[k] for k in sorted(tables, key=_single_process_position)}  # stable: a table's keys keep their order
    ordered.update((k, v) for k, v in state.items() if not is_sharded(k))
    return ordered


def full_parameter_names(model: nn.Module, num_tables: int) -> List[str]:
    """Parameter names in a single process's ``parameters()`` order (all tables first, then all
    learned pooling weights), for a model whose tables are sharded."""
    tables = [f"emb_l.{name}" for name in model.emb_l.all_parameter_names]
    pooling = [f"v_W_l.{k}" for k in range(num_tables)] if hasattr(model, "v_W_l") else []
    return tables + pooling + [n for n, _ in model.named_parameters() if not is_sharded(n)]


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, num_tables: int,
                         info: DistInfo, state: Optional[dict] = None) -> dict:
    """The optimizer's state dict in the single-process layout (every table's state whole, gathered
    on rank 0, the rank that saves). ``state``: this rank's state dict, if not the optimizer's own
    (pieces in files put their whole state in it)."""
    state = optimizer.state_dict() if state is None else state
    if info.world_size == 1:
        return state
    local = [n for n, _ in model.named_parameters()]
    names = full_parameter_names(model, num_tables)
    index = {n: i for i, n in enumerate(names)}
    ours = {index[local[i]]: v for i, v in state["state"].items()}
    parts = gather_objects({i: v for i, v in ours.items() if is_sharded(names[i])}, info, main_only=True)
    merged = {i: v for i, v in ours.items() if not is_sharded(names[i])}
    if info.is_main:
        pieces = _join([{(i, k): value for i, entry in part.items() for k, value in entry.items()} for part in parts],
                       model, key_of=lambda key: names[key[0]])
        for (i, k), value in pieces.items():
            merged.setdefault(i, {})[k] = value
    groups = [{**g, "params": list(range(len(index)))} for g in state["param_groups"]]
    return {"state": dict(sorted(merged.items())), "param_groups": groups}


def local_optimizer_state(state: dict, model: nn.Module, num_tables: int, info: DistInfo) -> dict:
    """A single-process-layout optimizer state dict cut down to this rank's parameters and pieces."""
    if info.world_size == 1:
        return state
    local = [n for n, _ in model.named_parameters()]
    index = {n: i for i, n in enumerate(full_parameter_names(model, num_tables))}
    kept = {}
    for i, name in enumerate(local):
        entry = state["state"].get(index[name])
        if entry is None:
            continue
        if is_sharded(name) and isinstance(entry, dict):
            placement = model.emb_l.placement(table_of(name))
            entry = {k: cut_piece(placement, v, info.rank) if isinstance(v, torch.Tensor) else v
                     for k, v in entry.items()}
        kept[i] = entry
    groups = [{**g, "params": list(range(len(local)))} for g in state["param_groups"]]
    return {"state": kept, "param_groups": groups}


def local_weights(weights: Dict[str, torch.Tensor], model: nn.Module, info: DistInfo) -> Dict[str, torch.Tensor]:
    """A single-process-layout state dict cut down to this rank's tables and pieces (and the MLPs).

    Raises:
        ValueError: a table tensor whose extent is not the plan's (the message names the key).
    """
    if info.world_size == 1:
        return weights
    own = model.state_dict()
    kept = {}
    for key, value in weights.items():
        if not is_sharded(key):
            kept[key] = value
        elif key in own:
            try:
                kept[key] = cut_piece(model.emb_l.placement(table_of(key)), value, info.rank)
            except ValueError as exc:
                raise ValueError(f"{key} is {tuple(value.shape)} in the checkpoint, {exc}") from None
    return kept
