"""The DLRM network: parameter drawing, MLPs, embedding tables, interactions, ``DLRM`` and the losses.

This module knows nothing about the command line, data loading or training loops, so tests,
benchmarks and export import it alone.

Dimension vocabulary (all docstrings): B batch, T tables, D embedding dimension, M dense features,
F = T + 1 interaction features, P interaction pairs, W top-MLP input width, N_t indices of table t.

Randomness: every parameter value comes from one ``np.random.RandomState`` (the run's stream,
seeded with ``--numpy-rand-seed``), drawn in the reference's order: all tables in table order, then
the bottom MLP's layers, then the top MLP's. Quotient-remainder tables are the exception: the
reference initialises them from torch's RNG, and so do we (see :func:`build_tables`).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch.profiler import record_function

from dlrm.common import ConfigError, FlagError, check_at_least_one, check_number
from dlrm.distributed import DistInfo
from dlrm.kernels import fast_draw
from dlrm.shard.plan import Placement, ShardingPlan
from dlrm.shard.tables import ShardedTables, cut_piece, draw_piece, reference_plan

Indices = Union[torch.Tensor, List[torch.Tensor]]


@dataclass(frozen=True)
class ModelConfig:
    """The network's sizes and options.

    Attributes:
        embedding_dim: D (``--arch-sparse-feature-size``).
        table_sizes: rows of each of the T tables.
        bottom_mlp: bottom MLP widths, input M included.
        top_mlp: top MLP widths, its input W included (see :func:`top_mlp_input_width`).
        interaction: "dot" or "cat".
        interaction_itself: the dot interaction includes self products.
        weighted_pooling: None, "fixed" or "learned" per-row pooling weights.
        activation: hidden-layer activation, "relu", "sigmoid" or "tanh".
        loss_threshold: if in (0, 1), predictions are clamped to [t, 1 - t].
        md_*, qr_*: mixed-dimension and quotient-remainder tables.
        fix_reference_bugs: QR tables use exact integer quotients and a symmetric NumPy
            initialisation instead of the reference's float quotient and one-sided torch draws.
        embedding_backend: "plain" (one ``nn.EmbeddingBag`` per table, updated by the optimizer) or
            "fused" (:class:`fused_embedding.FusedTables`: one lookup per dim, the SGD update inside
            backward); both give the same numbers, bit for bit.
    """

    embedding_dim: int
    table_sizes: Tuple[int, ...]
    bottom_mlp: Tuple[int, ...]
    top_mlp: Tuple[int, ...]
    interaction: str = "dot"
    interaction_itself: bool = False
    weighted_pooling: Optional[str] = None
    activation: str = "relu"
    loss_threshold: float = 0.0
    md_flag: bool = False
    md_threshold: int = 200
    md_temperature: float = 0.3
    md_round_dims: bool = False
    qr_flag: bool = False
    qr_threshold: int = 200
    qr_operation: str = "mult"
    qr_collisions: int = 4
    fix_reference_bugs: bool = False
    embedding_backend: str = "plain"

    def __post_init__(self):
        check_model_config(self)

    @property
    def num_tables(self) -> int:
        return len(self.table_sizes)


def _dashed(widths: Sequence[int]) -> str:
    return "-".join(map(str, widths))


def check_model_config(cfg: ModelConfig) -> None:
    """Raise FlagError, naming the field, for sizes and options no network can be built from."""
    check_at_least_one({"embedding_dim": cfg.embedding_dim})
    check_number("md_temperature", cfg.md_temperature, 0.0)
    check_number("loss_threshold", cfg.loss_threshold)
    top = cfg.top_mlp[1:]  # the first width is computed, the rest are the flag's
    for field, widths in (("bottom_mlp", cfg.bottom_mlp), ("top_mlp", top)):
        if any(w < 1 for w in widths):
            raise FlagError(f"{{{field}}}: every width must be at least 1, got {_dashed(widths)}")
    if len(cfg.bottom_mlp) < 2:
        raise FlagError("{bottom_mlp} needs at least an input and an output width, like 4-3-2")
    if not top or top[-1] != 1:
        raise FlagError(f"{{top_mlp}} must end in 1 (one prediction per sample), got {_dashed(top)}")
    _check_bottom_output(cfg)
    if cfg.weighted_pooling is not None and (cfg.qr_flag or cfg.md_flag):
        raise FlagError("{weighted_pooling} cannot be combined with {qr_flag} or {md_flag}")
    if cfg.qr_flag and cfg.qr_collisions < 1:
        raise FlagError(f"{{qr_collisions}} must be at least 1, got {cfg.qr_collisions}")
    if cfg.qr_flag and cfg.md_flag:
        raise FlagError("{qr_flag} and {md_flag} cannot be combined (a table is one or the other)")


def _check_bottom_output(cfg: ModelConfig) -> None:
    """Raise FlagError unless the bottom MLP's output is D wide (2 D with QR concat)."""
    concat = cfg.qr_flag and cfg.qr_operation == "concat"
    if cfg.bottom_mlp[-1] != (2 if concat else 1) * cfg.embedding_dim:
        raise FlagError(
            f"{{embedding_dim}}={cfg.embedding_dim} does not match the bottom MLP's output width "
            f"{cfg.bottom_mlp[-1]} ({{bottom_mlp}}={_dashed(cfg.bottom_mlp)}; they must be equal"
            + (", or the output twice the size with QR concat)" if cfg.qr_flag else ")"))


