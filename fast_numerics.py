"""Opt-in faster numerics for DLRM's dense part (``--fast-numerics``): the MLPs and the dot interaction.

Nothing here is used unless asked for; the default path stays plain PyTorch, bit for bit.
:func:`accelerate_mlps` swaps, in place, the containers of ``model.bot_l``/``model.top_l`` for
:class:`FastMLP` and their ``nn.Linear`` layers for :class:`FastLinear`, and (``interaction=True``)
the dot interaction for :class:`FastDotInteraction`. The Linear layers keep their own ``weight`` and
``bias`` Parameter objects, so ``state_dict`` keys (``bot_l.N.weight``, ...), parameter order and
any optimizer already built are unchanged; parameters stay float32. :func:`restore_mlps` undoes it
(for ONNX export and dynamic quantization, which look for plain ``nn.Linear``).

Dimension vocabulary: B batch, T tables, D embedding dimension, F = T + 1 interaction features,
P interaction pairs, N_in / N_out a Linear layer's widths.

What is faster, and why (measured on the 2-core AMD EPYC VM, AVX2/FMA only; see
``bench/RESULTS.md``):

* Linear + activation run as one autograd node (:class:`LinearAct`): the activation is applied in
  place on the GEMM's output (or as a oneDNN post-op), its backward uses the saved output, and the
  weight gradient is computed as ``g^T x`` directly (no transposed copy of it).
* The dot interaction (:class:`FastDotInteraction`) is one node: one ``bmm`` forward, one ``bmm``
  backward (with the symmetrised pair gradient), pairs read with ``index_select`` and written
  back with ``index_copy_`` instead of advanced indexing and its accumulating backward.
* GEMM backend (``gemm``): "mkl" (``torch.addmm``/``mm``, what ``nn.Linear`` runs), or "onednn"
  (``torch.ops.mkldnn._linear_pointwise`` for the forward and the input gradient; the weight
  gradient stays on MKL, where oneDNN measured slower). "auto" picks oneDNN where the CPU has
  AVX-512 (where MKL on AMD keeps to its AVX2 code) and MKL otherwise (on AVX2 the two measured
  within noise of each other).
* Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (``--mixed-precision=bf16``),
  ``bf16_gemms`` decides: "auto" runs the MLP and interaction GEMMs in bfloat16, as autocast
  would, only where the CPU has native bf16 (AVX512-BF16 or AMX); elsewhere bf16 GEMMs are
  emulated and measured about 7x slower than float32, so they run in float32 (more accurate, and
  faster). :func:`describe` says which was chosen, in one line for the run's log.

Accuracy: float32 results differ from ``nn.Linear``'s only by the GEMMs' summation order (a few
ulps; the tests bound them with ``rtol=1.3e-6``-level tolerances). Over 200 SGD steps of a scaled
CPU-benchmark model the per-step losses of the accelerated and the plain model stayed within
DRIFT_MEASURED of each other (relative); ``tests/test_fast_numerics.py`` allows DRIFT_TOLERANCE.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn

from dlrm_model import DotInteraction

GEMMS = ("auto", "mkl", "onednn")
BF16_GEMMS = ("auto", "yes", "no")
_ACTIVATIONS = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
_linear_pointwise = torch.ops.mkldnn._linear_pointwise


def has_native_bf16() -> bool:
    """The CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_gemm(gemm: str) -> str:
    """"mkl" or "onednn" for ``gemm`` ("auto": oneDNN where the CPU has AVX-512)."""
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {', '.join(GEMMS)}, got {gemm!r}")
    if gemm == "auto":
        return "onednn" if torch.cpu._is_avx512_supported() and torch.backends.mkldnn.is_available() else "mkl"
    return gemm


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
    """act(x W^T + b), (B, N_out)."""
    if gemm == "onednn" and x.dtype == torch.float32:
        return _linear_pointwise(x, weight, bias, act, [], "")
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    if act == "relu":
        return y.relu_()
    if act == "sigmoid":
        return y.sigmoid_()
    if act == "tanh":
        return y.tanh_()
    return y


def _activation_backward(grad: torch.Tensor, out: torch.Tensor, act: str) -> torch.Tensor:
    """d loss / d (pre-activation), from the activation's output, as autograd computes it."""
    if act == "relu":
        return torch.ops.aten.threshold_backward(grad, out, 0)
    if act == "sigmoid":
        return torch.ops.aten.sigmoid_backward(grad, out)
    if act == "tanh":
        return torch.ops.aten.tanh_backward(grad, out)
    return grad


