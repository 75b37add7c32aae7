"""Opt-in faster numerics for DLRM's dense part (``--fast-numerics``): the MLPs and the dot interaction.

Nothing here runs unless asked for; the default path stays plain PyTorch, bit for bit.
:func:`accelerate_mlps` swaps, in place, ``model.bot_l``/``model.top_l`` for :class:`FastMLP`
containers holding :class:`FastLinear` layers, and a :class:`dlrm_model.DotInteraction` for a
:class:`FastDotInteraction`. Every FastLinear holds the original ``weight`` and ``bias`` Parameter
objects, so ``state_dict`` keys (``bot_l.N.weight``, ``top_l.N.bias``, ...), parameter order and an
optimizer built before the swap are unchanged; parameters and gradients stay float32.
:func:`restore_mlps` undoes the swap (for ONNX export and dynamic quantization, which look for plain
``nn.Linear``).

Dimension vocabulary: B batch, T tables, D embedding dimension, F = T + 1 interaction features,
P interaction pairs, N_in / N_out a Linear layer's widths.

What it changes (the measurements behind each choice are in ``bench/RESULTS.md``, "Fast dense
numerics"):

* Linear + activation as one autograd node (:class:`LinearAct`) for B >= ``AUTO_MIN_BATCH``: the
  forward and the input gradient on oneDNN (``torch.ops.mkldnn._linear_pointwise``, the activation
  as its post-op) at the shapes where that was faster than MKL, the weight gradient ``g^T x`` on MKL.
  Below that batch (the Kaggle model's 128) torch's own ops run, as ``nn.Linear`` would, because a
  Python autograd node costs more there than it saves. ``gemm="mkl"``/``"onednn"`` force one
  backend on every layer (for comparisons). No prepacked weights, so there is nothing to refresh
  after optimizer steps.
* The dot interaction as one node, by a small C++ kernel (``csrc/dot_interaction.cpp``, built on
  first use like ``fused_embedding``'s, then cached; pure-torch fallback :class:`DotPairs`):
  torch's ``bmm`` pays its call overhead per sample on F x D products, and the reference
  formulation adds a concatenation, an advanced-index gather and its accumulating backward.
* Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (``--mixed-precision=bf16``),
  ``bf16_gemms`` decides: "auto" runs the MLP GEMMs in bfloat16, as autocast would, only where the
  CPU has native bf16 (AVX512-BF16 or AMX). Elsewhere torch's bf16 GEMMs are emulated, many times
  slower than float32 ones, so they run in float32: faster and more accurate.
  The interaction always runs in float32. :func:`describe` gives the one line to log.

Accuracy: float32 throughout. A layer's outputs and gradients differ from ``nn.Linear``'s only by
the GEMMs' summation order (and oneDNN's own sigmoid/tanh): within rtol=1e-5 plus 1e-5 of the
tensor's largest magnitude in the tests. Over many SGD steps the accelerated model's losses drift
from the plain model's by that rounding alone; the tests allow 5e-4 (relative) over 200 steps.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from dlrm.kernels import native_build
from dlrm.model.dlrm import DotInteraction

GEMMS = ("auto", "mkl", "onednn")
BF16_GEMMS = ("auto", "yes", "no")
_ACTIVATIONS = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
try:
    _linear_pointwise = torch.ops.mkldnn._linear_pointwise  # oneDNN linear with a fused activation
except (AttributeError, RuntimeError):  # a torch built without oneDNN
    _linear_pointwise = None


def has_native_bf16() -> bool:
    """The CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles), as torch's private probes say."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError as error:  # see the README's "Private APIs we rely on"
        raise RuntimeError(f"torch {torch.__version__} has no torch.cpu._is_avx512_bf16_supported or "
                           f"_is_amx_tile_supported, which tell whether the CPU has native bfloat16 "
                           f"({error}); has_native_bf16 in dlrm/model/fast_numerics.py needs updating") from error


def resolve_gemm(gemm: str) -> str:
    """Check ``gemm`` and return the GEMM backend to use.

    ``gemm`` is "auto" (per shape, see :func:`onednn_forward`), "mkl" or "onednn"; the answer is
    "mkl" when torch has no oneDNN."""
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {', '.join(GEMMS)}, got {gemm!r}")
    return gemm if _linear_pointwise is not None and torch.backends.mkldnn.is_available() else "mkl"


AUTO_MIN_BATCH = 256
"""With ``gemm="auto"``, batches below this run on torch's own Linear ops: at B=128 (the Kaggle
model) the custom autograd node's Python overhead cost more than fusing saved, and oneDNN lost to
MKL on every layer."""


