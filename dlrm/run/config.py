"""What a run is: its configuration, read once from the flags, and the checks of that configuration
that need the running process (world size, device, memory).

The entry script's ``config_from_args`` builds :class:`RunConfig`; every other part of the program
takes the smallest sub-config it needs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Tuple, Union

import torch

from dlrm.common import ConfigError, FlagError, check_number
from dlrm.data.config import RandomDataConfig
from dlrm.distributed import DistInfo
from dlrm.io.path_collisions import NamedFile
from dlrm.model.dlrm import ModelConfig
from dlrm.model.fast_numerics import has_native_bf16
from dlrm.outputs.side_channels import OutputConfig
from dlrm.run.preflight import BatchShape, check_memory as check_memory_fits
from dlrm.run.train import TrainConfig
from dlrm.shard.config import ShardingConfig
from dlrm.checkpoints.config import CheckpointConfig
from dlrm.store.config import StoreConfig

if TYPE_CHECKING:
    from dlrm.data.criteo.loaders import CriteoLoaderConfig


@dataclass(frozen=True)
class SystemConfig:
    """Where and how the run executes."""

    seed: int = 123
    use_gpu: bool = False
    local_rank: int = -1
    dist_backend: str = ""
    debug_mode: bool = False
    print_precision: int = 5
    dist_init_timeout: float = 300.0

    def __post_init__(self):
        check_number("dist_init_timeout", self.dist_init_timeout)
        if not 0 <= self.seed < 2**32:
            raise FlagError(f"{{seed}} must be in [0, 2**32) (NumPy's range), got {self.seed}")
        if self.dist_init_timeout <= 0:
            raise FlagError(f"{{dist_init_timeout}} must be positive, got {self.dist_init_timeout:g}")


@dataclass(frozen=True)
class InferenceConfig:
    """How ``--inference-only`` evaluates: the MLPs' and the tables' bits (32: float32)."""

    inference_only: bool = False
    quantize_mlp_bits: int = 32
    quantize_emb_bits: int = 32

    def __post_init__(self):
        if self.quantize_mlp_bits not in (8, 16, 32):
            raise FlagError(f"{{quantize_mlp_bits}} must be 8, 16 or 32, got {self.quantize_mlp_bits}")
        if self.quantize_emb_bits not in (4, 8, 32):
            raise FlagError(f"{{quantize_emb_bits}} must be 4, 8 or 32, got {self.quantize_emb_bits}")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, read once from the flags. ``model`` holds the flags' table sizes; a
    Criteo data set replaces them with its own (:func:`dlrm_model.fit_to_data`)."""

    model: ModelConfig
    data: Union[RandomDataConfig, "CriteoLoaderConfig"]
    train: TrainConfig
    system: SystemConfig
    output: OutputConfig
    inference: InferenceConfig
    sharding: ShardingConfig = ShardingConfig()
    store: StoreConfig = StoreConfig()
    checkpoints: CheckpointConfig = CheckpointConfig()
    flags: Tuple[Tuple[str, object], ...] = ()  # every flag's value by its reference name, for the args line

    def __post_init__(self):
        check_combinations(self)

    @property
    def random_data(self) -> bool:
        return isinstance(self.data, RandomDataConfig)


def check_combinations(cfg: RunConfig) -> None:
    """Raise FlagError for options of different parts that cannot be combined."""
    model, inference, gpu = cfg.model, cfg.inference, cfg.system.use_gpu
    if cfg.train.fast_numerics and gpu:
        raise FlagError("{fast_numerics} is for CPUs; it cannot be combined with {use_gpu}")
    if inference.quantize_emb_bits != 32 and (model.qr_flag or model.md_flag or gpu):
        raise FlagError("{quantize_emb_bits} works on CPU with plain tables only "
                        "(not with {qr_flag}, {md_flag} or {use_gpu})")
    if cfg.store.on_disk:
        _check_disk_store(cfg)
    if (cfg.train.mlperf_logging and cfg.random_data and not cfg.data.round_targets
            and (cfg.train.test_freq > 0 or inference.inference_only)):
        raise FlagError("{mlperf_logging} computes classification metrics, which need 0/1 targets: "
                        "add {round_targets}=true for random or synthetic data")


