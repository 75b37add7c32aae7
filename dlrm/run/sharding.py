"""The run's sharding plan: the planner's inputs read off the run, the budget agreed by all ranks,
and the printed plan."""
from __future__ import annotations

import os
from typing import Callable, List, Optional

import torch

from dlrm.distributed import DistInfo, gather_objects
from dlrm.model.dlrm import ModelConfig, table_dims
from dlrm.run.config import RunConfig
from dlrm.run.preflight import available_bytes
from dlrm.shard.plan import ShardingPlan, format_plan, plan_sharding
from dlrm.shard.tables import table_specs

GIB = 1 << 30


def lookups_per_table(cfg: RunConfig, num_tables: int) -> List[float]:
    """Expected indices of each table per global training batch: the batch times the mean bag
    (random data: ``--num-indices-per-lookup``, or about half of it plus one half without
    ``--num-indices-per-lookup-fixed``; Criteo: one index per table and sample)."""
    bag = 1.0
    if cfg.random_data:
        k = cfg.data.num_indices_per_lookup
        bag = float(k) if cfg.data.fixed else k / 2 + 1 / (2 * k)  # E[round(max(1, u k))], u ~ U(0, 1)
    return [cfg.train.batch_size * bag] * num_tables


def rank_budget(cfg: RunConfig, info: DistInfo, device: torch.device) -> Optional[int]:
    """Bytes of tables and optimizer state each rank may hold: ``--rank-memory-gib``, or the memory
    available on each host divided by its processes, the smallest over all ranks (so that every
    rank makes the same plan). None when unknown."""
    if cfg.sharding.rank_memory_gib is not None:
        return int(cfg.sharding.rank_memory_gib * GIB)
    have = available_bytes(device)
    here = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) if info.world_size > 1 else 1
    mine = None if have is None else have // max(here, 1)
    known = [b for b in gather_objects(mine, info) if b is not None]
    return min(known) if known else None


def run_plan(cfg: RunConfig, model_cfg: ModelConfig, info: DistInfo, device: torch.device,
             log: Callable[[str], None]) -> Optional[ShardingPlan]:
    """Where every table lives in this run (None in one process), printed when asked.

    Raises:
        ConfigError: a table or a rank's pieces that do not fit the budget (one line naming them).
    """
    s = cfg.sharding
    if info.world_size == 1 and not s.print_sharding_plan and s.rank_memory_gib is None:
        return None
    specs = table_specs(model_cfg.table_sizes, table_dims(model_cfg), lookups_per_table(cfg, model_cfg.num_tables),
                        whole_only=model_cfg.qr_flag or model_cfg.md_flag)
    optimizer = "sgd" if cfg.inference.inference_only else cfg.train.optimizer
    learned = model_cfg.weighted_pooling == "learned"
    budget = None if cfg.store.on_disk else rank_budget(cfg, info, device)  # tables in files take no RAM
    plan = plan_sharding(specs, info.world_size, s.sharding, budget, optimizer, learned)
    if s.print_sharding_plan:
        for line in format_plan(plan, specs, optimizer, learned, budget):
            log(line)
    return plan if info.world_size > 1 else None
