"""Checkpoints in the reference's layout: safe save and load, the single-process layout across
processes, and restoring a run.

A checkpoint is a ``torch.save``d dict with the reference's keys ``nepochs``, ``nbatches``,
``nbatches_test``, ``state_dict`` (model weights: ``emb_l.K.weight``, ``bot_l.N.weight``,
``top_l.N.weight``, ``v_W_l.K``), ``test_acc``, optionally ``test_auc``, ``epoch``, ``iter``,
``train_loss``, ``total_loss`` and ``opt_state_dict``. We add ``lr_scheduler_state_dict`` (so a
resumed run continues the learning-rate schedule exactly) and ``optimizer`` (its name); the
reference ignores keys it does not know, and files without them load here.

Files are always in the single-process layout: in a multi-process run every rank's tables and
their optimizer state are gathered on rank 0, which writes the file; any number of processes can
load it.
"""
from __future__ import annotations

import numbers
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from atomic_io import atomic_path, raw_file, writing
from dlrm_common import CheckpointError, first_line
from extend_distributed import DistInfo, gather_objects

# ---------------------------------------------------------------------------------------------
# Safe save and load
# ---------------------------------------------------------------------------------------------


def _numpy_scalar_globals() -> list:
    """The NumPy objects that reference checkpoints pickle for their scalar fields."""
    allowed = [np.dtype, np.float64, np.float32, np.int64, np.int32]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["scalar"])
        except ImportError:
            continue
        allowed.append(module.scalar)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType"):
            if hasattr(dtypes, name):
                allowed.append(getattr(dtypes, name))
    return allowed


