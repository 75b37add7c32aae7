r"""Table-batched embedding tables whose sparse SGD runs inside backward, bit-identical to the plain path.

The plain path is one ``nn.EmbeddingBag(rows, D, mode="sum", sparse=True)`` per table, trained by
``torch.optim.SGD``. :class:`FusedTables` keeps every table of one embedding dim in one weight
buffer, looks all of them up with one ``embedding_bag`` call, and in backward writes the SGD update
straight into the buffer: no per-lookup gradient is materialised and no sparse gradient reaches
the optimizer. After every step each table is equal (``torch.equal``) to what the plain path gives.

Why the update can be exact: torch's SGD applies the *uncoalesced* sparse gradient of a sum-pooled
``EmbeddingBag`` as ``weight.index_add_(0, indices, per_lookup, alpha=-lr)`` with
``per_lookup = grad_out[bag] * per_sample_weight``, one lookup after the other. The C++ kernel does
the same arithmetic, applying each row's lookups in their original order (rows in parallel, each
row owned by one thread), with the same rounding of ``w + alpha * v``: torch evaluates it as a fused
multiply-add on its AVX2/AVX-512 kernels and as a rounded product plus a rounded sum on its
baseline kernel (``ATEN_CPU_CAPABILITY=default``), so the module measures which one the running
torch uses, once per dim, against ``torch.optim.SGD`` itself, and the kernel (built with
``-ffp-contract=off`` so the compiler adds no fusion of its own) follows it. If neither rounding
matches, that dim uses the pure-torch path.

Dimension vocabulary: B bags per table (the batch), T tables, D embedding dim, N_t indices of table
t in a batch, R_t rows of table t.

Supported: SGD without momentum, dampening, weight decay, nesterov or maximize; fixed per-sample
(pooling) weights of any values; learned pooling weights (their gradient is computed by the same
torch op as the plain path, from the weights before the update, on rows placed at the same 64-byte
alignment). Not supported (use the plain path): Adagrad and the row-wise sparse Adagrad (not fused:
their coalesced sums and row means follow torch's sort and reduction orders, not proven equal),
gradient accumulation over several batches (the update happens at every backward), a second
backward through the same graph (it would apply the update twice).

Backends:
    ``"cpp"``: the C++ extension ``csrc/fused_embedding.cpp``, compiled on first use with
    ``torch.utils.cpp_extension.load`` into ``$DLRM_EXTENSIONS_DIR`` (else ``$TORCH_EXTENSIONS_DIR``,
    else ``~/.cache/dlrm_extensions``) and reused from there. CPU float32 only.
    ``"torch"``: the same lookup, and an ``index_add_`` update per table. Exact on the CPU (it is
    torch's own SGD arithmetic), slower. On CUDA this is the only backend. There the lookups sum
    each bag in order as the plain path does, but ``index_add_`` adds with atomics in an
    unspecified order, so the updated tables equal the plain path's only up to float rounding,
    and repeated runs may differ in the last bits. (Not run on a GPU yet: none was available.)
    ``"auto"`` (default): ``"cpp"`` where it applies, else ``"torch"`` with a one-line note through
    ``log``. The environment variable ``DLRM_FUSED_EMBEDDING_BACKEND`` (``auto``/``cpp``/``torch``)
    overrides the argument, so a whole test or benchmark run can be forced onto either path.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from dlrm.kernels import native_build

BACKEND_ENV = "DLRM_FUSED_EMBEDDING_BACKEND"
SUPPORTED_OPTIMIZERS = ("sgd",)
"""Optimizers whose update the fused path performs itself (names as ``--optimizer`` spells them)."""

_ROW_ALIGN_BYTES = 64
"""Every table starts at a multiple of this many bytes in its buffer, as a freshly allocated
tensor does: torch's per-sample-weight gradient (an MKL dot) rounds differently at other alignments."""

Indices = Union[torch.Tensor, Sequence[torch.Tensor]]
LrSource = Union[float, Callable[[], float], None]


def _default_log(message: str) -> None:
    logging.getLogger("dlrm.fused_embedding").warning(message)