def top_mlp_input_width(interaction: str, itself: bool, num_tables: int, dense_out: int) -> int:
    """The interaction's output width W, which is the top MLP's first width.

    The interaction classes own the formula (``output_width``); this only picks the class."""
    features = num_tables + 1
    layer = DotInteraction(features, itself) if interaction == "dot" else CatInteraction(features)
    return layer.output_width(dense_out)


def fit_to_data(cfg: ModelConfig, table_sizes: Sequence[int], dense_dim: int) -> ModelConfig:
    """Fit ``cfg`` to a data set: its tables and dense width, and the top MLP's input width
    recomputed for them."""
    bottom = (dense_dim,) + tuple(cfg.bottom_mlp[1:])
    width = top_mlp_input_width(cfg.interaction, cfg.interaction_itself, len(table_sizes), bottom[-1])
    return replace(cfg, table_sizes=tuple(int(s) for s in table_sizes), bottom_mlp=bottom,
                   top_mlp=(width,) + tuple(cfg.top_mlp[1:]))


# ---------------------------------------------------------------------------------------------
# Parameter drawing and MLPs
# ---------------------------------------------------------------------------------------------


def _activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[name]()


def draw_linear(rng: np.random.RandomState, n_in: int, n_out: int) -> nn.Linear:
    """A Linear(n_in -> n_out) drawn from ``rng`` as the reference draws it: weight ~
    normal(0, sqrt(2 / (n_in + n_out))), shape (n_out, n_in), then bias ~ normal(0, sqrt(1 / n_out)),
    both drawn in float64 and cast to float32. torch's own init is skipped."""
    layer = nn.utils.skip_init(nn.Linear, n_in, n_out, bias=True)
    weight = rng.normal(0.0, np.sqrt(2 / (n_out + n_in)), size=(n_out, n_in)).astype(np.float32)
    bias = rng.normal(0.0, np.sqrt(1 / n_out), size=n_out).astype(np.float32)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer


def make_mlp(widths: Sequence[int], rng: np.random.RandomState, activation: str = "relu",
             sigmoid_last: bool = False) -> nn.Sequential:
    """Linear layers between consecutive ``widths``, each followed by an activation.

    Layers sit at even indices and activations at odd ones, so the state-dict keys are
    ``0.weight``, ``0.bias``, ``2.weight``, ... as in the reference. The last activation is a
    Sigmoid when ``sigmoid_last`` (the top MLP), else the hidden activation (the bottom MLP).
    """
    layers: List[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(draw_linear(rng, n_in, n_out))
        last = i == len(widths) - 2
        layers.append(nn.Sigmoid() if (last and sigmoid_last) else _activation(activation))
    return nn.Sequential(*layers)


def draw_table(rng: np.random.RandomState, rows: int, dim: int) -> torch.Tensor:
    """Draw a (rows, dim) float32 table ~ uniform(-sqrt(1/rows), sqrt(1/rows)) from ``rng``."""
    weight = torch.empty(rows, dim, dtype=torch.float32)
    draw_table_into(rng, weight)
    return weight


def draw_table_into(rng: np.random.RandomState, weight: torch.Tensor) -> None:
    """Fill the (rows, dim) float32 CPU tensor ``weight`` with uniform(-sqrt(1/rows), sqrt(1/rows))
    draws from ``rng``: the values and the stream of one big draw cast to float32, without its
    float64 copy of the whole table (8 bytes a value)."""
    fast_draw.uniform_into(rng, weight, -np.sqrt(1 / weight.shape[0]), np.sqrt(1 / weight.shape[0]))


def _skip_draws(rng: np.random.RandomState, count: int) -> None:
    """Advance ``rng`` by ``count`` uniform draws without keeping them (another rank's table)."""
    fast_draw.skip(rng, count)


# ---------------------------------------------------------------------------------------------
# Embedding tables: one logical layout (``emb_l.K.weight``), several physical ones
# ---------------------------------------------------------------------------------------------


class PerTableEmbeddings(nn.ModuleList):
    """The reference's embedding layout: one sum-pooled ``nn.EmbeddingBag`` per table, sparse grads.

    Its state-dict keys are ``K.weight`` (under the model: ``emb_l.K.weight``) with shape
    (rows_K, D). Another layout (quantized or sharded tables) replaces this module by keeping the
    signature of ``forward`` and the keys.

    Args:
        tables: the per-table modules, each called as ``table(indices, offsets, per_sample_weights)``.

    Shape:
        - offsets: (T, B) int64, bag starts per table (the reference's ``lS_o``).
        - indices: (T, N) int64 or a list of T tensors (N_t,) (the reference's ``lS_i``).
        - pooling_weights: None, or a list of T per-row weight vectors (rows_t,).
        - Output: a list of T tensors (B, D).
    """

    def forward(self, offsets: torch.Tensor, indices: Indices,
                pooling_weights: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        pooled = []
        for t, table in enumerate(self):
            table_indices = indices[t]
            weights = None if pooling_weights is None else pooling_weights[t][table_indices]
            pooled.append(table(table_indices, offsets[t], per_sample_weights=weights))
        return pooled


class QuantizedTables(nn.Module):
    """Row-wise 8- or 4-bit quantized copies of float tables, for inference.

    Each table is pre-packed with ``torch.ops.quantized.embedding_bag_{byte,4bit}_prepack`` (a scale
    and bias per row) and looked up with the matching ``*_rowwise_offsets`` op. ``forward`` has
    :class:`PerTableEmbeddings`' signature, so the model needs no other change.

    Args:
        tables: the float tables (``nn.EmbeddingBag``) to quantize.
        bits: 8 or 4.
    """

    def __init__(self, tables: nn.Module, bits: int):
        super().__init__()
        if bits not in (4, 8):
            raise ConfigError(f"--quantize-emb-with-bit must be 4 or 8 to quantize, got {bits}")
        ops = torch.ops.quantized
        prepack = ops.embedding_bag_byte_prepack if bits == 8 else ops.embedding_bag_4bit_prepack
        self._lookup = ops.embedding_bag_byte_rowwise_offsets if bits == 8 else ops.embedding_bag_4bit_rowwise_offsets
        weights = table_weights(tables)
        for t, weight in enumerate(weights):
            self.register_buffer(f"packed_{t}", prepack(weight.detach().float().contiguous()))
        self.num_tables = len(weights)

    def forward(self, offsets: torch.Tensor, indices: Indices,
                pooling_weights: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        pooled = []
        for t in range(self.num_tables):
            table_indices = indices[t]
            weights = None if pooling_weights is None else pooling_weights[t][table_indices].float()
            pooled.append(self._lookup(getattr(self, f"packed_{t}"), table_indices, offsets[t], False, 0, False,
                                       weights, None, False))
        return pooled


def table_weights(tables: nn.Module) -> List[torch.Tensor]:
    """The (rows_t, D) weight of every table of a plain layout (per-table or fused), in table order.

    Raises:
        ConfigError: QR or mixed-dimension tables, which have no single weight per table.
    """
    from dlrm.model.fused_embedding import FusedTables

    if isinstance(tables, FusedTables):
        return [tables.table_weight(t) for t in range(len(tables.table_sizes))]
    if not all(isinstance(t, nn.EmbeddingBag) for t in tables):
        raise ConfigError("--quantize-emb-with-bit works on plain tables only (not with --qr-flag or --md-flag)")
    return [t.weight for t in tables]


def table_bytes(tables: nn.Module) -> int:
    """Bytes the tables hold: their parameters and buffers (packed quantized tables included)."""
    return sum(t.numel() * t.element_size() for t in list(tables.parameters()) + list(tables.buffers()))


def with_per_table_layout(model: "DLRM") -> "DLRM":
    """Give ``model`` with one ``nn.EmbeddingBag`` per table, as ONNX export traces it.

    That is ``model`` itself, or, when its tables are fused, a shallow copy whose tables are per-table
    ``nn.EmbeddingBag`` views of the same weights. Nothing is copied."""
    from dlrm.model.fused_embedding import FusedTables

    if not isinstance(model.emb_l, FusedTables):
        return model
    bags = [nn.EmbeddingBag.from_pretrained(w, freeze=False, mode="sum") for w in table_weights(model.emb_l)]
    plain = copy.copy(model)
    plain._modules = dict(model._modules)
    plain._modules["emb_l"] = PerTableEmbeddings(bags)
    return plain


def _sharded_tables(cfg: ModelConfig, rng: np.random.RandomState, info: DistInfo, plan: Optional[ShardingPlan],
                    a2a_precision: str) -> ShardedTables:
    """This rank's pieces of the tables (``plan``; None: the reference's table-wise layout), drawn
    exactly as in one process: every table's draws are made, so initialisation does not depend on
    the number of ranks or the plan. Another rank's plain table only moves the NumPy stream past
    its values; when torch's RNG is read too (QR and mixed-dimension tables), every table is built
    as in one process, one at a time, and only this rank's piece is kept."""
    dims = table_dims(cfg)
    plan = plan or reference_plan(cfg.table_sizes, dims, info.world_size)
    torch_init = cfg.qr_flag or cfg.md_flag
    pieces, names = {}, []
    for k, (rows, dim, placement) in enumerate(zip(cfg.table_sizes, dims, plan.placements)):
        held = placement.block_on(info.rank) is not None
        if torch_init:
            table = _table(cfg, rng, rows, dim, max(dims), torch_init)
            names.extend(f"{k}.{name}" for name, _ in table.named_parameters())
            if held:
                pieces[k] = _piece_of(table, placement, info.rank)
            continue
        names.append(f"{k}.weight")
        weight = draw_piece(rng, placement, rows, dim, info.rank)
        if weight is not None:
            pieces[k] = nn.EmbeddingBag.from_pretrained(weight, freeze=False, mode="sum", sparse=True)
    widths = [cfg.bottom_mlp[-1]] * cfg.num_tables  # every table's output is as wide as the bottom MLP's
    return ShardedTables(pieces, plan, widths, info, names, a2a_precision)


def _piece_of(table: nn.Module, placement: Placement, rank: int) -> nn.Module:
    """``rank``'s piece of a whole table built as in one process (a QR or mixed-dimension table is
    only ever placed whole)."""
    if placement.kind == "table":
        return table
    weight = cut_piece(placement, table.weight.detach(), rank)
    return nn.EmbeddingBag.from_pretrained(weight, freeze=False, mode="sum", sparse=True)


def _plain_table(rng: np.random.RandomState, rows: int, dim: int, torch_init: bool) -> nn.EmbeddingBag:
    """A plain table drawn from ``rng``. With ``torch_init`` torch's own normal init runs first and
    is overwritten, as in the reference: that moves torch's RNG, which QR and mixed-dimension tables
    after it draw from."""
    if torch_init:
        table = nn.EmbeddingBag(rows, dim, mode="sum", sparse=True)
        with torch.no_grad():
            table.weight.copy_(draw_table(rng, rows, dim))
        return table
    return nn.EmbeddingBag.from_pretrained(draw_table(rng, rows, dim), freeze=False, mode="sum", sparse=True)


def _fused_tables(cfg: ModelConfig, rng: np.random.RandomState, log: Optional[Callable[[str], None]]) -> nn.Module:
    """All tables in one buffer per dim, each drawn from ``rng`` straight into its place."""
    from dlrm.model.fused_embedding import FusedTables

    tables = FusedTables.uninitialised(cfg.table_sizes, cfg.embedding_dim, log=log)
    for t in range(cfg.num_tables):
        draw_table_into(rng, tables.table_weight(t))
    return tables


def build_tables(cfg: ModelConfig, rng: np.random.RandomState, info: DistInfo = DistInfo(),
                 log: Optional[Callable[[str], None]] = None, plan: Optional[ShardingPlan] = None,
                 a2a_precision: str = "fp32") -> nn.Module:
    """The T tables in table order: plain, quotient-remainder (``--qr-flag``, tables above
    ``--qr-threshold``) or mixed-dimension (``--md-flag``, tables above ``--md-threshold``).

    Plain and mixed-dimension tables are drawn from ``rng``. QR tables are drawn as the reference
    draws them, from torch's RNG on U(sqrt(1/n), 1), unless ``cfg.fix_reference_bugs`` (then
    symmetric, from ``rng``). In a multi-process run only this rank's pieces are kept (``plan``;
    None: whole tables, the reference's layout), exchanged in ``a2a_precision``.
    """
    large = sum(cfg.table_sizes) * cfg.embedding_dim >= fast_draw.KERNEL_MIN_VALUES
    note = fast_draw.fallback_note() if large and log is not None else None
    if note:
        log(note)
    if info.world_size > 1:
        return _sharded_tables(cfg, rng, info, plan, a2a_precision)
    if cfg.embedding_backend == "fused":
        return _fused_tables(cfg, rng, log)
    dims = table_dims(cfg)
    torch_init = cfg.qr_flag or cfg.md_flag  # only these read torch's RNG afterwards
    return PerTableEmbeddings([_table(cfg, rng, rows, dim, max(dims), torch_init)
                               for rows, dim in zip(cfg.table_sizes, dims)])


def _table(cfg: ModelConfig, rng: np.random.RandomState, rows: int, dim: int, base_dim: int,
           torch_init: bool) -> nn.Module:
    """One table as :func:`build_tables` draws it: QR, mixed-dimension (projected to ``base_dim``)
    or plain."""
    if cfg.qr_flag and rows > cfg.qr_threshold:
        return _qr_table(cfg, rng, rows, dim)
    if cfg.md_flag and rows > cfg.md_threshold:
        from dlrm.model.md_embedding_bag import PrEmbeddingBag

        table = PrEmbeddingBag(rows, dim, base_dim)
        table.reset_parameters(rng)
        return table
    return _plain_table(rng, rows, dim, torch_init)


def _qr_table(cfg: ModelConfig, rng: np.random.RandomState, rows: int, dim: int) -> nn.Module:
    from dlrm.model.qr_embedding_bag import QREmbeddingBag

    fixed = cfg.fix_reference_bugs
    table = QREmbeddingBag(rows, dim, cfg.qr_collisions, operation=cfg.qr_operation, mode="sum", sparse=True,
                           exact_quotient=fixed, reference_init=not fixed)
    if fixed:
        table.reset_parameters(rng)
    return table


_SKIP_CHUNK = 1 << 20
"""Values per torch draw when moving torch's generator past a large initialisation."""


def _skip_torch_uniform(count: int, chunk: int) -> None:
    """Move torch's global generator past ``count`` float32 ``uniform_`` draws (one 32-bit draw
    each), through a buffer of at most ``chunk`` values."""
    buffer = torch.empty(min(count, chunk))
    while count > 0:
        step = min(count, chunk)
        buffer[:step].uniform_()
        count -= step


def _skip_torch_normal(numel: int, chunk: int) -> None:
    """Move torch's global generator past ``normal_`` on a float32 tensor of ``numel`` values.

    torch fills 16 or more values from one uniform draw each and, when ``numel`` is not a multiple
    of 16, draws the last 16 again; fewer than 16 take another path, so those are simply drawn."""
    if numel < 16 or numel <= chunk:
        torch.empty(numel).normal_()
        return
    _skip_torch_uniform(numel + (16 if numel % 16 else 0), chunk)


def skip_reference_torch_init(cfg: ModelConfig, chunk: int = _SKIP_CHUNK) -> None:
    """Move torch's global generator as the reference's model construction did, after this model
    was built: the reference built each plain table and Linear with torch's default initialisation
    (normal tables; kaiming-uniform weights, uniform biases) and then overwrote it with NumPy draws.

    Our tables read torch's generator themselves when QR or mixed-dimension tables are on (they
    draw from it); otherwise nothing of this model did, so the tables' draws are skipped here too.
    What reads the generator afterwards (the base seed of the reference's loader workers) then
    sees the reference's state."""
    if not (cfg.qr_flag or cfg.md_flag):
        for rows in cfg.table_sizes:
            _skip_torch_normal(rows * cfg.embedding_dim, chunk)
    for widths in (cfg.bottom_mlp, cfg.top_mlp):
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            _skip_torch_uniform(n_out * n_in, chunk)
            _skip_torch_uniform(n_out, chunk)


def table_dims(cfg: ModelConfig) -> List[int]:
    """Each table's dimension: D; with ``--md-flag`` the power rule's dims for tables above
    ``--md-threshold`` (smaller tables keep D; the reference crashed on them); with QR ``concat``,
    2D for the plain tables, so every table outputs 2D like the QR ones (the reference mixed D and
    2D and crashed)."""
    if cfg.qr_flag and cfg.qr_operation == "concat":
        return [cfg.embedding_dim if rows > cfg.qr_threshold else 2 * cfg.embedding_dim for rows in cfg.table_sizes]
    if not cfg.md_flag:
        return [cfg.embedding_dim] * cfg.num_tables
    from dlrm.model.md_embedding_bag import md_solver

    dims = md_solver(torch.tensor(cfg.table_sizes), cfg.md_temperature, d0=cfg.embedding_dim,
                     round_dim=cfg.md_round_dims)
    return [int(d) if rows > cfg.md_threshold else cfg.embedding_dim for d, rows in zip(dims, cfg.table_sizes)]


# ---------------------------------------------------------------------------------------------
# Interactions
# ---------------------------------------------------------------------------------------------


class DotInteraction(nn.Module):
    """Pairwise dot products of the bottom-MLP output and the pooled embeddings.

    Output order (fixed: checkpoints and printed numbers depend on it): the bottom-MLP vector x
    itself, then <v_i, v_j> for the features v = [x, e_1, ..., e_T] over the strictly lower
    triangle, read row by row: (1,0), (2,0), (2,1), (3,0), ... ; with ``self_interaction`` the
    diagonal is included, j <= i: (0,0), (1,0), (1,1), (2,0), ... This is the reference's order and
    NOT TorchRec's; reordering would permute the columns of ``top_l.0.weight`` and break reference
    checkpoints. The pair indices are built once, as non-persistent buffers.

    Args:
        num_features: F = T + 1.
        self_interaction: include the diagonal.

    Shape:
        - dense: (B, D); embedded: list of T tensors (B, D).
        - Output: (B, D + P), P = F(F-1)/2 (or F(F+1)/2 with the diagonal).
    """

    def __init__(self, num_features: int, self_interaction: bool = False):
        super().__init__()
        extra = 1 if self_interaction else 0
        pairs = [(i, j) for i in range(num_features) for j in range(i + extra)]  # row by row
        # Position i * F + j of each pair in the flattened (F, F) products: one index_select picks
        # them all (cheaper than two-index gathering, and its backward is a plain index_add).
        self.register_buffer("rows", torch.tensor([i for i, _ in pairs], dtype=torch.long), persistent=False)
        self.register_buffer("cols", torch.tensor([j for _, j in pairs], dtype=torch.long), persistent=False)
        self.register_buffer("pair_index", self.rows * num_features + self.cols, persistent=False)

    def output_width(self, dim: int) -> int:
        return dim + self.pair_index.numel()

    def forward(self, dense: torch.Tensor, embedded: List[torch.Tensor]) -> torch.Tensor:
        batch, dim = dense.shape
        features = torch.cat([dense] + embedded, dim=1).view(batch, -1, dim)  # (B, F, D)
        products = torch.bmm(features, features.transpose(1, 2))  # (B, F, F)
        pairs = products.flatten(1).index_select(1, self.pair_index)  # (B, P)
        return torch.cat([dense, pairs], dim=1)  # (B, D + P)


class CatInteraction(nn.Module):
    """The interaction that concatenates [x, e_1, ..., e_T]. Output (B, F * D)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def output_width(self, dim: int) -> int:
        return self.num_features * dim

    def forward(self, dense: torch.Tensor, embedded: List[torch.Tensor]) -> torch.Tensor:
        return torch.cat([dense] + embedded, dim=1)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class DLRM(nn.Module):
    """The DLRM network: bottom MLP, embedding tables, interaction, top MLP with a sigmoid.

    Parameters are drawn from ``rng`` in the reference's order: every table, then the bottom MLP's
    layers, then the top MLP's; so the same seed gives the same numbers. State-dict keys:
    ``emb_l.K.weight``, ``v_W_l.K`` (learned pooling), ``bot_l.N.weight/bias``,
    ``top_l.N.weight/bias``.

    Args:
        cfg: sizes and options.
        rng: the NumPy legacy stream (seeded with ``--numpy-rand-seed``).
        info: where this process stands; in a multi-process run the tables, and their learned
            pooling weights (``v_W_l``, then a ParameterDict keyed by table number), are this
            rank's pieces.
        plan: where each table's pieces live in a multi-process run (None: whole tables, the
            reference's layout); see :mod:`dlrm.shard.plan`.
        a2a_precision: "fp32", "bf16" or "fp16", the type of the all-to-all's values.
        make_tables: builds the tables instead of :func:`build_tables` (drawing them from ``rng``
            first, in table order), such as :class:`dlrm.store.tables.StoredTables`.
        log: receives a one-line note if the fused tables fall back to their pure-torch path.

    Shape:
        - dense_x: (B, M) for the rows this process computes; offsets: (T, B_all); indices: (T, N)
          or a list of T (N_t,), for the whole batch (B_all = B in one process).
        - Output: (B, 1) probabilities.

    Example::

        >>> cfg = ModelConfig(embedding_dim=2, table_sizes=(4, 3), bottom_mlp=(4, 2), top_mlp=(5, 1))
        >>> model = DLRM(cfg, np.random.RandomState(123))
        >>> model(torch.rand(2, 4), torch.tensor([[0, 1], [0, 1]]), torch.tensor([[0, 3], [2, 2]])).shape
        torch.Size([2, 1])
    """

    def __init__(self, cfg: ModelConfig, rng: np.random.RandomState, info: DistInfo = DistInfo(),
                 log: Optional[Callable[[str], None]] = None, plan: Optional[ShardingPlan] = None,
                 a2a_precision: str = "fp32",
                 make_tables: Optional[Callable[[ModelConfig, np.random.RandomState], nn.Module]] = None):
        super().__init__()
        self.cfg = cfg
        self.emb_l = make_tables(cfg, rng) if make_tables else build_tables(cfg, rng, info, log, plan, a2a_precision)
        sharded = isinstance(self.emb_l, ShardedTables)
        held = self.emb_l.local_tables() if sharded else range(cfg.num_tables)
        rows = {t: (self.emb_l.held_rows(t, cfg.table_sizes[t]) if sharded else (0, cfg.table_sizes[t])) for t in held}
        if cfg.weighted_pooling == "learned":  # with its table (a row block: its rows): keys v_W_l.K in both layouts
            weights = {str(t): nn.Parameter(torch.ones(stop - start)) for t, (start, stop) in rows.items()}
            self.v_W_l = nn.ParameterDict(weights) if sharded else nn.ParameterList(weights.values())
        elif cfg.weighted_pooling == "fixed":
            for t, (start, stop) in rows.items():
                self.register_buffer(f"fixed_pooling_{t}", torch.ones(stop - start), persistent=False)
        self.bot_l = make_mlp(cfg.bottom_mlp, rng, cfg.activation, sigmoid_last=False)
        self.top_l = make_mlp(cfg.top_mlp, rng, cfg.activation, sigmoid_last=True)
        features = cfg.num_tables + 1
        if cfg.interaction == "dot":
            self.interaction = DotInteraction(features, cfg.interaction_itself)
        else:
            self.interaction = CatInteraction(features)

    def pooling_weights(self) -> Optional[List[Optional[torch.Tensor]]]:
        """Each table's per-row pooling weights (None for a table another rank holds), or None
        without ``--weighted-pooling``."""
        if self.cfg.weighted_pooling == "learned":
            if isinstance(self.v_W_l, nn.ParameterDict):
                return [self.v_W_l[str(t)] if str(t) in self.v_W_l else None for t in range(self.cfg.num_tables)]
            return list(self.v_W_l)
        if self.cfg.weighted_pooling == "fixed":
            return [getattr(self, f"fixed_pooling_{t}", None) for t in range(self.cfg.num_tables)]
        return None

    def forward(self, dense_x: torch.Tensor, offsets: torch.Tensor, indices: Indices) -> torch.Tensor:
        with record_function("DLRM embedding forward"):
            embedded = self.emb_l(offsets, indices, self.pooling_weights())  # T x (B, D)
        with record_function("DLRM bottom nlp forward"):
            x = self.bot_l(dense_x)  # (B, D)
        with record_function("DLRM interaction forward"):
            z = self.interaction(x, embedded)  # (B, W)
        with record_function("DLRM top nlp forward"):
            p = self.top_l(z)  # (B, 1)
            if p.dtype in (torch.bfloat16, torch.float16):
                p = p.float()  # float32 under bf16 autocast; float64 stays float64
        threshold = self.cfg.loss_threshold
        if 0.0 < threshold < 1.0:
            p = torch.clamp(p, min=threshold, max=1.0 - threshold)
        return p


def quantize_for_inference(model: DLRM, emb_bits: int, mlp_bits: int) -> nn.Module:
    """Quantize the model's tables and MLPs for inference.

    ``emb_bits`` 4/8: row-wise quantized tables; ``mlp_bits`` 8/16: dynamic int8/float16 Linear
    layers; 32 leaves that part as it is. Returns the model to run (a new one for quantized MLPs)."""
    if emb_bits != 32:
        model.emb_l = QuantizedTables(model.emb_l, emb_bits)
    if mlp_bits == 32:
        return model
    dtype = torch.qint8 if mlp_bits == 8 else torch.float16
    with warnings.catch_warnings():  # the reference's dynamic quantization API, deprecated upstream
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {nn.Linear}, dtype)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

LOSSES = ("mse", "bce", "wbce")


def check_loss_weights(loss_function: str, class_weights: Sequence[float]) -> None:
    """Raise FlagError for a class weight that is negative or not a number, or wbce without two."""
    for weight in class_weights:
        check_number("loss_weights", weight, 0.0)
    if loss_function == "wbce" and len(class_weights) != 2:
        raise FlagError(f"{{loss_weights}} needs two values (class 0 and class 1), got {len(class_weights)}")


def make_loss(name: str, class_weights: Sequence[float] = (1.0, 1.0)) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of ``probs`` (B, 1) against ``labels`` (B, 1).

    mse and bce are batch means. wbce weighs each sample's BCE by ``class_weights[label]`` (labels
    must be 0/1) in float64, as the reference does, then takes the mean.
    """
    if name == "mse":
        return nn.MSELoss(reduction="mean")
    if name == "bce":
        return nn.BCELoss(reduction="mean")
    if name == "wbce":
        weights = torch.tensor(class_weights, dtype=torch.float64)
        bce = nn.BCELoss(reduction="none")

        def weighted_bce(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            per_sample = weights.to(labels.device)[labels.long()] * bce(probs, labels)
            return per_sample.mean()

        return weighted_bce
    raise ConfigError(f"--loss-function={name} is not supported (use {', '.join(LOSSES)})")
