"""Incremental checkpoints: the rows of the tables a run touched since the last checkpoint, and
the base they apply to.

A full checkpoint (the reference's layout: ``state_dict``, ``opt_state_dict``, the position) is a
*base*. An *increment* holds what changed since the checkpoint before it: of every table
(``emb_l.K.weight``) only the rows looked up since then, with the same rows of its optimizer state
(Adagrad's ``sum`` rows, row-wise Adagrad's accumulator entries); every other parameter, optimizer
entry, the LR schedule and the position whole. A step changes no other row of a table: its sparse
gradient, and so the SGD, Adagrad and row-wise Adagrad updates, touch the looked-up rows only. So
a base with its increments applied in order is the full checkpoint of the last increment's step,
bit for bit.

An increment is itself a checkpoint file (tensors and numbers only, read by the safe loader): its
``state_dict`` holds the dense parameters, ``rows`` the tables' touched rows,
``{key: {"rows": (n,) int64, "values": (n, D)}}``, and ``opt_rows`` the optimizer entries whose
per-row tensors were cut to those rows, ``{index: {"table": key, "names": [their names]}}``.

Dimension vocabulary: R rows of a table, D its dimension, n rows touched.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Sequence

import numpy as np
import torch

TABLE_KEY = re.compile(r"^emb_l\.(\d+)\.weight$")
"""A plain table's state-dict key; its number is the table's."""


class TouchedRows:
    """The rows of each table that batches looked up since the last :meth:`take`: a bitmap per
    table, so noting a batch costs one scattered write per lookup (no sort on the step's path).

    Args:
        table_sizes: R of each table.
    """

    def __init__(self, table_sizes: Sequence[int]):
        self._seen = [np.zeros(int(rows), dtype=bool) for rows in table_sizes]

    def add(self, indices) -> None:
        """Note a batch's ``indices``: (T, N) or a list of T (N_t,) tensors."""
        for t, seen in enumerate(self._seen):
            seen[indices[t].detach().cpu().numpy()] = True

    def take(self) -> Dict[int, np.ndarray]:
        """Each table's touched rows, sorted, (n_t,); then start afresh."""
        rows = {t: np.flatnonzero(seen) for t, seen in enumerate(self._seen)}
        for seen in self._seen:
            seen.fill(False)
        return rows


def table_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """The plain tables' keys of a state dict -> their table numbers."""
    return {key: int(m.group(1)) for key in state_dict for m in [TABLE_KEY.match(key)] if m}


def make_increment(payload: Dict[str, Any], touched: Dict[int, np.ndarray], parameter_names: Sequence[str]
                   ) -> Dict[str, Any]:
    """The increment of a full checkpoint ``payload`` (the single-process layout) holding only the
    ``touched`` rows of each table. ``parameter_names``: the names of the optimizer's parameters, in
    its order (the single-process ``parameters()`` order)."""
    state = payload["state_dict"]
    tables = table_keys(state)
    increment = {k: v for k, v in payload.items() if k not in ("state_dict", "opt_state_dict")}
    increment["state_dict"] = {k: v for k, v in state.items() if k not in tables}
    increment["rows"] = {}
    for key, t in tables.items():
        rows = torch.from_numpy(np.ascontiguousarray(touched.get(t, np.empty(0, np.int64)), dtype=np.int64))
        increment["rows"][key] = {"rows": rows, "values": state[key].index_select(0, rows).clone()}
    opt = payload.get("opt_state_dict")
    if opt is not None:
        entries, cut = {}, {}
        for i, entry in opt["state"].items():
            key = parameter_names[i] if isinstance(i, int) and i < len(parameter_names) else None
            if key in tables and isinstance(entry, dict):
                rows = increment["rows"][key]["rows"]
                height = state[key].shape[0]
                names = [k for k, v in entry.items() if _per_row(v, height)]
                entries[i] = {k: v.index_select(0, rows).clone() if k in names else v for k, v in entry.items()}
                cut[i] = {"table": key, "names": names}
            else:
                entries[i] = entry
        increment["opt_state_dict"] = {"state": entries, "param_groups": opt["param_groups"]}
        increment["opt_rows"] = cut
    return increment


def _per_row(value: Any, rows: int) -> bool:
    """Whether an optimizer entry has one row (or one value) per table row."""
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows


def apply_increment(base: Dict[str, Any], increment: Dict[str, Any], where: str = "the increment") -> Dict[str, Any]:
    """``base`` (a full checkpoint, changed in place and returned) brought forward by ``increment``.

    Raises:
        ValueError: the increment does not fit the base (a key, a row or a shape); the message
            names it and ``where``.
    """
    state = base["state_dict"]
    for key, value in increment["state_dict"].items():
        if key not in state or state[key].shape != value.shape:
            raise ValueError(f"{where}: {key} does not fit the base")
        state[key] = value
    for key, piece in increment.get("rows", {}).items():
        rows, values = piece["rows"], piece["values"]
        table = state.get(key)
        if table is None or (len(rows) and (int(rows.max()) >= table.shape[0] or values.shape[1:] != table.shape[1:])):
            raise ValueError(f"{where}: the rows of {key} do not fit the base")
        table.index_copy_(0, rows, values.to(table.dtype))
    opt = increment.get("opt_state_dict")
    if opt is not None:
        base_opt = base.setdefault("opt_state_dict", {"state": {}, "param_groups": opt["param_groups"]})
        cut = increment.get("opt_rows", {})
        for i, entry in opt["state"].items():
            if i not in cut:
                base_opt["state"][i] = entry
                continue
            rows = increment["rows"][cut[i]["table"]]["rows"]
            whole = base_opt["state"].get(i)
            if whole is None:
                raise ValueError(f"{where}: optimizer entry {i} has no whole state in the base")
            for name, value in entry.items():
                if name in cut[i]["names"]:
                    target = whole.get(name)
                    if not isinstance(target, torch.Tensor) or target.shape[1:] != value.shape[1:]:
                        raise ValueError(f"{where}: optimizer entry {i}.{name} does not fit the base")
                    target.index_copy_(0, rows, value)
                else:
                    whole[name] = value
        base_opt["param_groups"] = opt["param_groups"]
    for key, value in increment.items():
        if key not in ("state_dict", "opt_state_dict", "rows", "opt_rows"):
            base[key] = value
    return base


def increment_bytes(increment: Dict[str, Any]) -> int:
    """The bytes of an increment's tensors (what it writes, within the file's overhead)."""
    def size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        return 0
    return size(increment)