# ----------------------------------------------------------------------------------------------
# The C++ extension: built once per machine and torch version, loaded once per process
# ----------------------------------------------------------------------------------------------


def _load_extension() -> Tuple[object, str, float]:
    """Build or load the ``csrc/fused_embedding.cpp`` kernel, once per process.

    Returns (the module or None, why not, seconds taken)."""
    return native_build.load("dlrm_fused_embedding", "fused_embedding.cpp", "fused_embedding",
                             ("-O3", "-fopenmp", "-ffp-contract=off"), ("-fopenmp",))


def extension_status() -> Tuple[bool, str, float]:
    """Build or load the extension if not done yet; returns (available, why not, seconds taken)."""
    module, reason, seconds = _load_extension()
    return module is not None, reason, seconds


@functools.lru_cache(maxsize=None)
def _fused_prefix(dim: int) -> Optional[int]:
    """How the running torch rounds ``w + alpha * v`` in SGD's sparse update, per row position.

    Returns P: positions d < P are one fused multiply-add, the others a rounded product plus a
    rounded sum; None if no such P reproduces ``torch.optim.SGD`` (then the kernel cannot be used).
    Found by one update of 2048 random rows with magnitudes spread over 3 decades, where the two
    roundings disagree in a large share of the elements of every column.
    """
    module = _load_extension()[0]
    gen = torch.Generator().manual_seed(1234)
    rows, lr = 2048, 0.0371
    w0 = torch.randn(rows, dim, generator=gen)
    v = torch.randn(rows, dim, generator=gen) * torch.rand(rows, 1, generator=gen).mul_(1000.0)
    index = torch.arange(rows)
    param = nn.Parameter(w0.clone())
    param.grad = torch.sparse_coo_tensor(index[None], v, (rows, dim), check_invariants=False)
    torch.optim.SGD([param], lr=lr).step()
    expected = param.detach()
    starts = torch.arange(rows + 1)
    candidates = []
    for prefix in (dim, 0):
        out = w0.clone()
        module.sgd_update(out, index, starts, [v], torch.empty(0), lr, prefix)
        candidates.append((out == expected).all(dim=0))  # (D,) per column
    fused_ok, unfused_ok = candidates
    for prefix in range(dim, -1, -1):
        if bool(fused_ok[:prefix].all()) and bool(unfused_ok[prefix:].all()):
            return prefix
    return None


# ----------------------------------------------------------------------------------------------
# Layout: one buffer per embedding dim, per-table Parameter views into it
# ----------------------------------------------------------------------------------------------


class _TableWeight(nn.Module):
    """Holder of one table's Parameter, so that state-dict keys read ``K.weight``."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight


class _DimGroup:
    """The tables of one embedding dim: their buffer, where each table lives in it, and the scratch
    memory of the lookups (reused across steps, keyed by size)."""

    def __init__(self, dim: int, tables: List[int], rows: List[int]):
        self.dim = dim
        self.tables = tables  # global table numbers, in table order
        self.rows = rows  # R_t per table of the group
        align = _ROW_ALIGN_BYTES // math.gcd(_ROW_ALIGN_BYTES, 4 * dim)  # rows per alignment step
        self.row_base, total = [], 0
        for r in rows:
            self.row_base.append(total)
            total += -(-max(r, 1) // align) * align
        self.total_rows = total
        self.buffer: Optional[torch.Tensor] = None
        self.backend = "torch"
        self.fused_prefix = 0
        self._free: Dict[Tuple[int, int, bool], List["_Scratch"]] = {}

    def view(self, i: int) -> torch.Tensor:
        """The group's i-th table, an (R_t, D) view of the buffer."""
        return self.buffer[self.row_base[i]:self.row_base[i] + self.rows[i]]

    def take_scratch(self, lookups: int, bags: int, weighted: bool) -> "_Scratch":
        """Global rows (N,), bag starts (T*B+1,) and per-sample weights (N,) or None, from the
        pool when a free set of these sizes exists (a batch's set is in use until its backward)."""
        key = (lookups, bags, weighted)
        free = self._free.get(key)
        if free:
            return free.pop()
        device = self.buffer.device
        return _Scratch(key, torch.empty(lookups, dtype=torch.long, device=device),
                        torch.empty(bags + 1, dtype=torch.long, device=device),
                        torch.empty(lookups, dtype=self.buffer.dtype, device=device) if weighted else None)

    def give_scratch(self, scratch: "_Scratch") -> None:
        pool = self._free.setdefault(scratch.key, [])
        if len(pool) < 2:
            pool.append(scratch)