def _check_disk_store(cfg: RunConfig) -> None:
    """Raise FlagError for what --embedding-store=disk does not work with (yet)."""
    model, train = cfg.model, cfg.train
    blockers = [flag for flag, present in (
        ("{qr_flag}", model.qr_flag), ("{md_flag}", model.md_flag), ("{use_gpu}", cfg.system.use_gpu),
        ("{embedding_backend}=fused", model.embedding_backend == "fused"),
        ("{quantize_emb_bits}", cfg.inference.quantize_emb_bits != 32), ("{save_onnx}", cfg.output.save_onnx),
        ("{grad_accum_iter} above 1", train.mlperf_logging and train.grad_accum_iter > 1),
    ) if present]
    if blockers:
        raise FlagError(f"{{embedding_store}}=disk does not work with {', '.join(blockers)}")


FUSED_MIN_VALUES = 1 << 20
"""``--embedding-backend=auto`` fuses tables holding at least this many values: below it a step is a
few microseconds either way, and the fused kernel's one-off build (about 30 s) would not pay."""


def embedding_backend(cfg: RunConfig, model_cfg: ModelConfig, info: DistInfo, device: torch.device) -> str:
    """"plain" or "fused" for ``--embedding-backend``; ConfigError if "fused" cannot apply here."""
    t = cfg.train
    blockers = [why for why, present in (
        ("--optimizer is not sgd", t.optimizer != "sgd" and not cfg.inference.inference_only),
        ("several processes", info.world_size > 1), ("--qr-flag", model_cfg.qr_flag), ("--md-flag", model_cfg.md_flag),
        ("gradient accumulation", t.mlperf_logging and t.grad_accum_iter > 1), ("a GPU", device.type != "cpu"),
    ) if present]
    requested = model_cfg.embedding_backend
    if cfg.store.on_disk:
        return "plain"  # the store's working rows take the plain path's arithmetic (equal to fused)
    if requested == "fused" and blockers:
        raise ConfigError(f"--embedding-backend=fused does not apply with {', '.join(blockers)} (use plain or auto)")
    if requested != "auto":
        return requested
    values = sum(model_cfg.table_sizes) * model_cfg.embedding_dim
    return "fused" if not blockers and values >= FUSED_MIN_VALUES else "plain"


def check_distributed(cfg: RunConfig, info: DistInfo, num_tables: int) -> None:
    """Raise ConfigError for what a multi-process run does not support."""
    if info.world_size == 1:
        return
    if cfg.checkpoints.on:
        raise ConfigError(f"--checkpoint-every runs in one process only so far (world size {info.world_size})")
    if num_tables < info.world_size and cfg.sharding.sharding == "table":
        raise ConfigError(f"only ({num_tables}) sparse features for ({info.world_size}) devices, "
                          "table partitions will fail (split the tables: --sharding=row, column or auto)")
    i = cfg.inference
    for flag, used in (("--save-onnx", cfg.output.save_onnx), ("--quantize-emb-with-bit", i.quantize_emb_bits != 32),
                       ("--quantize-mlp-with-bit", i.quantize_mlp_bits != 32)):
        if used:
            raise ConfigError(f"{flag} is not supported in a multi-process run (world size {info.world_size})")


def flag_warnings(cfg: RunConfig, info: DistInfo) -> List[str]:
    """Flags that are accepted but change nothing here, each said once (the reference ignored them
    silently)."""
    out, inference = [], cfg.inference
    if inference.inference_only and not cfg.output.load_model:
        out.append("warning: --inference-only without --load-model evaluates a freshly drawn model")
    if not inference.inference_only and (inference.quantize_emb_bits != 32 or inference.quantize_mlp_bits != 32):
        out.append("warning: --quantize-emb-with-bit and --quantize-mlp-with-bit apply with --inference-only "
                   "only; this run trains in float32")
    if cfg.system.use_gpu and not torch.cuda.is_available():
        out.append("warning: --use-gpu, but CUDA is not available: running on the CPU")
    if cfg.train.mixed_precision == "bf16" and not cfg.train.fast_numerics and not has_native_bf16() \
            and not (cfg.system.use_gpu and torch.cuda.is_available()):
        out.append("warning: this CPU has no native bfloat16 arithmetic (AVX512-BF16 or AMX): under "
                   "--mixed-precision=bf16 its GEMMs are emulated and many times slower than float32 "
                   "(add --fast-numerics to keep them in float32)")
    store = cfg.store
    if not store.on_disk and (store.embedding_store_dir or store.keep_embedding_store
                              or store.embedding_cache_gib != StoreConfig.embedding_cache_gib):
        out.append("warning: --embedding-store-dir, --embedding-cache-gib and --keep-embedding-store apply with "
                   "--embedding-store=disk only; the tables are in memory")
    if info.world_size == 1:
        s = cfg.sharding
        for flag, value, default in (("--dist-backend", cfg.system.dist_backend, ""),
                                     ("--sharding", s.sharding, "table"), ("--a2a-precision", s.a2a_precision, "fp32")):
            if value != default:
                out.append(f"warning: {flag}={value} has no effect in a single process")
    return out


