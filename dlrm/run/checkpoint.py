"""Checkpoints in the reference's layout: safe save and load, the single-process layout across
processes, and restoring a run.

A checkpoint is a ``torch.save``d dict with the reference's keys ``nepochs``, ``nbatches``,
``nbatches_test``, ``state_dict`` (model weights: ``emb_l.K.weight``, ``bot_l.N.weight``,
``top_l.N.weight``, ``v_W_l.K``), ``test_acc``, optionally ``test_auc``, ``epoch``, ``iter``,
``train_loss``, ``total_loss`` and ``opt_state_dict``. We add ``lr_scheduler_state_dict`` (which a
run resumed with ``--fix-reference-bugs`` restores, to continue the learning-rate schedule exactly;
by default the schedule restarts, as in the reference), ``optimizer`` (its name) and ``model_flags``
(the function-changing flags, checked at load); the reference ignores keys it does not know, and
files without them load here. Loading checks the archive's CRC-32s and refuses non-finite weights;
saving refuses them too.

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

from dlrm.common import CheckpointError, NonFiniteError, first_line
from dlrm.distributed import DistInfo
from dlrm.io.atomic import atomic_path, raw_file, writing
from dlrm.shard.state import full_optimizer_state, full_state_dict, local_optimizer_state, local_weights
from dlrm.store.tables import stores_of

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
    refuse_to_save_non_finite(payload, path)
    # torch.save reports a failed write as a RuntimeError ("unexpected pos ..."); raw_file raises
    # the write's own OSError ("No space left on device", "File too large") instead
    with writing(path, what="the checkpoint", errors=(OSError, RuntimeError)):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_path(path) as tmp, raw_file(tmp) as out:
            torch.save(payload, out)


def refuse_to_save_non_finite(payload: Dict[str, Any], path: str) -> None:
    """Raise NonFiniteError, writing nothing, when the weights to save hold NaN or an infinity: a
    diverged model never replaces the checkpoint already there."""
    key = non_finite_entry(payload.get("state_dict", {}))
    if key is not None:
        kept = "the checkpoint there is kept" if os.path.exists(path) else "nothing was written"
        raise NonFiniteError(f"not saving to {path}: {key} holds NaN or infinite values (training diverged); {kept}")


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
    check_archive(path)
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
    refuse_non_finite_weights(payload, path)
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


@dataclass(frozen=True)
class Position:
    """Where a checkpoint is taken, and what the run had measured by then."""

    nepochs: int
    nbatches: int
    nbatches_test: int
    epoch: int
    step: int  # steps done in ``epoch`` (the checkpoint's "iter")
    train_loss: float
    test_acc: float
    test_auc: Optional[float] = None


def checkpoint_payload(model: nn.Module, optimizer: torch.optim.Optimizer, optimizer_name: str, scheduler,
                       num_tables: int, info: DistInfo, at: Position) -> Dict[str, Any]:
    """The reference's checkpoint dict (every rank must call this: tables are gathered)."""
    payload = {
        "nepochs": at.nepochs, "nbatches": at.nbatches, "nbatches_test": at.nbatches_test,
        "state_dict": full_state_dict(model, info), "test_acc": float(at.test_acc),
        "epoch": at.epoch, "iter": at.step, "train_loss": float(at.train_loss), "total_loss": 0.0,
        "opt_state_dict": full_optimizer_state(optimizer, model, num_tables, info,
                                               _whole_tables_state(optimizer.state_dict(), optimizer, model)),
        "lr_scheduler_state_dict": scheduler.state_dict(), "optimizer": optimizer_name,
    }
    if hasattr(model, "cfg"):
        payload[MODEL_FLAGS_KEY] = model_flags(model.cfg)
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
    quantized_restores: int = 0  # of the run's past (a restored --checkpoint-dir whose tables were quantized)


def load_weights(model: nn.Module, weights: Dict[str, torch.Tensor], path: str, info: DistInfo) -> None:
    """Load ``weights`` into ``model``, naming the first key or shape that does not fit."""
    own = model.state_dict()
    try:
        weights = local_weights(weights, model, info)  # this rank's pieces of the tables, and the MLPs
    except ValueError as exc:
        raise CheckpointError(f"{path}: does not fit this model: {exc}") from None
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


