"""The reference's Python API, for code written against it: ``DLRM_Net`` and the data functions.

MLPerf Inference's DLRM backend, the reference's own tools and published research scripts import
the reference as a library::

    from dlrm_s_pytorch import DLRM_Net          # re-exported from here
    import dlrm_data_pytorch as dp                # dp.make_random_data_and_loader(...) etc., from here

This module gives them that surface as a thin layer over this project's model (:class:`DLRM`) and
loaders: the reference's names, argument conventions and return values, with the same parameters,
outputs and batches as a run of ``dlrm_s_pytorch.py`` with the same flags and seed.

NumPy's global generator. The reference draws every parameter and every random batch from NumPy's
global legacy generator: code written against it calls ``np.random.seed(s)`` and then builds the
model and the loaders, expecting their draws to come from that generator, in the reference's order.
So this module, and only this module, draws from it: it hands the generator itself (the
``RandomState`` behind ``np.random.seed``, see :func:`global_generator`) to the model and the
datasets, which everywhere else in the project get an explicit ``RandomState`` of their own.
"""
from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from dlrm.common import Batch, ConfigError
from dlrm.model.dlrm import DLRM, LOSSES, Indices, ModelConfig, make_loss, table_dims, top_mlp_input_width

__all__ = [
    "DLRM_Net",
    "collate_wrapper_criteo_offset",
    "collate_wrapper_random_offset",
    "global_generator",
    "make_criteo_data_and_loaders",
    "make_random_data_and_loader",
]


def global_generator() -> np.random.RandomState:
    """NumPy's global legacy generator: the ``RandomState`` that ``np.random.seed`` seeds and
    ``np.random.rand``/``uniform``/``normal`` draw from (in the process that calls this)."""
    return np.random.random_sample.__self__


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def _sizes(values, name: str) -> Tuple[int, ...]:
    """A NumPy array (or any sequence) of sizes as a tuple of ints."""
    sizes = tuple(int(v) for v in np.asarray(values).reshape(-1))
    if not sizes or any(v < 1 for v in sizes):
        raise ConfigError(f"DLRM_Net: {name} must hold positive sizes, got {list(sizes)}")
    return sizes


def reference_model_config(m_spa, ln_emb, ln_bot, ln_top, arch_interaction_op: str = "dot",
                           arch_interaction_itself: bool = False, loss_threshold: float = 0.0,
                           qr_flag: bool = False, qr_operation: str = "mult", qr_collisions: int = 0,
                           qr_threshold: int = 200, md_flag: bool = False, md_threshold: int = 200,
                           md_temperature: float = 0.3, weighted_pooling: Optional[str] = None) -> ModelConfig:
    """Our model configuration from ``DLRM_Net``'s arguments (see there), checked.

    ``ln_top`` includes the top MLP's input width, as the reference's caller computes it; a width
    that does not fit the interaction is refused here (the reference failed in its first forward).

    Raises:
        ConfigError: sizes or options that cannot build a working model.
    """
    if arch_interaction_op not in ("dot", "cat"):
        raise ConfigError(f"DLRM_Net: arch_interaction_op={arch_interaction_op!r} is not supported (dot or cat)")
    if weighted_pooling not in (None, "fixed", "learned"):
        raise ConfigError(f"DLRM_Net: weighted_pooling={weighted_pooling!r} is not supported (None, fixed or learned)")
    if weighted_pooling is not None and (qr_flag or md_flag):
        raise ConfigError("DLRM_Net: weighted_pooling cannot be combined with qr_flag or md_flag")
    if qr_flag and (md_flag or qr_collisions < 1):
        raise ConfigError("DLRM_Net: qr_flag needs qr_collisions >= 1 and no md_flag")
    dims = [int(d) for d in m_spa] if np.ndim(m_spa) else None
    embedding_dim, bottom = max(dims) if dims else int(m_spa), _sizes(ln_bot, "ln_bot")
    expected = 2 * embedding_dim if qr_flag and qr_operation == "concat" else embedding_dim
    if bottom[-1] != expected:
        raise ConfigError(f"DLRM_Net: ln_bot ends in {bottom[-1]}, but the embeddings have "
                          f"dimension {expected}; they must be equal")
    cfg = ModelConfig(
        embedding_dim=embedding_dim, table_sizes=_sizes(ln_emb, "ln_emb"),
        bottom_mlp=bottom, top_mlp=_sizes(ln_top, "ln_top"),
        interaction=arch_interaction_op, interaction_itself=bool(arch_interaction_itself),
        weighted_pooling=weighted_pooling, loss_threshold=float(loss_threshold), md_flag=bool(md_flag),
        md_threshold=int(md_threshold), md_temperature=float(md_temperature), qr_flag=bool(qr_flag),
        qr_threshold=int(qr_threshold), qr_operation=qr_operation, qr_collisions=int(qr_collisions))
    if md_flag:
        cfg = _md_rounding(cfg, dims or [cfg.embedding_dim] * cfg.num_tables)
    _check_widths(cfg)
    return cfg