PER_RANK_FLAGS = frozenset({"local_rank", "dist_init_timeout", "metrics_file", "tensor_board_filename", "onnx_file"})
"""Flags (by their reference names) that may differ between the ranks of one run: each process's own
place and patience, and the side outputs that rank 0 alone writes."""

PATH_FLAGS = frozenset({"raw_data_file", "processed_data_file", "data_trace_file", "load_model", "save_model"})
"""Paths that may differ between ranks (each machine keeps its copy where it likes) as long as all ranks
give one or none: what the files hold is compared once they are read (the data's shape, the loaded
checkpoint's position). ``--save-model`` is here because every rank takes part in each save."""


def rank_settings(cfg: RunConfig) -> Dict[str, Tuple[object, str]]:
    """Every flag that all ranks must share, by its spelling (``--learning-rate``), as (what must be
    equal, what to show), for :func:`extend_distributed.check_ranks_agree`."""
    out = {}
    for name, value in cfg.flags:
        if name in PER_RANK_FLAGS:
            continue
        shown = "none" if value is None or value == "" else str(value)
        out["--" + name.replace("_", "-")] = (bool(value) if name in PATH_FLAGS else repr(value), shown)
    return out


def check_memory(cfg: RunConfig, model_cfg: ModelConfig, info: DistInfo, device: torch.device) -> None:
    """Refuse, before building anything, a model and batch that do not fit in this machine's memory."""
    bag = 1 if not cfg.random_data else cfg.data.num_indices_per_lookup
    shape = BatchShape(cfg.train.batch_size, bag, cfg.data.test_batch_size if not cfg.random_data else 0)
    optimizer = None if cfg.inference.inference_only else cfg.train.optimizer
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) if info.world_size > 1 else 1
    check_memory_fits(model_cfg, optimizer, shape, device, processes_here=local, world_size=info.world_size,
                      cache_bytes=cfg.store.cache_bytes if cfg.store.on_disk else None)


def input_files(cfg: RunConfig) -> List[NamedFile]:
    """Every file the run reads, or that preprocessing makes and the run then reads, with the flag
    it comes from: what no output may overwrite."""
    files = [NamedFile("--load-model", cfg.output.load_model)] if cfg.output.load_model else []
    if cfg.random_data:
        if cfg.data.generation == "synthetic":
            from dlrm.data.synthetic_trace import distribution_paths

            files += [NamedFile("--data-trace-file", path, "a distribution file")
                      for path in distribution_paths(cfg.data.trace_file, len(cfg.data.table_sizes))]
        return files
    return files + _criteo_files(cfg.data)


def _criteo_files(data) -> List[NamedFile]:
    """The raw files (Terabyte's day files), every file preprocessing makes from them, their
    provenance records and row caches, --processed-data-file and the MLPerf binary files."""
    from dlrm.io import provenance
    from dlrm.data.criteo.bins import bin_file_paths
    from dlrm.data.criteo.config import criteo_paths
    from dlrm.data.criteo.row_cache import row_cache_path
    from dlrm.data.criteo.schema import NUM_SPARSE

    pre = data.preprocess
    paths = criteo_paths(pre.data_set, pre.raw_data_file)
    raw, named = "--raw-data-file", "--processed-data-file"
    files = ([NamedFile(raw, pre.raw_data_file)] if pre.data_set == "kaggle" else
             [NamedFile(raw, f"{pre.raw_data_file}_{i}", "a day file") for i in range(paths.days)])
    made = [paths.day_count_file(), paths.fea_count_file(), paths.output_file()]
    made += [paths.fea_dict_file(j) for j in range(NUM_SPARSE)]
    for i in range(paths.days):
        made += [paths.parsed_day(i), paths.processed_day(i), paths.reordered_day(i)]
        made += [paths.intermediate_day(i, part) for part in ("y", "d", "s")]
    sources = [NamedFile(raw, path, "a preprocessed file") for path in made]
    if pre.processed_data_file:
        sources.append(NamedFile(named, pre.processed_data_file))
        if data.mlperf_bin_loader:
            sources += [NamedFile(named, path, "an MLPerf binary file")
                        for path in bin_file_paths(pre.processed_data_file).values()]
    for source in sources:
        files += [source, NamedFile(source.flag, provenance.record_path(source.path), "a provenance record"),
                  NamedFile(source.flag, row_cache_path(source.path), "a row cache")]
    return files