def onednn_forward(gemm: str, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether act(x W^T + b) runs on oneDNN.

    "auto": float32 on the CPU, B >= 256 and N_out >= 64, the shapes where oneDNN's forward beat
    MKL's (``bench/RESULTS.md``, "Fast dense numerics")."""
    if gemm == "mkl" or x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    return gemm == "onednn" or (x.shape[0] >= AUTO_MIN_BATCH and weight.shape[0] >= 64)


def onednn_input_grad(gemm: str, grad: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether d x = g W runs on oneDNN.

    "auto": float32, B >= 256 and N_in, N_out >= 256, the shapes where oneDNN's input gradient beat
    MKL's. The weight gradient always runs on MKL, which was faster there."""
    if gemm == "mkl" or grad.dtype != torch.float32 or grad.device.type != "cpu":
        return False
    return gemm == "onednn" or (grad.shape[0] >= AUTO_MIN_BATCH and min(weight.shape) >= 256)


def resolve_bf16(bf16_gemms: str) -> bool:
    """Whether GEMMs run in bfloat16 under bf16 autocast ("auto": where the CPU has native bf16)."""
    if bf16_gemms not in BF16_GEMMS:
        raise ValueError(f"bf16_gemms must be one of {', '.join(BF16_GEMMS)}, got {bf16_gemms!r}")
    return has_native_bf16() if bf16_gemms == "auto" else bf16_gemms == "yes"


# ---------------------------------------------------------------------------------------------
# Linear + activation as one autograd node
# ---------------------------------------------------------------------------------------------


def _forward_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str,
                  gemm: str) -> torch.Tensor:
    """Compute act(x W^T + b), (B, N_out)."""
    if onednn_forward(gemm, x, weight):
        return _linear_pointwise(x, weight, bias, act, [], "")
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    return _activate_(y, act)


def _activation_backward(grad: torch.Tensor, out: torch.Tensor, act: str) -> torch.Tensor:
    """Compute d loss / d (pre-activation) from the activation's output, as autograd does."""
    if act == "relu":
        return torch.ops.aten.threshold_backward(grad, out, 0)
    if act == "sigmoid":
        return torch.ops.aten.sigmoid_backward(grad, out)
    if act == "tanh":
        return torch.ops.aten.tanh_backward(grad, out)
    return grad


class LinearAct(torch.autograd.Function):
    """The layer ``act(x W^T + b)`` with its backward, as one autograd node.

    ``act`` is "none", "relu", "sigmoid" or "tanh"; ``gemm`` "auto", "mkl" or "onednn" (see
    :func:`onednn_forward`, :func:`onednn_input_grad`). All tensors share one dtype (float32, or
    bfloat16 under bf16 autocast on native-bf16 CPUs); the caller casts. Saved for backward: x, W
    and the output (which the next layer saves as its input, so nothing is copied).

    Shape:
        - x: (B, N_in); weight: (N_out, N_in); bias: (N_out,) or None.
        - Output: (B, N_out).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str,
                gemm: str) -> torch.Tensor:
        out = _forward_gemm(x, weight, bias, act, gemm)
        ctx.act, ctx.gemm, ctx.has_bias = act, gemm, bias is not None
        ctx.save_for_backward(x, weight, out if act != "none" else None)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, out = ctx.saved_tensors
        grad = _activation_backward(grad_out, out, ctx.act)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if onednn_input_grad(ctx.gemm, grad, weight):
                grad_x = _linear_pointwise(grad, weight.t(), None, "none", [], "")  # g W, (B, N_in)
            else:
                grad_x = grad.mm(weight)
        if ctx.needs_input_grad[1]:
            grad_w = grad.t().mm(x)  # (N_out, N_in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b, None, None


def _plain_linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
    """Compute act(x W^T + b) by torch's own ops and autograd nodes.

    The activation runs in place on the fresh GEMM output. Below ``AUTO_MIN_BATCH`` rows a Python
    autograd node costs more than it saves."""
    return _activate_(torch.nn.functional.linear(x, weight, bias), act)


def _activate_(y: torch.Tensor, act: str) -> torch.Tensor:
    """Apply ``act`` in place to a fresh GEMM output ("none": ``y`` as it is)."""
    if act == "relu":
        return y.relu_()
    if act == "sigmoid":
        return y.sigmoid_()
    if act == "tanh":
        return y.tanh_()
    return y


def _gemm_dtype(bf16: bool) -> torch.dtype:
    """The GEMMs' dtype: bfloat16 under bf16 autocast when ``bf16``, else float32."""
    if bf16 and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


class FastLinear(nn.Linear):
    """An ``nn.Linear`` whose forward and backward GEMMs run through :class:`LinearAct`.

    Same parameters, names and init as ``nn.Linear`` (build it with :meth:`from_linear` to share an
    existing layer's Parameters). Outside autocast everything is float32. Under bf16 autocast the
    GEMMs run in bfloat16 if ``bf16`` (as autocast would), else in float32 (autocast is switched
    off for the call and the input cast up; the output is then float32).

    Args (of :meth:`from_linear`):
        linear: the layer whose Parameters to hold.
        gemm: "auto", "mkl" or "onednn" (see :func:`onednn_forward`). Default: "auto".
        bf16_gemms: "auto" (bf16 where the CPU has native bf16), "yes" or "no". Default: "auto".

    Shape:
        - Input: (..., N_in). Output: (..., N_out).
    """

    gemm: str = "auto"
    bf16: bool = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, gemm: str = "auto", bf16_gemms: str = "auto") -> "FastLinear":
        """A FastLinear holding ``linear``'s own ``weight`` and ``bias`` Parameters (not copies)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.gemm, layer.bf16 = resolve_gemm(gemm), resolve_bf16(bf16_gemms)
        return layer

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's Parameters."""
        layer = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, bias=self.bias is not None)
        layer.weight = self.weight
        layer.bias = self.bias
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gemm={self.gemm}, bf16={self.bf16}"

    def run(self, x: torch.Tensor, act: str, dtype: torch.dtype) -> torch.Tensor:
        """Compute act(x W^T + b) in ``dtype``, autocast already off (what :class:`FastMLP` calls)."""
        weight, bias = self.weight, self.bias
        if dtype != torch.float32:
            weight, bias = weight.to(dtype), (bias.to(dtype) if bias is not None else None)
        if x.dtype != dtype:
            x = x.to(dtype)
        if self.gemm == "auto" and (x.dim() != 2 or x.shape[0] < AUTO_MIN_BATCH):
            return _plain_linear_act(x, weight, bias, act)
        if x.dim() == 2:
            return LinearAct.apply(x, weight, bias, act, self.gemm)
        out = LinearAct.apply(x.reshape(-1, x.shape[-1]), weight, bias, act, self.gemm)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def forward(self, x: torch.Tensor, act: str = "none") -> torch.Tensor:
        if not torch.is_autocast_enabled("cpu"):
            return self.run(x, act, torch.float32)
        dtype = _gemm_dtype(self.bf16)
        with torch.autocast("cpu", enabled=False):
            return self.run(x, act, dtype)


