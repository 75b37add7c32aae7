"""Checkpoint files in the reference's layout (spec §1.10), written atomically and loaded safely.

A checkpoint is a ``torch.save``d dict with the keys ``nepochs``, ``nbatches``, ``nbatches_test``,
``state_dict`` (model weights: ``emb_l.K.weight``, ``bot_l.N.weight``, ``top_l.N.weight``,
``v_W_l.K``), ``test_acc``, optionally ``test_auc``, ``epoch``, ``iter``, ``train_loss``,
``total_loss`` and ``opt_state_dict``. We add ``lr_scheduler_state_dict`` so that a resumed run
continues the learning-rate schedule exactly; the reference ignores keys it does not know.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any, Dict

import numpy as np
import torch

from dlrm_common import CheckpointError


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
    """Write ``payload`` to ``path`` through a temporary file and a rename, so a crash never
    leaves a half-written checkpoint under the real name."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint without arbitrary unpickling.

    Uses ``torch.load(weights_only=True)`` and allows only the NumPy scalar types that the
    reference's files hold (its ``test_acc`` and ``train_loss``), so reference checkpoints load on
    torch >= 2.6 (spec §8 bug 8) while a file holding anything else is refused.

    Raises:
        CheckpointError: the file is missing, is not a torch checkpoint, holds disallowed objects,
            or lacks the model weights.
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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a DLRM checkpoint (no 'state_dict' entry)")
    return payload


def as_float(value: Any, default: float = 0.0) -> float:
    """A checkpoint scalar (Python, NumPy or 0-d tensor) as a Python float."""
    if value is None:
        return default
    if isinstance(value, torch.Tensor):
        return float(value.item())
    return float(value)