def _whole_tables_state(state: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """``state`` with the accumulators of tables (or a rank's pieces) kept in files read whole from them."""
    for stored in stores_of(model.emb_l) if hasattr(model, "emb_l") else []:
        state = stored.whole_optimizer_state(optimizer, state)
    return state


def _optimizer_of(state: dict, shapes: List[tuple]) -> Optional[str]:
    """Which optimizer made ``state`` (the reference saves no name): "rwsadagrad" when some entry (a
    table's) has a row-wise accumulator, which the reference keeps under ``momentum`` (an older file
    of ours under ``sum``, one value per row); "adagrad" when every accumulator is a ``sum`` of its
    parameter's shape; "sgd" when there is none. None when the state does not match the parameters'
    ``shapes``."""
    sums = {}
    for i, entry in state.get("state", {}).items():
        if not isinstance(entry, dict) or not isinstance(i, int) or not 0 <= i < len(shapes):
            return None
        if "momentum" in entry:
            return "rwsadagrad"
        if "sum" in entry:
            sums[i] = entry["sum"]
    if not sums:
        return "sgd"
    if all(tuple(s.shape) == tuple(shapes[i]) for i, s in sums.items()):
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
    shapes = [tuple(p.shape) for p in params]
    stores = stores_of(model.emb_l) if hasattr(model, "emb_l") else []
    for stored in stores:  # its parameters are a batch's working rows: the tables (or pieces) are whole
        for i, shape in stored.whole_shapes(optimizer).items():
            shapes[i] = shape
    saved_name = payload.get("optimizer") or _optimizer_of(local, shapes)
    if saved_name != optimizer_name:
        warn(f"warning: {path} holds {saved_name or 'unrecognised'} optimizer state and this run uses "
             f"--optimizer={optimizer_name}: the weights are loaded, the optimizer starts fresh")
        return
    try:
        for stored in stores:
            local = stored.take_optimizer_state(optimizer, local)  # the tables' accumulators go to their files
        optimizer.load_state_dict(local)
    except (ValueError, KeyError, IndexError, RuntimeError, TypeError):
        warn(f"warning: {path}: its optimizer state does not fit this run's optimizer (another parameter "
             "layout); the weights are loaded, the optimizer starts fresh")


def check_position(payload: Dict[str, Any], nbatches: int, path: str, fix_reference_bugs: bool,
                   warn: Callable[[str], None]) -> None:
    """Warn, or refuse, when a checkpoint was taken after the last batch this run has in an epoch.

    Saved in the first epoch, the reference skips that many batches in every epoch, so it completes
    and trains nothing (no training line, no test, no save): by default we do the same, with a
    warning. Refused with ``fix_reference_bugs`` (which skips them in the saved epoch only, so the run
    would silently lose that epoch) and for a later epoch (where the reference never completed).
    """
    it, saved_nb = int(payload.get("iter", 0)), int(payload.get("nbatches", nbatches))
    if it <= nbatches:
        return
    where = f"{path}: saved after batch {it} of {saved_nb}, but this run has {nbatches} batches per epoch"
    if int(payload.get("epoch", 0)) == 0 and not fix_reference_bugs:
        warn(f"warning: {where}: as the reference does, the first {it} batches of every epoch are skipped, "
             "so nothing will be trained (check --data-size, --num-batches and --mini-batch-size)")
        return
    raise CheckpointError(f"{where} (check --data-size, --num-batches and --mini-batch-size)")


@dataclass(frozen=True)
class Expected:
    """What this run is, for checking and reporting a checkpoint against it."""

    optimizer: str
    nepochs: int
    nbatches: int
    nbatches_test: int
    show_auc: bool = False
    fix_reference_bugs: bool = False


def restore(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], scheduler, info: DistInfo,
            log, run: Expected, inference_only: bool = False) -> Resume:
    """Load ``path``: the weights, and when training also the optimizer and the position to continue
    from (and with ``run.fix_reference_bugs`` the schedule's state; by default the schedule restarts,
    as in the reference). Prints the reference's lines about the file; returns where to resume."""
    device = next(model.parameters()).device
    restores = 0
    if os.path.isdir(path):  # a --checkpoint-dir: its base with the increments applied
        from dlrm.checkpoints.chain import describe_chain, load_chain, quantized_restores

        payload = load_chain(path, map_location=device)
        restores = quantized_restores(path)
        log.note(f"{path}: resuming from {describe_chain(path)}")
    else:
        payload = load_checkpoint(path, map_location=device)
    check_model_flags(payload, model.cfg, path)
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
    check_position(payload, run.nbatches, path, run.fix_reference_bugs, log.warn)
    restore_optimizer(payload, optimizer, run.optimizer, model, model.cfg.num_tables, info, path, log.warn)
    if run.fix_reference_bugs and "lr_scheduler_state_dict" in payload:
        scheduler.load_state_dict(payload["lr_scheduler_state_dict"])
    return Resume(epoch=epoch, batch=it, best_acc=acc, best_auc=as_float(auc), quantized_restores=restores)


# ---------------------------------------------------------------------------------------------
# Verification: the archive's checksums, finite weights, and the flags that shape the model
# ---------------------------------------------------------------------------------------------

MODEL_FLAGS_KEY = "model_flags"
"""Our key for :func:`model_flags` in a checkpoint (the reference's loader ignores keys it does not
read; its files lack it and load as before)."""


