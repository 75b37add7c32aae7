"""ONNX export of a trained DLRM (``--save-onnx``), checked after writing.

Inputs are named ``dense_x``, ``offsets`` and ``indices`` (one stacked tensor) or ``indices_<t>``
(one tensor per table, random data); the output is ``pred``, as in the reference. The batch
dimension of ``dense_x``, ``offsets`` (dim 1) and ``pred`` is dynamic; index counts are dynamic too,
and named as such (the reference labelled them batch-sized). The file is checked with
``onnx.checker`` and, when onnxruntime is installed, run once and compared with PyTorch. The graph
is always the float32 one: mixed precision is a property of the training loop, not of the model.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from dlrm.common import Batch, ConfigError
from dlrm.io.atomic import atomic_path, writing


def require_onnx() -> None:
    """Raise ConfigError up front when the ``onnx`` package is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ConfigError("--save-onnx needs the onnx package: pip install onnx (and onnxruntime to check it)") from None


class _ListInputs(nn.Module):
    """Wraps the model so each table's indices is its own graph input."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, dense_x, offsets, *indices):
        return self.model(dense_x, offsets, list(indices))


def _inputs(batch: Batch) -> Tuple[Tuple[torch.Tensor, ...], List[str], Dict[str, Dict[int, str]]]:
    names = ["dense_x", "offsets"]
    axes = {"dense_x": {0: "batch_size"}, "offsets": {1: "batch_size"}, "pred": {0: "batch_size"}}
    if isinstance(batch.indices, torch.Tensor):
        names.append("indices")
        axes["indices"] = {1: "num_indices"}
        return (batch.dense_x, batch.offsets, batch.indices), names, axes
    for t in range(len(batch.indices)):
        names.append(f"indices_{t}")
        axes[f"indices_{t}"] = {0: f"num_indices_{t}"}
    return (batch.dense_x, batch.offsets, *batch.indices), names, axes


def export_onnx(model: nn.Module, batch: Batch, path: str, log: Callable[[str], None]) -> None:
    """Export ``model`` traced on ``batch`` to ``path`` (written atomically), then check it."""
    require_onnx()
    import onnx

    model = model.cpu().eval()
    args, names, axes = _inputs(batch)
    module = model if isinstance(batch.indices, torch.Tensor) else _ListInputs(model)
    log(f"X_onnx.shape {tuple(batch.dense_x.shape)}")
    with writing(path, label=f"--onnx-file={path}"), atomic_path(path, suffix=".onnx") as tmp:
        with warnings.catch_warnings():  # the TorchScript exporter (opset 11, as the reference) is deliberate
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            torch.onnx.export(module, args, tmp, input_names=names, output_names=["pred"], dynamic_axes=axes,
                              opset_version=11, dynamo=False)
        onnx.checker.check_model(onnx.load(tmp))
    _compare_with_runtime(module, args, names, path, log)


def _compare_with_runtime(module, args, names, path, log) -> None:
    """Run the file once with onnxruntime (if installed) and compare with PyTorch's output."""
    try:
        import onnxruntime
    except ImportError:
        log(f"ONNX model written to {path} (checked; install onnxruntime to also compare outputs)")
        return
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    got = session.run(["pred"], {n: a.numpy() for n, a in zip(names, args)})[0]
    with torch.no_grad():
        expected = module(*args).numpy()
    if not torch.allclose(torch.from_numpy(got), torch.from_numpy(expected), rtol=1e-4, atol=1e-5):
        raise ConfigError(f"{path}: onnxruntime's output differs from PyTorch's")
    log(f"ONNX model written to {path} and checked with onnxruntime")