def _md_rounding(cfg: ModelConfig, dims: List[int]) -> ModelConfig:
    """Return ``cfg`` with the ``md_round_dims`` for which our mixed dimensions are the caller's ``m_spa``
    (the reference's script passes ``md_solver``'s output, rounded or not)."""
    large = [t for t, rows in enumerate(cfg.table_sizes) if rows > cfg.md_threshold]
    if len(dims) != cfg.num_tables:
        raise ConfigError(f"DLRM_Net: md_flag needs one dimension per table in m_spa, got {len(dims)} "
                          f"for {cfg.num_tables} tables")
    for round_dims in (False, True):
        candidate = replace(cfg, md_round_dims=round_dims)
        ours = table_dims(candidate)
        if all(ours[t] == dims[t] for t in large):
            return candidate
    raise ConfigError(f"DLRM_Net: with md_flag, m_spa must be md_solver(ln_emb, md_temperature, d0=...)'s "
                      f"dimensions (md_temperature={cfg.md_temperature:g}); got {dims}")


def _check_widths(cfg: ModelConfig) -> None:
    """The top MLP's input must fit the tables and the interaction (the bottom MLP's output width
    is checked before the config is built, which checks it too)."""
    width = top_mlp_input_width(cfg.interaction, cfg.interaction_itself, cfg.num_tables, cfg.bottom_mlp[-1])
    if cfg.top_mlp[0] != width:
        raise ConfigError(f"DLRM_Net: ln_top starts with {cfg.top_mlp[0]}, but the {cfg.interaction} "
                          f"interaction of {cfg.num_tables} tables gives {width} values")