def check_archive(path: str) -> None:
    """Raise CheckpointError naming the damaged entry when one of the file's zip entries fails its
    CRC-32 check (torch's loader reads them without checking). A file in torch's older, non-zip
    format carries no checksums and passes."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: damaged: its zip archive cannot be read ({first_line(exc)})") from None
    if damaged is not None:
        entry = damaged.split("/", 1)[-1]  # torch names the archive's top folder after the file
        owner = _entry_owner(path, entry)
        held = f" (it holds {owner})" if owner else ""
        raise CheckpointError(f"{path}: damaged: its entry {entry}{held} fails its CRC-32 check (the file "
                              "changed after it was written); use another copy")


def _entry_owner(path: str, entry: str) -> Optional[str]:
    """The name of the tensor stored in ``entry`` (``data/<k>``), or None. torch numbers storages in
    the order the pickler first meets them, which is the payload's order, depth first."""
    match = re.fullmatch(r"data/(\d+)", entry)
    if not match:
        return None
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # the damage may be anywhere: naming the tensor is a courtesy
        return None
    owners: Dict[int, List[str]] = {}  # views of one storage (the fused tables) share its entry
    for name, tensor in _tensors_in_order(payload, ""):
        storage = tensor.untyped_storage()
        owners.setdefault(storage.data_ptr() if storage.nbytes() else id(storage), []).append(name)
    names = [", ".join(views) for views in owners.values()]
    k = int(match.group(1))
    return names[k] if k < len(names) else None


def _tensors_in_order(value: Any, prefix: str):
    """(dotted name, tensor) of every tensor in ``value``, in pickling order."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors_in_order(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors_in_order(item, f"{prefix}.{i}")


def non_finite_entry(tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    """The first key whose floating-point tensor holds NaN or an infinity; None when all are finite."""
    for key, value in tensors.items():
        if not value.is_floating_point() or bool(torch.isfinite(value.sum())):
            continue  # a finite sum has finite terms: one pass, no boolean copy
        if not bool(torch.isfinite(value).all()):  # the sum may also have overflowed
            return key
    return None


def refuse_non_finite_weights(payload: Dict[str, Any], path: str) -> None:
    """Raise CheckpointError when a loaded checkpoint's weights hold NaN or an infinity (a diverged
    run's model: it would train or evaluate on silently)."""
    key = non_finite_entry(payload.get("state_dict", {}))
    if key is not None:
        raise CheckpointError(f"{path}: {key} holds NaN or infinite values (saved from a diverged run); "
                              "refused")


def model_flags(cfg: Any) -> Dict[str, Any]:
    """The flags that change the function the model computes, as in effect, under the reference's
    names: QR settings only where some table is above --qr-threshold, MD settings only with
    --md-flag, the loss threshold only inside (0, 1); fixed pooling weights (all 1) are no weights."""
    quotient_remainder = bool(cfg.qr_flag and max(cfg.table_sizes) > cfg.qr_threshold)
    flags = {"activation_function": cfg.activation, "arch_interaction_op": cfg.interaction,
             "arch_interaction_itself": bool(cfg.interaction_itself and cfg.interaction == "dot"),
             "weighted_pooling": "learned" if cfg.weighted_pooling == "learned" else "none",
             "loss_threshold": float(cfg.loss_threshold) if 0.0 < cfg.loss_threshold < 1.0 else 0.0,
             "qr_flag": quotient_remainder, "md_flag": bool(cfg.md_flag)}
    if quotient_remainder:
        flags.update(qr_threshold=cfg.qr_threshold, qr_operation=cfg.qr_operation, qr_collisions=cfg.qr_collisions)
        if max(cfg.table_sizes) > 1 << 24:  # the reference's float quotient differs only above 2**24 rows
            flags["fix_reference_bugs"] = bool(cfg.fix_reference_bugs)
    if cfg.md_flag:
        flags.update(md_threshold=cfg.md_threshold, md_temperature=float(cfg.md_temperature),
                     md_round_dims=bool(cfg.md_round_dims))
    return flags


def check_model_flags(payload: Dict[str, Any], cfg: Any, path: str) -> None:
    """Refuse a checkpoint saved with other function-changing flags than this run's, naming the
    first that differs. Checkpoints without the record (the reference's) pass."""
    saved = payload.get(MODEL_FLAGS_KEY)
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: entry {MODEL_FLAGS_KEY!r} is a {type(saved).__name__}, not a dict")
    own = model_flags(cfg)  # a key the record lacks was not recorded then: it is not compared
    for key in [k for k in own if k in saved] + [k for k in saved if k not in own]:
        if saved.get(key) != own.get(key):
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(f"{path}: saved with {flag}={saved.get(key, '(not in effect)')}, and this run "
                                  f"has {flag}={own.get(key, '(not in effect)')}: the model would compute another "
                                  "function; run with the checkpoint's value")