def save_checkpoint(path: str, payload: Dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` through a temporary file and a rename, so a crash never leaves
    a half-written checkpoint under the real name."""
    # torch.save reports a failed write as a RuntimeError ("unexpected pos ..."); raw_file raises
    # the write's own OSError ("No space left on device", "File too large") instead
    with writing(path, what="the checkpoint", errors=(OSError, RuntimeError)):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_path(path) as tmp, raw_file(tmp) as out:
            torch.save(payload, out)


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint without arbitrary unpickling.

    Uses ``torch.load(weights_only=True)`` and allows only the NumPy scalar types that the
    reference's files hold (its ``test_acc`` and ``train_loss``), so reference checkpoints load on
    torch >= 2.6 (where the reference itself can no longer load them) while a file holding anything
    else is refused.

    Raises:
        CheckpointError: the file is missing, is not a torch checkpoint, holds disallowed objects,
            or its entries have the wrong types.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"(GLOBAL \S+)", str(exc))
        if refused:
            raise CheckpointError(f"{path}: refused to load: it holds {refused.group(1)}, which a DLRM "
                                  "checkpoint never does (only tensors and numbers are allowed)") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch.save file)") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(exc)})") from None
    check_structure(payload, path)
    return payload


_NUMBERS = ("nepochs", "nbatches", "nbatches_test", "epoch", "iter", "test_acc", "test_auc", "train_loss",
            "total_loss")


def check_structure(payload: Any, path: str) -> None:
    """Raise CheckpointError naming the first entry whose type is not what a DLRM checkpoint holds."""
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a DLRM checkpoint (no 'state_dict' entry)")
    for key, value in payload["state_dict"].items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
    for key in _NUMBERS:
        value = payload.get(key)
        if value is not None and not _is_number(value):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a number")
    for key in ("opt_state_dict", "lr_scheduler_state_dict"):
        value = payload.get(key)
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a dict")
    opt = payload.get("opt_state_dict")
    if opt is not None and not (isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        raise CheckpointError(f"{path}: entry 'opt_state_dict' lacks 'state' and 'param_groups'")


def _is_number(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (numbers.Number, np.number)) and not isinstance(value, bool)


def as_float(value: Any, default: float = 0.0) -> float:
    """A checkpoint scalar (Python, NumPy or 0-d tensor) as a Python float."""
    if value is None:
        return default
    if isinstance(value, torch.Tensor):
        return float(value.item())
    return float(value)


# ---------------------------------------------------------------------------------------------
# The single-process layout across processes
# ---------------------------------------------------------------------------------------------


def _is_table(name: str) -> bool:
    return name.startswith("emb_l.")


def full_state_dict(model: nn.Module, info: DistInfo) -> Dict[str, torch.Tensor]:
    """The model's state dict with every table, gathered from all ranks in a multi-process run,
    keys in the single-process order (tables first). Complete on rank 0, the rank that saves."""
    state = model.state_dict()
    if info.world_size == 1:
        return state
    tables = {}
    for part in gather_objects({k: v for k, v in state.items() if _is_table(k)}, info, main_only=True):
        tables.update(part)
    ordered = {k: tables[k] for k in sorted(tables, key=lambda key: int(key.split(".")[1]))}
    ordered.update((k, v) for k, v in state.items() if not _is_table(k))
    return ordered


def _full_parameter_names(model: nn.Module, num_tables: int) -> List[str]:
    """Parameter names in a single process's ``parameters()`` order (all tables first)."""
    tables = [f"emb_l.{k}.weight" for k in range(num_tables)]
    return tables + [n for n, _ in model.named_parameters() if not _is_table(n)]


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, num_tables: int,
                         info: DistInfo) -> dict:
    """The optimizer's state dict in the single-process layout (every table's state, gathered on
    rank 0, the rank that saves)."""
    state = optimizer.state_dict()
    if info.world_size == 1:
        return state
    local = [n for n, _ in model.named_parameters()]
    index = {n: i for i, n in enumerate(_full_parameter_names(model, num_tables))}
    merged = {}
    for part in gather_objects({index[local[i]]: v for i, v in state["state"].items()}, info, main_only=True):
        merged.update(part)
    groups = [{**g, "params": list(range(len(index)))} for g in state["param_groups"]]
    return {"state": dict(sorted(merged.items())), "param_groups": groups}


def local_optimizer_state(state: dict, model: nn.Module, num_tables: int, info: DistInfo) -> dict:
    """A single-process-layout optimizer state dict cut down to this rank's parameters."""
    if info.world_size == 1:
        return state
    local = [n for n, _ in model.named_parameters()]
    index = {n: i for i, n in enumerate(_full_parameter_names(model, num_tables))}
    kept = {i: state["state"][index[n]] for i, n in enumerate(local) if index[n] in state["state"]}
    groups = [{**g, "params": list(range(len(local)))} for g in state["param_groups"]]
    return {"state": kept, "param_groups": groups}


@dataclass(frozen=True)
class Position:
    """Where a checkpoint is taken, and what the run had measured by then."""

    nepochs: int
    nbatches: int
    nbatches_test: int
    epoch: int
    iter: int
    train_loss: float
    test_acc: float
    test_auc: Optional[float] = None


def checkpoint_payload(model: nn.Module, optimizer: torch.optim.Optimizer, optimizer_name: str, scheduler,
                       num_tables: int, info: DistInfo, at: Position) -> Dict[str, Any]:
    """The reference's checkpoint dict (every rank must call this: tables are gathered)."""
    payload = {
        "nepochs": at.nepochs, "nbatches": at.nbatches, "nbatches_test": at.nbatches_test,
        "state_dict": full_state_dict(model, info), "test_acc": float(at.test_acc),
        "epoch": at.epoch, "iter": at.iter, "train_loss": float(at.train_loss), "total_loss": 0.0,
        "opt_state_dict": full_optimizer_state(optimizer, model, num_tables, info),
        "lr_scheduler_state_dict": scheduler.state_dict(), "optimizer": optimizer_name,
    }
    if at.test_auc is not None:
        payload["test_auc"] = float(at.test_auc)
    return payload


# ---------------------------------------------------------------------------------------------
# Restoring a run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resume:
    """What a restored checkpoint tells the loops: where to continue and the best results so far."""

    epoch: int = 0
    batch: int = 0
    best_acc: float = 0.0
    best_auc: float = 0.0


def load_weights(model: nn.Module, weights: Dict[str, torch.Tensor], path: str, info: DistInfo) -> None:
    """Load ``weights`` into ``model``, naming the first key or shape that does not fit."""
    own = model.state_dict()
    if info.world_size > 1:  # this rank's tables and the MLPs
        weights = {k: v for k, v in weights.items() if k in own or not _is_table(k)}
    for key, value in own.items():
        if key not in weights:
            raise CheckpointError(f"{path}: does not fit this model: it has no {key} (this model's is "
                                  f"{tuple(value.shape)})")
        if weights[key].shape != value.shape:
            raise CheckpointError(f"{path}: does not fit this model: {key} is {tuple(weights[key].shape)} in the "
                                  f"checkpoint and {tuple(value.shape)} in this model")
    extra = [k for k in weights if k not in own]
    if extra:
        raise CheckpointError(f"{path}: does not fit this model: it has {extra[0]}, which this model lacks "
                              f"({tuple(weights[extra[0]].shape)})")
    model.load_state_dict(weights)


def _optimizer_of(state: dict, params: List[torch.Tensor]) -> Optional[str]:
    """Which optimizer made ``state`` (the reference saves no name): "sgd" when no parameter has an
    accumulator, "adagrad" when every accumulator has its parameter's shape, "rwsadagrad" when some
    (a table's) has one value per row. None when the state does not match ``params`` at all."""
    sums = {}
    for i, entry in state.get("state", {}).items():
        if not isinstance(entry, dict) or not isinstance(i, int) or not 0 <= i < len(params):
            return None
        if "sum" in entry:
            sums[i] = entry["sum"]
    if not sums:
        return "sgd"
    if all(tuple(s.shape) == tuple(params[i].shape) for i, s in sums.items()):
        return "adagrad"
    return "rwsadagrad"


def restore_optimizer(payload: Dict[str, Any], optimizer: torch.optim.Optimizer, optimizer_name: str,
                      model: nn.Module, num_tables: int, info: DistInfo, path: str,
                      warn: Callable[[str], None]) -> None:
    """Load the saved optimizer state when the same optimizer made it; otherwise start the optimizer
    fresh and say so (another optimizer's state means nothing to this one)."""
    saved = payload.get("opt_state_dict")
    if saved is None:
        return
    local = local_optimizer_state(saved, model, num_tables, info)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_name = payload.get("optimizer") or _optimizer_of(local, params)
    if saved_name != optimizer_name:
        warn(f"warning: {path} holds {saved_name or 'unrecognised'} optimizer state and this run uses "
             f"--optimizer={optimizer_name}: the weights are loaded, the optimizer starts fresh")
        return
    try:
        optimizer.load_state_dict(local)
    except (ValueError, KeyError, IndexError, RuntimeError, TypeError):
        warn(f"warning: {path}: its optimizer state does not fit this run's optimizer (another parameter "
             "layout); the weights are loaded, the optimizer starts fresh")


def check_position(payload: Dict[str, Any], nbatches: int, path: str) -> None:
    """Refuse to resume a checkpoint taken after the last batch this run has in an epoch (it would
    silently train nothing in that epoch)."""
    it, saved_nb = int(payload.get("iter", 0)), int(payload.get("nbatches", nbatches))
    if it > nbatches:
        raise CheckpointError(f"{path}: saved after batch {it} of {saved_nb}, but this run has {nbatches} "
                              "batches per epoch (check --data-size, --num-batches and --mini-batch-size)")


@dataclass(frozen=True)
class Expected:
    """What this run is, for checking and reporting a checkpoint against it."""

    optimizer: str
    nepochs: int
    nbatches: int
    nbatches_test: int
    show_auc: bool = False


def restore(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], scheduler, info: DistInfo,
            log, run: Expected, inference_only: bool = False) -> Resume:
    """Load ``path``: the weights, and when training also the optimizer, the schedule and the position
    to continue from. Prints the reference's lines about the file; returns where to resume."""
    device = next(model.parameters()).device
    payload = load_checkpoint(path, map_location=device)
    log(f"Loading saved model {path}")
    load_weights(model, payload["state_dict"], path, info)
    epoch, it = int(payload.get("epoch", 0)), int(payload.get("iter", 0))
    log(f"Saved at: epoch = {epoch}/{payload.get('nepochs', run.nepochs)}, "
        f"batch = {it}/{payload.get('nbatches', run.nbatches)}, ntbatch = {payload.get('nbatches_test', run.nbatches_test)}")
    log(f"Training state: loss = {as_float(payload.get('train_loss')):.6f}")
    acc, auc = as_float(payload.get("test_acc")), payload.get("test_auc")
    shown_auc = f", auc = {as_float(auc):.3f}" if run.show_auc and auc is not None else ""
    log(f"Testing state: accuracy = {acc * 100:3.3f} %{shown_auc}")
    resume = Resume(best_acc=acc, best_auc=as_float(auc))
    if inference_only:
        return resume
    check_position(payload, run.nbatches, path)
    restore_optimizer(payload, optimizer, run.optimizer, model, model.cfg.num_tables, info, path, log.warn)
    if "lr_scheduler_state_dict" in payload:
        scheduler.load_state_dict(payload["lr_scheduler_state_dict"])
    return Resume(epoch=epoch, batch=it, best_acc=acc, best_auc=as_float(auc))