def _place_sigmoid(mlp: nn.Sequential, sigmoid_layer: int) -> None:
    """Make layer ``sigmoid_layer``'s activation a Sigmoid and every other one a ReLU, as the
    reference's MLP builder does (-1: no Sigmoid). Activations hold no parameters: no draw moves."""
    for layer in range(len(mlp) // 2):
        mlp[2 * layer + 1] = nn.Sigmoid() if layer == sigmoid_layer else nn.ReLU()


class DLRM_Net(DLRM):
    """The reference's model class: :class:`DLRM` built from the reference's constructor arguments.

    ``np.random.seed(s)`` and then ``DLRM_Net(...)`` draws the reference's initial parameters from
    NumPy's global generator, in its order (every table, the bottom MLP, the top MLP), so the model
    equals the one ``dlrm_s_pytorch.py --numpy-rand-seed=s`` builds with the same sizes, and
    ``load_state_dict`` takes the reference's (and our ``--save-model``'s) ``state_dict`` as it is.

    Args (the reference's, in its order):
        m_spa: the embedding dimension; with ``md_flag`` the list of per-table dimensions that
            ``md_solver`` gives.
        ln_emb: rows of each table (a NumPy array).
        ln_bot: bottom MLP widths, the dense input first.
        ln_top: top MLP widths, the interaction's width first (the reference's script prepends it).
        arch_interaction_op: "dot" or "cat".
        arch_interaction_itself: the dot interaction includes self products.
        sigmoid_bot, sigmoid_top: the layer whose activation is a Sigmoid (-1: none), as in the
            reference, whose script passes ``sigmoid_top=ln_top.size - 2`` (the last layer).
        sync_dense_params, ndevices: accepted, no effect: the model runs on the one device it is
            moved to (the reference's single-process multi-GPU mode gives the same numbers).
        loss_threshold: if in (0, 1), outputs are clamped to [t, 1 - t].
        qr_flag, qr_operation, qr_collisions, qr_threshold: quotient-remainder tables.
        md_flag, md_threshold: mixed-dimension tables.
        weighted_pooling: None, "fixed" or "learned".
        loss_function: "mse", "bce" or "wbce"; ``self.loss_fn`` is that loss.
        loss_weights: not in the reference's signature (its wbce read the weights from its global
            ``args.loss_weights``): class 0 and class 1 weights for "wbce".
        md_temperature: not in the reference's signature: the temperature ``m_spa`` was solved with.

    Attributes:
        emb_l: the tables; ``emb_l[k].weight`` is table k's (rows, D) weight.
        bot_l, top_l: the MLPs (``nn.Sequential``: Linear at even indices, activations at odd ones).
        v_W_l: with learned pooling, the per-row pooling weights of every table.
        loss_fn: the loss named by ``loss_function``.
    """

    def __init__(self, m_spa, ln_emb, ln_bot, ln_top, arch_interaction_op: str = "dot",
                 arch_interaction_itself: bool = False, sigmoid_bot: int = -1, sigmoid_top: int = -1,
                 sync_dense_params: bool = True, loss_threshold: float = 0.0, ndevices: int = -1,
                 qr_flag: bool = False, qr_operation: str = "mult", qr_collisions: int = 0, qr_threshold: int = 200,
                 md_flag: bool = False, md_threshold: int = 200, weighted_pooling: Optional[str] = None,
                 loss_function: str = "bce", *, loss_weights: Sequence[float] = (1.0, 1.0),
                 md_temperature: float = 0.3):
        if loss_function not in LOSSES:
            raise ConfigError(f"DLRM_Net: loss_function={loss_function!r} is not supported ({', '.join(LOSSES)})")
        cfg = reference_model_config(m_spa, ln_emb, ln_bot, ln_top, arch_interaction_op, arch_interaction_itself,
                                     loss_threshold, qr_flag, qr_operation, qr_collisions, qr_threshold, md_flag,
                                     md_threshold, md_temperature, weighted_pooling)
        super().__init__(cfg, global_generator())
        _place_sigmoid(self.bot_l, sigmoid_bot)
        _place_sigmoid(self.top_l, sigmoid_top)
        self.loss_fn = make_loss(loss_function, tuple(loss_weights))
        self.loss_function = loss_function
        self.arch_interaction_op = arch_interaction_op
        self.arch_interaction_itself = arch_interaction_itself
        self.loss_threshold = loss_threshold
        self.weighted_pooling = weighted_pooling
        self.sync_dense_params = sync_dense_params
        self.ndevices = ndevices

    def forward(self, dense_x: torch.Tensor, lS_o, lS_i: Indices) -> torch.Tensor:
        """Probabilities (B, 1) of dense features ``dense_x`` (B, M), offsets ``lS_o`` (one (T, B)
        tensor or a list of T (B,) tensors) and indices ``lS_i`` (a list of T (N_t,) tensors or
        one (T, N) tensor), as the reference's ``forward``."""
        return super().forward(dense_x, lS_o, lS_i)

    def sequential_forward(self, dense_x: torch.Tensor, lS_o, lS_i: Indices) -> torch.Tensor:
        """The reference's name of the one-device forward: :meth:`forward`."""
        return self.forward(dense_x, lS_o, lS_i)

    def apply_mlp(self, x: torch.Tensor, layers: nn.Module) -> torch.Tensor:
        """Apply ``layers`` (``bot_l`` or ``top_l``) to ``x``, as the reference's helper does."""
        return layers(x)

    def apply_emb(self, lS_o, lS_i: Indices, emb_l: nn.Module, v_W_l=None) -> List[torch.Tensor]:
        """The T pooled embeddings (B, D) of ``emb_l`` (the model's tables), with the model's
        pooling weights, as the reference's helper (``v_W_l`` is accepted for its signature)."""
        return emb_l(lS_o, lS_i, self.pooling_weights())

    def interact_features(self, x: torch.Tensor, ly: List[torch.Tensor]) -> torch.Tensor:
        """The interaction (B, W) of the bottom MLP's output ``x`` and the pooled embeddings ``ly``."""
        return self.interaction(x, ly)


# ---------------------------------------------------------------------------------------------
# The data functions
# ---------------------------------------------------------------------------------------------


def reference_flags(args, **overrides) -> dict:
    """Flag values keyed by this project's names, read from ``args``' attributes under the
    reference's names (the flag without its dashes, ``-`` as ``_``: ``mini_batch_size``); an
    attribute ``args`` lacks takes the flag's default. Strings are read as the command line reads
    them (``"4-3-2"``); ``overrides`` (keyed by this project's names) replace values.

    Raises:
        ConfigError: a value that cannot be read, or ``fix_reference_bugs`` (the reference's API
            reproduces the reference; the fixes are the command line's option).
    """
    from dlrm.run.flags import build_parser, reference_names

    parser = build_parser()
    flags, actions = vars(parser.parse_args([])), {action.dest: action for action in parser._actions}
    for dest, name in reference_names(parser).items():
        if name != "help" and hasattr(args, name):
            flags[dest] = _typed(actions[dest], getattr(args, name))
    if flags["fix_reference_bugs"]:
        raise ConfigError("fix_reference_bugs is a command-line option: the reference's Python API "
                          "reproduces the reference")
    flags.update(overrides)
    return flags


def _typed(action, value):
    """Convert ``value`` to the flag's type: strings through the flag's converter, sequences as tuples."""
    if isinstance(value, str) and action.type is not None:
        try:
            return action.type(value)
        except ValueError as exc:
            raise ConfigError(f"{action.option_strings[0]}={value}: {exc}") from None
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(np.asarray(value).reshape(-1).tolist())
    return value


def _random_dataset_class():
    """The random dataset that draws from the global generator of the process it runs in."""
    from dlrm.data.random import RandomDataset

    class GlobalStreamRandomDataset(RandomDataset):
        """Random batches from NumPy's global generator, as the reference's ``RandomDataset``: in
        a DataLoader worker, from that worker's global generator (which torch seeds per worker)."""

        def __getitem__(self, i: int) -> Batch:
            self.rng = global_generator()
            return super().__getitem__(i)

    return GlobalStreamRandomDataset


def make_random_data_and_loader(args, ln_emb, m_den, offset_to_length_converter: bool = False):
    """The reference's random (or synthetic) data: two identical datasets and their loaders.

    ``args`` is any object with the flags as attributes under the reference's names (an
    ``argparse.Namespace`` of the reference's parser); ``ln_emb`` the rows of each table and
    ``m_den`` the dense features. As in the reference, nothing is drawn here; batch i is drawn when
    it is read, from NumPy's global generator, which batch 0 re-seeds with ``numpy_rand_seed``; the
    test data is the training data. Each loader is a ``torch.utils.data.DataLoader`` (one batch
    per item, ``num_workers`` workers) yielding ``(X, lS_o, lS_i, T)``: dense (B, M) float32,
    offsets (T, B) int64, a list of T index tensors, targets (B, 1) float32.

    Returns:
        (train_data, train_loader, test_data, test_loader).
    """
    if offset_to_length_converter:
        raise ConfigError("offset_to_length_converter=True (bag lengths instead of offsets) is not supported")
    from dlrm.run.flags import data_config_from_flags
    from dlrm.run.train import Logger

    flags = reference_flags(args)
    if flags["generation"] not in ("random", "synthetic"):
        raise ConfigError(f"make_random_data_and_loader needs data_generation random or synthetic, "
                          f"got {flags['generation']!r}")
    flags.update(table_sizes=_sizes(ln_emb, "ln_emb"), bottom_mlp=(int(m_den),) + tuple(flags["bottom_mlp"][1:]))
    cfg = data_config_from_flags(flags)
    dataset = _random_dataset_class()
    train_data, test_data = dataset(cfg, global_generator(), Logger()), dataset(cfg, global_generator(), Logger())
    loaders = [torch.utils.data.DataLoader(data, batch_size=1, shuffle=False, num_workers=flags["num_workers"],
                                           collate_fn=collate_wrapper_random_offset, pin_memory=False,
                                           drop_last=False)
               for data in (train_data, test_data)]
    return train_data, loaders[0], test_data, loaders[1]


def make_criteo_data_and_loaders(args, offset_to_length_converter: bool = False):
    """The reference's Criteo data: preprocessing when needed, the train and test datasets and loaders.

    ``args`` is any object with the flags as attributes under the reference's names (``data_set``,
    ``raw_data_file``, ``processed_data_file``, ``mini_batch_size``, ...). Preprocessing and the
    shuffles draw from NumPy's global generator, as in the reference. Each dataset's item i is
    sample i as ``(dense (13,), sparse ids (26,), label)``; each loader yields ``(X, lS_o, lS_i, T)``
    batches: log(dense + 1) (B, 13) float32, offsets (26, B), indices (26, B) int64, targets (B, 1)
    float32 (what ``collate_wrapper_criteo_offset`` makes of the samples).

    Returns:
        (train_data, train_loader, test_data, test_loader).
    """
    if offset_to_length_converter:
        raise ConfigError("offset_to_length_converter=True (bag lengths instead of offsets) is not supported")
    from dlrm.data.criteo.loaders import make_criteo_data_and_loaders as make_loaders
    from dlrm.run.flags import data_config_from_flags
    from dlrm.run.train import Logger

    cfg = data_config_from_flags(reference_flags(args, generation="dataset"))
    rng = global_generator()
    data = make_loaders(cfg, rng, log=Logger(), preprocess_rng=rng)
    return data.train_data, data.train_loader, data.test_data, data.test_loader


def collate_wrapper_random_offset(list_of_tuples) -> Batch:
    """The random loaders' collate: the one item, a whole batch ``(X, lS_o, lS_i, T)``, with its
    per-table offsets stacked into one (T, B) tensor."""
    dense_x, offsets, indices, labels = list_of_tuples[0]
    if not isinstance(offsets, torch.Tensor):
        offsets = torch.stack(list(offsets))
    return Batch(dense_x, offsets, indices, labels)


def collate_wrapper_criteo_offset(list_of_tuples) -> Batch:
    """The Criteo loaders' collate: B samples ``(dense (13,), sparse ids (26,), label)`` into a
    batch ``(X, lS_o, lS_i, T)``: log(dense + 1) (B, 13) float32, offsets (26, B) (one index per
    bag), indices (26, B) int64, targets (B, 1) float32."""
    from dlrm.data.criteo.loaders import columns_to_batch

    dense = np.stack([np.asarray(sample[0]) for sample in list_of_tuples])
    sparse = np.stack([np.asarray(sample[1]) for sample in list_of_tuples])
    labels = np.asarray([sample[2] for sample in list_of_tuples])
    return columns_to_batch(labels, dense, sparse)