class FastMLP(nn.Sequential):
    """An MLP (``nn.Sequential`` of Linear layers and activations) whose Linear layers run fused with
    the activation that follows them. Same children, so the same ``state_dict`` keys; the
    activation modules stay in place (for printing and :func:`restore_mlps`) but are applied
    inside the Linear's node.

    Shape:
        - Input: (B, N_in of the first layer). Output: (B, N_out of the last layer).
    """

    def __init__(self, *modules: nn.Module):
        super().__init__(*modules)
        self._plan = self._build_plan()

    def _build_plan(self) -> List[Tuple[nn.Module, Optional[str]]]:
        """List the forward's steps as (module, activation fused into it)."""
        children, plan, i = list(self), [], 0
        while i < len(children):
            module = children[i]
            following = children[i + 1] if i + 1 < len(children) else None
            act = _ACTIVATIONS.get(type(following))
            if isinstance(module, FastLinear) and act is not None:
                plan.append((module, act))
                i += 2
            else:
                plan.append((module, None))
                i += 1
        return plan

    def _run(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        for module, act in self._plan:
            x = module.run(x, act or "none", dtype) if isinstance(module, FastLinear) else module(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled("cpu"):
            return self._run(x, torch.float32)
        first = next((m for m, _ in self._plan if isinstance(m, FastLinear)), None)
        dtype = _gemm_dtype(first is not None and first.bf16)
        with torch.autocast("cpu", enabled=False):
            return self._run(x, dtype)


# ---------------------------------------------------------------------------------------------
# The dot interaction as one autograd node
# ---------------------------------------------------------------------------------------------


INTERACTION_BACKEND_ENV = "DLRM_FAST_INTERACTION_BACKEND"


def _load_extension() -> Tuple[object, str, float]:
    """Build or load the ``csrc/dot_interaction.cpp`` kernel, once per process.

    Returns (the module or None, why not, seconds taken). The build uses the CPU capability's vector
    instructions, so each capability has its own folder."""
    capability = torch.backends.cpu.get_cpu_capability()
    vector = ("-mavx2", "-mfma") if capability in ("AVX2", "AVX512") else ()
    return native_build.load("dlrm_dot_interaction", "dot_interaction.cpp", f"dot_interaction_{capability.lower()}",
                             ("-O3", "-fopenmp") + vector, ("-fopenmp",))


def extension_status() -> Tuple[bool, str, float]:
    """Build or load the interaction kernel if not done yet: (available, why not, seconds taken)."""
    module, reason, seconds = _load_extension()
    return module is not None, reason, seconds


def resolve_interaction_backend(backend: str) -> str:
    """Pick the interaction's backend, "cpp" or "torch", for ``backend`` ("auto": the kernel where it builds).

    The environment variable ``DLRM_FAST_INTERACTION_BACKEND`` overrides the argument."""
    backend = os.environ.get(INTERACTION_BACKEND_ENV) or backend
    if backend not in ("auto", "cpp", "torch"):
        raise ValueError(f"interaction backend must be one of auto, cpp, torch, got {backend!r}")
    if backend == "torch":
        return "torch"
    available, reason, _ = extension_status()
    if not available and backend == "cpp":
        raise RuntimeError(f"the dot interaction kernel did not build: {reason}")
    return "cpp" if available else "torch"


class DotPairsKernel(torch.autograd.Function):
    """The features ``[x, <v_i, v_j> for the pairs]`` by the C++ kernel (float32 CPU), as one autograd node.

    Shape:
        - rows, cols: (P,) int64; features: F tensors (B, D), the first one x.
        - Output: (B, D + P).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, cols: torch.Tensor, *features: torch.Tensor) -> torch.Tensor:
        features = tuple(f if f.stride(-1) == 1 else f.contiguous() for f in features)
        ctx.save_for_backward(rows, cols, *features)
        return _load_extension()[0].dot_forward(list(features), rows, cols)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, cols, *features = ctx.saved_tensors
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        grads = _load_extension()[0].dot_backward(grad_out, features, rows, cols)
        return (None, None) + tuple(grads)


class DotPairs(torch.autograd.Function):
    """The features ``[x, <v_i, v_j> for the pairs]`` for v = [x, e_1..e_T], as one autograd node (pure torch).

    Forward: one ``bmm`` (B, F, F), the pairs read with ``index_select`` at ``flat = i * F + j``.
    Backward: the pair gradients written into a zero (B, F, F) with ``index_copy_`` (each pair
    once), symmetrised, and one ``bmm`` with the features: d v = (G + G^T) v.

    Shape:
        - flat: (P,) int64; dense: (B, D); embedded: T tensors (B, D).
        - Output: (B, D + P).
    """

    @staticmethod
    def forward(ctx, flat: torch.Tensor, dense: torch.Tensor, *embedded: torch.Tensor) -> torch.Tensor:
        batch, dim = dense.shape
        features = torch.cat((dense,) + embedded, dim=1).view(batch, -1, dim)  # (B, F, D)
        products = torch.bmm(features, features.transpose(1, 2))  # (B, F, F)
        pairs = products.view(batch, -1).index_select(1, flat)  # (B, P)
        ctx.save_for_backward(flat, features)
        return torch.cat([dense, pairs], dim=1)  # (B, D + P)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        flat, features = ctx.saved_tensors
        batch, num, dim = features.shape
        grad_products = grad_out.new_zeros(batch, num * num)
        grad_products.index_copy_(1, flat, grad_out[:, dim:])
        grad_products = grad_products.view(batch, num, num)
        grad_features = torch.bmm(grad_products + grad_products.transpose(1, 2), features)  # (B, F, D)
        grad_dense = grad_features[:, 0] + grad_out[:, :dim]
        return (None, grad_dense) + tuple(grad_features[:, t] for t in range(1, num))


class FastDotInteraction(DotInteraction):
    """The dot interaction (same pairs, order and width as :class:`DotInteraction`) as one autograd node.

    It runs the C++ kernel :class:`DotPairsKernel` (``backend`` "cpp") or :class:`DotPairs`
    ("torch"); "auto" uses the kernel where it builds. Always float32 (under bf16 autocast too: it is cheap, and exact
    products keep the top MLP's input accurate). No parameters; its buffers are not persistent, so
    ``state_dict`` is unchanged.

    Shape:
        - dense: (B, D); embedded: list of T tensors (B, D).
        - Output: (B, D + P), float32.
    """

    def __init__(self, num_features: int, self_interaction: bool = False, backend: str = "auto"):
        super().__init__(num_features, self_interaction)
        self.num_features = num_features
        self.self_interaction = self_interaction
        self.register_buffer("flat", self.rows * num_features + self.cols, persistent=False)
        self.backend = resolve_interaction_backend(backend)

    @classmethod
    def from_interaction(cls, layer: DotInteraction, backend: str = "auto") -> "FastDotInteraction":
        num_features = int(layer.rows.max()) + 1 if layer.rows.numel() else 1
        itself = bool((layer.rows == layer.cols).any())
        return cls(num_features, itself, backend).to(layer.rows.device)

    def to_interaction(self) -> DotInteraction:
        return DotInteraction(self.num_features, self.self_interaction).to(self.rows.device)

    def extra_repr(self) -> str:
        return f"features={self.num_features}, self_interaction={self.self_interaction}, backend={self.backend}"

    def forward(self, dense: torch.Tensor, embedded: List[torch.Tensor]) -> torch.Tensor:
        autocast = torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", enabled=False) if autocast else nullcontext():
            if autocast or dense.dtype != torch.float32:
                dense, embedded = dense.float(), [e.float() for e in embedded]
            if self.backend == "cpp" and dense.device.type == "cpu":
                return DotPairsKernel.apply(self.rows, self.cols, dense, *embedded)
            return DotPairs.apply(self.flat, dense, *embedded)


# ---------------------------------------------------------------------------------------------
# Swapping the model's parts
# ---------------------------------------------------------------------------------------------


def _fast_mlp(mlp: nn.Sequential, gemm: str, bf16_gemms: str) -> FastMLP:
    layers = [FastLinear.from_linear(m, gemm, bf16_gemms) if type(m) is nn.Linear else m for m in mlp]
    return FastMLP(*layers)


def accelerate_mlps(model: nn.Module, gemm: str = "auto", bf16_gemms: str = "auto",
                    interaction: bool = True, interaction_backend: str = "auto") -> nn.Module:
    """Make ``model``'s dense part fast, in place, and return ``model``.

    ``model.bot_l`` and ``model.top_l`` become :class:`FastMLP` with :class:`FastLinear` layers that
    hold the same Parameter objects; with ``interaction`` a :class:`dlrm_model.DotInteraction`
    becomes a :class:`FastDotInteraction`. Keys, parameter order and optimizers are unchanged.
    Idempotent. Call it after the model is built (and moved to its device) and before training;
    the optimizer may be built before or after, and weights may be loaded before or after (the keys
    are the same). Call :func:`restore_mlps` before ONNX export or dynamic quantization.

    Raises:
        ValueError: the MLPs' parameters are not on the CPU (the GEMM choices and the interaction
            kernel are CPU-only; GPU runs keep the plain path).
    """
    devices = {p.device.type for name in ("bot_l", "top_l") for p in getattr(model, name).parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"--fast-numerics runs on the CPU only; the MLPs are on {', '.join(sorted(devices))}")
    for name in ("bot_l", "top_l"):
        mlp = getattr(model, name)
        if not isinstance(mlp, FastMLP):
            setattr(model, name, _fast_mlp(mlp, gemm, bf16_gemms))
    if interaction and type(getattr(model, "interaction", None)) is DotInteraction:
        model.interaction = FastDotInteraction.from_interaction(model.interaction, interaction_backend)
    return model


def restore_mlps(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate_mlps` in place (plain ``nn.Sequential``, ``nn.Linear`` and
    ``DotInteraction`` holding the same Parameters); returns ``model``."""
    for name in ("bot_l", "top_l"):
        mlp = getattr(model, name)
        if isinstance(mlp, FastMLP):
            setattr(model, name, nn.Sequential(*(m.to_linear() if isinstance(m, FastLinear) else m for m in mlp)))
    if isinstance(getattr(model, "interaction", None), FastDotInteraction):
        model.interaction = model.interaction.to_interaction()
    return model


def describe(gemm: str = "auto", bf16_gemms: str = "auto", interaction_backend: str = "auto") -> str:
    """One line for the run's log: what ``--fast-numerics`` runs on this CPU."""
    if resolve_bf16(bf16_gemms):
        under = "bfloat16 GEMMs, as autocast would"
    elif has_native_bf16():
        under = "float32 GEMMs (as asked)"
    else:
        under = "float32 GEMMs (this CPU has no native bf16; emulated bf16 GEMMs are many times slower)"
    kernel = resolve_interaction_backend(interaction_backend)
    gemms = {"auto": "oneDNN or MKL GEMMs by shape", "mkl": "MKL GEMMs", "onednn": "oneDNN GEMMs"}[resolve_gemm(gemm)]
    return (f"fast numerics: {gemms} with fused activations, dot interaction by its "
            f"{'C++ kernel' if kernel == 'cpp' else 'torch fallback'}; under --mixed-precision=bf16 the MLPs "
            f"run {under}")