class _Scratch(NamedTuple):
    key: Tuple[int, int, bool]
    rows: torch.Tensor
    bag_starts: torch.Tensor
    psw: Optional[torch.Tensor]


class FusedTables(nn.Module):
    r"""Sum-pooled embedding tables in one buffer per dim, updated by an exact SGD inside backward.

    Equivalent, after every training step, to a ``nn.ModuleList`` of
    ``nn.EmbeddingBag(R_t, D_t, mode="sum", sparse=True)`` trained by ``torch.optim.SGD``: same
    outputs, same tables, bit for bit (see the module docstring for the proof and its limits).

    Args:
        table_sizes (sequence of int): R_t, rows of each table (at least 1).
        dims (int or sequence of int): the embedding dim of every table, or one per table.
        lr (float, callable or None, optional): the SGD learning rate, read at every backward; a
            callable is called then (see :meth:`follow_optimizer_lr`). Default: ``None`` (must be set
            before the first backward).
        backend (str, optional): ``"auto"``, ``"cpp"`` or ``"torch"``; the environment variable
            ``DLRM_FUSED_EMBEDDING_BACKEND`` overrides it. Default: ``"auto"``.
        log (callable, optional): receives one line when the C++ path is not used. Default: a
            ``logging`` warning.
        device (torch.device, optional): where the buffers live. Default: CPU.

    Attributes:
        K.weight (Parameter): (R_K, D_K) view of table K in its dim's buffer, initialised to zeros
            (use :meth:`from_weights`, :meth:`from_embedding_bags` or ``load_state_dict`` to fill
            them). Its ``.grad`` stays None: the module updates it during backward. In
            ``state_dict()`` the tables are views of one storage per dim, which ``torch.save``
            writes once (with fewer than 16 padding rows per table).
        lr: as the argument; settable at any time.
        supports_learned_pooling (bool): True; learned pooling weights get the plain path's gradient.
        supports_gradient_accumulation (bool): False; every backward applies an SGD step.

    Shape:
        - offsets: (T, B) int64, bag starts per table (``offsets[t, 0] == 0``, non-decreasing).
        - indices: (T, N) int64, or a list of T int64 tensors (N_t,), each in [0, R_t).
        - pooling_weights: None, or a list of T per-row weight vectors (R_t,); the weight of a
          lookup is ``pooling_weights[t][indices[t]]``.
        - Output: a list of T tensors (B, D_t) (views of one buffer per dim; do not modify in place).

    Example::

        >>> fused = FusedTables.from_weights([torch.randn(5, 4), torch.randn(3, 4)], lr=0.1)
        >>> offsets = torch.tensor([[0, 2], [0, 1]])          # 2 bags per table
        >>> indices = [torch.tensor([0, 4, 4]), torch.tensor([2])]  # table 1, bag 1 is empty
        >>> out = fused(offsets, indices)                     # [(2, 4), (2, 4)]
        >>> sum(o.sum() for o in out).backward()              # updates the tables in place
    """

    supports_learned_pooling = True
    supports_gradient_accumulation = False

    def __init__(self, table_sizes: Sequence[int], dims: Union[int, Sequence[int]], *, lr: LrSource = None,
                 backend: str = "auto", log: Optional[Callable[[str], None]] = None,
                 device: Optional[torch.device] = None, _zero: bool = True):
        super().__init__()
        table_sizes = [int(r) for r in table_sizes]
        dims = [int(dims)] * len(table_sizes) if isinstance(dims, int) else [int(d) for d in dims]
        if not table_sizes or len(dims) != len(table_sizes):
            raise ValueError(f"FusedTables: need one dim per table, got {len(table_sizes)} tables and "
                             f"{len(dims)} dims")
        if min(table_sizes) < 1 or min(dims) < 1:
            raise ValueError(f"FusedTables: every table needs at least 1 row and dim 1, got sizes "
                             f"{table_sizes} and dims {dims}")
        self.table_sizes, self.dims, self.lr = table_sizes, dims, lr
        self.log = log or _default_log
        self.requested_backend = os.environ.get(BACKEND_ENV, "").strip().lower() or backend
        if self.requested_backend not in ("auto", "cpp", "torch"):
            raise ValueError(f"FusedTables: backend must be auto, cpp or torch, got {self.requested_backend!r}")
        self._groups: List[_DimGroup] = []
        self._where: List[Tuple[int, int]] = [(0, 0)] * len(table_sizes)  # table -> (group, position)
        for dim in sorted(set(dims), key=dims.index):
            tables = [t for t, d in enumerate(dims) if d == dim]
            group = _DimGroup(dim, tables, [table_sizes[t] for t in tables])
            group.buffer = torch.empty(group.total_rows, dim, dtype=torch.float32, device=device)
            if group.buffer.device.type == "cpu" and self.requested_backend != "torch" and extension_status()[0]:
                _load_extension()[0].advise_huge_pages(group.buffer)  # before the first touch
            if _zero:
                group.buffer.zero_()
            for i, t in enumerate(tables):
                self._where[t] = (len(self._groups), i)
            self._groups.append(group)
        for t in range(len(table_sizes)):
            g, i = self._where[t]
            self.add_module(str(t), _TableWeight(nn.Parameter(self._groups[g].view(i))))
        self._bind()
        self._choose_backends()
        self.register_load_state_dict_post_hook(_reattach_after_load)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_weights(cls, weights: Sequence[torch.Tensor], *, release_sources: bool = False,
                     **kwargs) -> "FusedTables":
        """Build from T float32 (R_t, D_t) tensors (copied; the module never aliases them).

        Args:
            weights: the tables, in table order, all on one device.
            release_sources: free each source's storage right after copying it (``resize_(0)``, seen
                by every tensor that shares it), so that the peak memory is the fused buffers plus
                the not-yet-copied tables rather than twice the tables. Default: False.
            **kwargs: the constructor's keyword arguments (``lr``, ``backend``, ``log``).
        """
        if not weights:
            raise ValueError("FusedTables.from_weights: need at least one table")
        for t, w in enumerate(weights):
            if w.dim() != 2 or w.dtype != torch.float32:
                raise ValueError(f"FusedTables.from_weights: table {t} must be a float32 (R, D) tensor, "
                                 f"got {w.dtype} of shape {tuple(w.shape)}")
        module = cls([w.shape[0] for w in weights], [w.shape[1] for w in weights],
                     device=weights[0].device, _zero=False, **kwargs)
        with torch.no_grad():
            for t, w in enumerate(weights):
                module.table_weight(t).copy_(w)
                storage = w.untyped_storage()
                if release_sources and storage.resizable():
                    storage.resize_(0)
            for group in module._groups:  # the padding rows, never looked up, zeroed for tidiness
                _zero_padding(group)
        return module

    @classmethod
    def uninitialised(cls, table_sizes: Sequence[int], dims: Union[int, Sequence[int]], **kwargs) -> "FusedTables":
        """Tables whose values are left as allocated, for the caller to fill every table under
        ``torch.no_grad()`` (only the padding rows between tables are zeroed). Saves writing the
        buffers twice when every value is drawn anyway."""
        module = cls(table_sizes, dims, _zero=False, **kwargs)
        for group in module._groups:
            _zero_padding(group)
        return module

    @classmethod
    def from_embedding_bags(cls, bags: Iterable[nn.EmbeddingBag], **kwargs) -> "FusedTables":
        """Build from ``nn.EmbeddingBag(mode="sum")`` tables (their weights are copied; with
        ``release_sources=True`` the bags are left with empty weights)."""
        bags = list(bags)
        for t, bag in enumerate(bags):
            plain = (isinstance(bag, nn.EmbeddingBag) and bag.mode == "sum" and bag.max_norm is None
                     and bag.padding_idx is None and not bag.scale_grad_by_freq and not bag.include_last_offset)
            if not plain:
                raise ValueError(f"FusedTables.from_embedding_bags: table {t} must be a plain "
                                 f"nn.EmbeddingBag(mode='sum') (no max_norm, padding_idx, "
                                 f"scale_grad_by_freq or include_last_offset)")
        return cls.from_weights([bag.weight.detach() for bag in bags], **kwargs)

    def table_weight(self, t: int) -> nn.Parameter:
        """Table t's Parameter, a (R_t, D_t) view of its buffer (fill it under ``torch.no_grad()``)."""
        return getattr(self, str(t)).weight

    def current_lr(self) -> float:
        """The learning rate the next update uses (``lr``, called if it is a callable)."""
        lr = self.lr() if callable(self.lr) else self.lr
        if lr is None:
            raise RuntimeError("FusedTables.lr is not set: set it (or call follow_optimizer_lr) "
                               "before the first backward")
        return float(lr)  # a Python float: a CUDA tensor here would synchronise

    # -- training-loop helpers --------------------------------------------------------------

    def parameters_updated_in_backward(self) -> List[nn.Parameter]:
        """The per-table Parameters this module updates itself; leave them out of the optimizer."""
        return [self.table_weight(t) for t in range(len(self.table_sizes))]

    def follow_optimizer_lr(self, optimizer: torch.optim.Optimizer, group: int = 0) -> None:
        """Read the learning rate from ``optimizer.param_groups[group]["lr"]`` at every backward.

        With the usual loop (forward, backward, ``optimizer.step()``, ``scheduler.step()``) that is
        the rate the optimizer's step uses in the same iteration, so the tables follow the schedule.
        Raises ValueError if that group is not plain SGD (see :func:`check_optimizer`).
        """
        check_optimizer(optimizer, group)
        self.lr = functools.partial(_group_lr, optimizer, group)

    @property
    def backends(self) -> List[str]:
        """The backend of each table ("cpp" or "torch"), in table order."""
        return [self._groups[g].backend for g, _ in self._where]

    def extra_repr(self) -> str:
        dims = sorted(set(self.dims))
        return f"tables={len(self.table_sizes)}, dims={dims}, backends={sorted(set(self.backends))}"

    # -- forward -------------------------------------------------------------------------------

    def forward(self, offsets: torch.Tensor, indices: Indices,
                pooling_weights: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
        T = len(self.table_sizes)
        if offsets.dim() != 2 or offsets.shape[0] != T:
            raise ValueError(f"FusedTables: offsets must be (T, B) with T = {T}, got {tuple(offsets.shape)}")
        if len(indices) != T or (pooling_weights is not None and len(pooling_weights) != T):
            raise ValueError(f"FusedTables: need indices (and pooling weights) for the {T} tables")
        if any(p.data_ptr() != ptr for p, ptr in zip(self._params, self._ptrs)):
            self._reattach()
        psw = None
        if pooling_weights is not None:
            psw = [pooling_weights[t][indices[t]] for t in range(T)]  # as the plain path does
        out: List[Optional[torch.Tensor]] = [None] * T
        grad_on = torch.is_grad_enabled()
        for group in self._groups:
            g_offsets = offsets if len(group.tables) == T else offsets[group.tables]
            g_indices = _select(indices, group.tables, T)
            g_psw = None if psw is None else [psw[t] for t in group.tables]
            train = grad_on and (any(self._params[t].requires_grad for t in group.tables)
                                 or (g_psw is not None and any(p.requires_grad for p in g_psw)))
            if train:
                pooled = _FusedLookup.apply(_ANCHOR, self, group, g_offsets, g_indices, *(g_psw or ()))
            else:
                with torch.no_grad():
                    pooled, scratch = _lookup(group, g_offsets, g_indices, g_psw)
                group.give_scratch(scratch)
            for t, y in zip(group.tables, pooled):
                out[t] = y
        return out

    # -- keeping the per-table Parameters views of the buffers ----------------------------------

    def _choose_backends(self) -> None:
        """Pick each group's backend (C++ where possible) and say once why not, if not."""
        notes = []
        for group in self._groups:
            group.backend, note = self._backend_for(group)
            if note:
                notes.append(note)
        if notes and self.requested_backend != "torch":
            self.log("fused_embedding: using the pure-torch path (exact on the CPU, slower): " + "; ".join(notes))

    def _backend_for(self, group: _DimGroup) -> Tuple[str, str]:
        if self.requested_backend == "torch":
            return "torch", ""
        buffer = group.buffer
        if buffer.device.type != "cpu" or buffer.dtype != torch.float32:
            if self.requested_backend == "cpp":
                raise ValueError("FusedTables: backend 'cpp' needs CPU float32 tables")
            return "torch", f"the C++ kernel is for CPU float32 tables, these are {buffer.dtype} on {buffer.device}"
        available, reason, _ = extension_status()
        if not available:
            if self.requested_backend == "cpp":
                raise RuntimeError(f"FusedTables: the C++ extension could not be built: {reason}")
            return "torch", f"the C++ extension is unavailable ({reason})"
        prefix = _fused_prefix(group.dim)
        if prefix is None:
            if self.requested_backend == "cpp":
                raise RuntimeError(f"FusedTables: no kernel rounding matches torch's SGD at dim {group.dim}")
            return "torch", f"no kernel rounding matches this torch's SGD at dim {group.dim}"
        group.fused_prefix = prefix
        return "cpp", ""

    def _apply(self, fn, recurse=True):
        """Convert each buffer once for ``.to()``, ``.cuda()``, ``.double()`` ..., then re-point the
        per-table Parameters at the new buffer (the default would copy every table separately)."""
        for group in self._groups:
            group.buffer = fn(group.buffer)
            group._free.clear()
        for t in range(len(self.table_sizes)):
            g, i = self._where[t]
            self.table_weight(t).data = self._groups[g].view(i)
        self._bind()
        self._choose_backends()
        return self

    def _bind(self) -> None:
        """Remember each table's Parameter and where it must point (checked at every forward)."""
        self._params = [self.table_weight(t) for t in range(len(self.table_sizes))]
        self._ptrs = [self._groups[g].view(i).data_ptr() for g, i in self._where]

    def _reattach(self) -> None:
        """Re-attach every table whose Parameter no longer views the buffer (after ``copy.deepcopy``,
        ``load_state_dict(assign=True)`` or an assignment): its values are copied into the buffer."""
        for t, (g, i) in enumerate(self._where):
            view = self._groups[g].view(i)
            param = self.table_weight(t)
            if param.data_ptr() == view.data_ptr() and param.shape == view.shape:
                continue
            if param.shape != view.shape:
                raise ValueError(f"FusedTables: table {t} has shape {tuple(param.shape)}, expected {tuple(view.shape)}")
            with torch.no_grad():
                view.copy_(param)
            getattr(self, str(t)).weight = nn.Parameter(view, requires_grad=param.requires_grad)
        self._bind()


def _reattach_after_load(module: FusedTables, incompatible_keys) -> None:
    module._reattach()


def _zero_padding(group: _DimGroup) -> None:
    for i in range(len(group.tables)):
        end = group.row_base[i] + group.rows[i]
        stop = group.row_base[i + 1] if i + 1 < len(group.tables) else group.total_rows
        group.buffer[end:stop].zero_()


def _select(indices: Indices, tables: List[int], T: int) -> Indices:
    """The indices of ``tables``: the (T, N) tensor itself if it holds exactly those, else a list
    of 1-D tensors."""
    if isinstance(indices, torch.Tensor):
        if indices.dim() != 2:
            raise ValueError(f"FusedTables: an indices tensor must be (T, N), got {tuple(indices.shape)}")
        if len(tables) == T:
            return indices
    return [indices[t] for t in tables]


def _group_lr(optimizer: torch.optim.Optimizer, group: int) -> float:
    return optimizer.param_groups[group]["lr"]


def check_optimizer(optimizer: torch.optim.Optimizer, group: int = 0) -> None:
    """Raise ValueError unless ``optimizer.param_groups[group]`` is SGD that the fused update reproduces:
    ``torch.optim.SGD`` with momentum 0, dampening 0, weight_decay 0, no nesterov, no maximize."""
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(f"fused embedding tables support only {', '.join(SUPPORTED_OPTIMIZERS)} "
                         f"(torch.optim.SGD), got {type(optimizer).__name__}")
    options = optimizer.param_groups[group]
    for name, plain in (("momentum", 0), ("dampening", 0), ("weight_decay", 0), ("nesterov", False),
                        ("maximize", False)):
        if options.get(name, plain) != plain:
            raise ValueError(f"fused embedding tables support plain SGD only, got {name}={options[name]!r}")


def parameters_excluding_fused(model: nn.Module) -> List[nn.Parameter]:
    """List the parameters to give the optimizer: ``model.parameters()`` minus those that any
    :class:`FusedTables` inside it updates itself."""
    fused = {id(p) for m in model.modules() if isinstance(m, FusedTables) for p in m.parameters_updated_in_backward()}
    return [p for p in model.parameters() if id(p) not in fused]


# ----------------------------------------------------------------------------------------------
# Lookup and update
# ----------------------------------------------------------------------------------------------


def _lookup(group: _DimGroup, offsets: torch.Tensor, indices: Indices,
            psw: Optional[List[torch.Tensor]]) -> Tuple[List[torch.Tensor], _Scratch]:
    """One ``embedding_bag`` over the group's buffer. Returns the T (B, D) outputs and the scratch
    (global rows, bag starts, concatenated per-sample weights) that the update needs."""
    T, B = offsets.shape
    if B == 0:
        raise ValueError("FusedTables: offsets must have at least one bag per table")
    matrix = isinstance(indices, torch.Tensor)
    lookups = indices.numel() if matrix else sum(i.numel() for i in indices)
    scratch = group.take_scratch(lookups, T * B, psw is not None)
    if group.backend == "cpp":
        prepare = _load_extension()[0].prepare_lookups_matrix if matrix else _load_extension()[0].prepare_lookups
        prepare(indices, offsets, group.row_base, group.rows, scratch.rows, scratch.bag_starts)
    else:
        _prepare_with_torch(group, offsets, indices, scratch.rows, scratch.bag_starts)
    if psw is not None:
        torch.cat([p.detach().to(group.buffer.dtype) for p in psw], out=scratch.psw)
    # Bag t*B + b is bag b of table t; torch sums each bag in lookup order, as per table.
    pooled = F.embedding_bag(scratch.rows, group.buffer, scratch.bag_starts[:-1], mode="sum",
                             per_sample_weights=scratch.psw)  # (T*B, D)
    return list(pooled.view(T, B, group.dim).unbind(0)), scratch


def _prepare_with_torch(group: _DimGroup, offsets: torch.Tensor, indices: Indices,
                        rows: torch.Tensor, bag_starts: torch.Tensor) -> None:
    """The pure-torch version of the C++ ``prepare_lookups``. Its checks run on the tensors' device:
    on CUDA they fail asynchronously, so there is no host synchronisation."""
    T, B = offsets.shape
    start = 0
    for i, idx in enumerate(indices):
        n = idx.numel()
        bad = ((idx < 0) | (idx >= group.rows[i])).any()
        torch._assert_async(~bad, f"FusedTables: an index of table {group.tables[i]} is out of range "
                                  f"[0, {group.rows[i]})")
        ok = (offsets[i, 0] == 0) & (offsets[i, -1] <= n) & (offsets[i, 1:] >= offsets[i, :-1]).all()
        torch._assert_async(ok, f"FusedTables: offsets of table {group.tables[i]} must start at 0, "
                                f"not decrease and stay within its {n} indices")
        torch.add(idx, group.row_base[i], out=rows[start:start + n])
        torch.add(offsets[i], start, out=bag_starts[i * B:(i + 1) * B])
        start += n
    bag_starts[T * B] = start


def _torch_update(group: _DimGroup, grads: List[Optional[torch.Tensor]], scratch: _Scratch,
                  sizes: List[int], lr: float) -> None:
    """SGD as torch applies it to each table's uncoalesced sparse gradient: one ``index_add_`` of
    the per-lookup gradients, in lookup order."""
    T = len(grads)
    B = (scratch.bag_starts.numel() - 1) // T
    local_bags = torch.arange(B, device=scratch.rows.device).repeat(T)  # (T*B,)
    bag_of = torch.repeat_interleave(local_bags, scratch.bag_starts.diff(), output_size=sum(sizes))  # (N,)
    start = 0
    for grad, n in zip(grads, sizes):
        if grad is not None:
            per_lookup = grad.index_select(0, bag_of[start:start + n])  # (N_t, D)
            if scratch.psw is not None:
                per_lookup.mul_(scratch.psw[start:start + n].unsqueeze(1))
            group.buffer.index_add_(0, scratch.rows[start:start + n], per_lookup, alpha=-lr)
        start += n


class _FusedLookup(torch.autograd.Function):
    """One dim group's lookups as an autograd node that updates the tables in its backward.

    Forward: the lookups of one dim group. Backward: the per-sample-weight gradients (if any
    are wanted, from the weights before the update), then the SGD update of the buffer. The
    tables themselves are no inputs, so they never get a ``.grad``."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, module: FusedTables, group: _DimGroup, offsets: torch.Tensor,
                indices: Indices, *psw: torch.Tensor):
        ctx.set_materialize_grads(False)
        pooled, ctx.scratch = _lookup(group, offsets, indices, list(psw) if psw else None)
        ctx.module, ctx.group = module, group
        ctx.sizes = [indices.shape[1]] * len(indices) if isinstance(indices, torch.Tensor) else [
            i.numel() for i in indices]
        ctx.frozen = [i for i, t in enumerate(group.tables) if not module._params[t].requires_grad]
        if any(p.requires_grad for p in psw):
            ctx.offsets, ctx.indices = offsets, indices  # for the per-sample-weight gradient
        return tuple(pooled)

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        module, group, scratch = ctx.module, ctx.group, ctx.scratch
        if scratch is None:
            raise RuntimeError("FusedTables: a second backward through the same lookups would apply "
                               "the SGD update twice")
        ctx.scratch = None
        wants = ctx.needs_input_grad[5:]
        psw_grads: List[Optional[torch.Tensor]] = [None] * len(wants)
        with torch.no_grad():
            for i, grad in enumerate(grads):  # before the update: torch differentiates at the old weights
                if wants and wants[i] and grad is not None:
                    no_offset2bag = torch.empty(0, dtype=torch.long, device=grad.device)
                    psw_grads[i] = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                        grad, group.view(i), ctx.indices[i], ctx.offsets[i], no_offset2bag, 0, -1)
            lr = module.current_lr()
            trained = list(grads)
            for i in ctx.frozen:
                trained[i] = None
            if group.backend == "cpp":
                _load_extension()[0].sgd_update(group.buffer, scratch.rows, scratch.bag_starts, trained,
                                                _NO_TENSOR if scratch.psw is None else scratch.psw, lr,
                                                group.fused_prefix)
            else:
                _torch_update(group, trained, scratch, ctx.sizes, lr)
        group.give_scratch(scratch)
        return (None, None, None, None, None, *psw_grads)


_NO_TENSOR = torch.empty(0)
"""What the C++ update takes for "no per-sample weights"."""
_ANCHOR = torch.empty(0, requires_grad=True)
"""An input that requires grad, so that autograd calls the backward (the tables are no inputs); its
gradient is always None."""