class LinearAct(torch.autograd.Function):
    """``act(x W^T + b)`` with its backward, as one autograd node.

    ``act`` is "none", "relu", "sigmoid" or "tanh"; ``gemm`` "mkl" or "onednn" (resolved). All
    tensors share one dtype (float32, or bfloat16 under bf16 autocast on native-bf16 CPUs); the
    caller casts. Saved for backward: x, W and the output (which the next layer saves as its input,
    so nothing is copied).

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
            if ctx.gemm == "onednn" and grad.dtype == torch.float32:
                grad_x = _linear_pointwise(grad, weight.t(), None, "none", [], "")  # g W, (B, N_in)
            else:
                grad_x = grad.mm(weight)
        if ctx.needs_input_grad[1]:
            grad_w = grad.t().mm(x)  # (N_out, N_in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b, None, None


def _in_bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str = "none",
               gemm: str = "mkl", bf16: bool = False) -> torch.Tensor:
    """``act(x W^T + b)`` for x of any leading shape (..., N_in). Outside autocast everything is
    float32. Under bf16 autocast: bfloat16 GEMMs if ``bf16``, else float32 ones (autocast is
    switched off for the call and the inputs cast up)."""
    dtype = torch.bfloat16 if (bf16 and _in_bf16_autocast()) else torch.float32
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    with torch.autocast("cpu", enabled=False) if torch.is_autocast_enabled("cpu") else nullcontext():
        b = bias.to(dtype) if bias is not None else None
        out = LinearAct.apply(x2.to(dtype), weight.to(dtype), b, act, gemm)
    return out.reshape(*lead, out.shape[-1]) if x.dim() != 2 else out


class FastLinear(nn.Linear):
    """An ``nn.Linear`` whose forward and backward GEMMs run through :class:`LinearAct`.

    Same parameters, names and init as ``nn.Linear`` (build it with :meth:`from_linear` to share an
    existing layer's Parameters). ``gemm`` and ``bf16`` as in :func:`linear_act`.

    Shape:
        - Input: (..., N_in). Output: (..., N_out).
    """

    gemm: str = "mkl"
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

    def forward(self, x: torch.Tensor, act: str = "none") -> torch.Tensor:
        return linear_act(x, self.weight, self.bias, act, self.gemm, self.bf16)


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
        """(module, activation fused into it) for each step of the forward."""
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module, act in self._plan:
            x = module(x, act) if act is not None else module(x)
        return x


# ---------------------------------------------------------------------------------------------
# The dot interaction as one autograd node
# ---------------------------------------------------------------------------------------------


class DotPairs(torch.autograd.Function):
    """``[x, <v_i, v_j> for the pairs]`` for v = [x, e_1..e_T], as one autograd node.

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
    """:class:`dlrm_model.DotInteraction` (same pairs, order and width) computed by :class:`DotPairs`.
    No parameters; its buffers are not persistent, so ``state_dict`` is unchanged.

    Shape:
        - dense: (B, D); embedded: list of T tensors (B, D).
        - Output: (B, D + P).
    """

    def __init__(self, num_features: int, self_interaction: bool = False, bf16_gemms: str = "auto"):
        super().__init__(num_features, self_interaction)
        self.num_features = num_features
        self.self_interaction = self_interaction
        self.register_buffer("flat", self.rows * num_features + self.cols, persistent=False)
        self.bf16 = resolve_bf16(bf16_gemms)

    @classmethod
    def from_interaction(cls, layer: DotInteraction, bf16_gemms: str = "auto") -> "FastDotInteraction":
        num_features = int(layer.rows.max()) + 1 if layer.rows.numel() else 1
        itself = bool((layer.rows == layer.cols).any())
        return cls(num_features, itself, bf16_gemms).to(layer.rows.device)

    def to_interaction(self) -> DotInteraction:
        return DotInteraction(self.num_features, self.self_interaction).to(self.rows.device)

    def forward(self, dense: torch.Tensor, embedded: List[torch.Tensor]) -> torch.Tensor:
        if not torch.is_autocast_enabled("cpu"):
            return DotPairs.apply(self.flat, dense, *embedded)
        dtype = torch.bfloat16 if (self.bf16 and _in_bf16_autocast()) else torch.float32
        with torch.autocast("cpu", enabled=False):
            return DotPairs.apply(self.flat, dense.to(dtype), *(e.to(dtype) for e in embedded))


# ---------------------------------------------------------------------------------------------
# Swapping the model's parts
# ---------------------------------------------------------------------------------------------


def _fast_mlp(mlp: nn.Sequential, gemm: str, bf16_gemms: str) -> FastMLP:
    layers = [FastLinear.from_linear(m, gemm, bf16_gemms) if type(m) is nn.Linear else m for m in mlp]
    return FastMLP(*layers)


def accelerate_mlps(model: nn.Module, gemm: str = "auto", bf16_gemms: str = "auto",
                    interaction: bool = True) -> nn.Module:
    """Make ``model``'s dense part fast, in place, and return ``model``.

    ``model.bot_l`` and ``model.top_l`` become :class:`FastMLP` with :class:`FastLinear` layers that
    hold the same Parameter objects; with ``interaction`` a :class:`dlrm_model.DotInteraction`
    becomes a :class:`FastDotInteraction`. Keys, parameter order and optimizers are unchanged.
    Idempotent. Call it after the model is built (and loaded, if loading replaces modules) and
    before training; the optimizer may be built before or after.
    """
    for name in ("bot_l", "top_l"):
        mlp = getattr(model, name)
        if not isinstance(mlp, FastMLP):
            setattr(model, name, _fast_mlp(mlp, gemm, bf16_gemms))
    if interaction and type(getattr(model, "interaction", None)) is DotInteraction:
        model.interaction = FastDotInteraction.from_interaction(model.interaction, bf16_gemms)
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


def describe(gemm: str = "auto", bf16_gemms: str = "auto") -> str:
    """One line for the run's log: which GEMMs ``--fast-numerics`` runs on this CPU."""
    bf16 = resolve_bf16(bf16_gemms)
    under = ("bfloat16 GEMMs" if bf16 else
             "float32 GEMMs (this CPU has no native bf16; its emulated bf16 GEMMs are slower)")
    return (f"fast numerics: {resolve_gemm(gemm)} GEMMs, fused activations and dot interaction; "
            f"under --mixed-precision=bf16 the MLPs and interaction run {under}")
