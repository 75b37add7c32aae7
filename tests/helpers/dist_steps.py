"""Several small configurations trained for a few steps, for the multi-process tests.

``train_configs(info, dtype)`` trains every configuration of ``CONFIGS`` with the product's own
parts (``dlrm_model.DLRM``, ``dlrm_train.train_step``, ``checkpoint.full_state_dict``) and returns, per
configuration, every parameter in the single-process layout after every step. The test calls it in
one process; run under torchrun (``python -m torch.distributed.run ... tests/helpers/dist_steps.py OUT DTYPE [SHARDING]``),
every rank trains its pieces of the tables (``SHARDING``: table, row, column or auto; default
table) and rank 0 writes the same lists to OUT.

``dtype`` is ``float32`` (what a run computes) or ``float64``: the same code paths with the model,
the dense features and the labels converted to float64 after the usual float32 draws, so the initial
parameters are the same numbers in both.
"""
from __future__ import annotations

import sys
from typing import Dict, List

import numpy as np
import torch

from dlrm.data.random import RandomDataConfig, RandomDataset
from dlrm.distributed import DistInfo, init_distributed, shutdown_distributed
from dlrm.model.dlrm import DLRM, ModelConfig, make_loss, table_dims, top_mlp_input_width
from dlrm.shard.plan import plan_sharding
from dlrm.shard.tables import table_specs
from dlrm.run.checkpoint import full_state_dict
from dlrm.run.train import Logger, RunParts, TrainConfig, make_optimizer, make_scheduler, train_step

STEPS = 5

# Table sizes, dims, dense widths, bag sizes, interactions, losses and optimizers all vary; every
# batch size divides by 2, 3 and 4.
CONFIGS = [
    dict(tables=(10, 20, 30, 40, 50, 60, 70, 80), dim=8, bottom=(8, 16, 8), top=(8, 1), bag=4, batch=24,
         loss="bce", lr=0.1, optimizer="sgd"),
    dict(tables=(3, 7, 100, 1, 25), dim=4, bottom=(5, 4), top=(6, 1), bag=10, batch=12, loss="mse", lr=0.3,
         optimizer="sgd", itself=True),
    dict(tables=(9, 1, 2, 300, 4, 11, 6, 40, 5), dim=2, bottom=(13, 8, 2), top=(4, 2, 1), bag=3, fixed=True, batch=36,
         loss="bce", lr=0.02, optimizer="adagrad"),
    dict(tables=(50, 60, 70, 80), dim=3, bottom=(2, 3), top=(5, 1), bag=20, batch=12, loss="mse", lr=0.02,
         optimizer="rwsadagrad", interaction="cat"),
    # Learned and fixed per-row pooling weights (v_W_l.K trained by the table's owner), QR tables
    # (drawn from torch's RNG as in one process; concat gives every table 2D) and mixed dimensions
    # (a projection per table, trained by its owner).
    dict(tables=(10, 20, 30, 40, 50, 60), dim=4, bottom=(6, 4), top=(5, 1), bag=5, batch=24, loss="bce", lr=0.2,
         optimizer="sgd", pooling="learned"),
    dict(tables=(7, 300, 25, 40, 9), dim=3, bottom=(4, 3), top=(4, 1), bag=6, batch=12, loss="mse", lr=0.05,
         optimizer="adagrad", pooling="learned", itself=True),
    dict(tables=(30, 11, 60, 5, 80), dim=2, bottom=(3, 2), top=(3, 1), bag=4, batch=12, loss="bce", lr=0.3,
         optimizer="sgd", pooling="fixed", interaction="cat"),
    dict(tables=(100, 7, 250, 30, 64, 12), dim=4, bottom=(5, 4), top=(4, 1), bag=5, batch=24, loss="bce", lr=0.03,
         optimizer="sgd", qr=dict(threshold=20, collisions=4, operation="mult")),
    dict(tables=(90, 300, 15, 41), dim=3, bottom=(4, 6), top=(3, 1), bag=7, batch=12, loss="mse", lr=0.05,
         optimizer="adagrad", qr=dict(threshold=40, collisions=3, operation="concat")),
    dict(tables=(60, 8, 120, 33, 70), dim=2, bottom=(3, 2), top=(4, 1), bag=4, batch=12, loss="bce", lr=0.05,
         optimizer="adagrad", qr=dict(threshold=10, collisions=5, operation="add"), fix=True),
    dict(tables=(200, 9, 1000, 40, 500), dim=8, bottom=(4, 8), top=(4, 1), bag=3, batch=12, loss="bce", lr=0.1,
         optimizer="sgd", md=dict(threshold=30, temperature=0.3)),
    dict(tables=(300, 50, 2000, 80), dim=4, bottom=(3, 4), top=(3, 1), bag=6, batch=12, loss="mse", lr=0.05,
         optimizer="adagrad", md=dict(threshold=60, temperature=0.5)),
    # Row-wise Adagrad with learned pooling weights on tables with fewer rows than ranks, at a dim no
    # rank count divides: a column piece's rows are scaled by the whole row's mean square.
    dict(tables=(2, 90, 1, 45, 13), dim=5, bottom=(4, 5), top=(4, 1), bag=6, batch=24, loss="bce", lr=0.05,
         optimizer="rwsadagrad", pooling="learned"),
]


def _model_config(c: dict) -> ModelConfig:
    interaction = c.get("interaction", "dot")
    width = top_mlp_input_width(interaction, c.get("itself", False), len(c["tables"]), c["bottom"][-1])
    qr, md = c.get("qr"), c.get("md")
    tricks = {}
    if qr:
        tricks.update(qr_flag=True, qr_threshold=qr["threshold"], qr_collisions=qr["collisions"],
                      qr_operation=qr["operation"])
    if md:
        tricks.update(md_flag=True, md_threshold=md["threshold"], md_temperature=md["temperature"])
    return ModelConfig(embedding_dim=c["dim"], table_sizes=c["tables"], bottom_mlp=c["bottom"],
                       top_mlp=(width,) + c["top"], interaction=interaction,
                       interaction_itself=c.get("itself", False), weighted_pooling=c.get("pooling"),
                       fix_reference_bugs=c.get("fix", False), **tricks)


def longest_sum(c: dict) -> int:
    """The most terms any one float sum of a step adds: a batch's rows (weight gradients), a layer's
    inputs (GEMMs), a bag's rows (pooling) or the interaction's vectors (dot products)."""
    widths = (*c["bottom"], *c["top"], c["dim"], len(c["tables"]) + 1)
    return max(c["batch"], c["bag"] * c["batch"], *widths)


def sharding_plan(c: dict, info: DistInfo, mode: str):
    """The plan of ``mode`` for configuration ``c`` on ``info``'s ranks (None in one process)."""
    if info.world_size == 1:
        return None
    cfg = _model_config(c)
    specs = table_specs(cfg.table_sizes, table_dims(cfg), [c["bag"] * c["batch"]] * cfg.num_tables,
                        whole_only=cfg.qr_flag or cfg.md_flag)
    return plan_sharding(specs, info.world_size, mode, None, c["optimizer"], c.get("pooling") == "learned")


def train_config(c: dict, info: DistInfo, seed: int = 7, dtype: torch.dtype = torch.float32,
                 sharding: str = "table") -> List[Dict[str, torch.Tensor]]:
    """Every parameter (single-process layout, complete on rank 0) after each of STEPS steps."""
    torch.manual_seed(seed)  # QR and MD tables draw from torch too: the same draws in every process
    model = DLRM(_model_config(c), np.random.RandomState(seed), info, plan=sharding_plan(c, info, sharding)).to(dtype)
    optimizer = make_optimizer(c["optimizer"], list(model.parameters()), c["lr"], tables=model.emb_l)
    tcfg = TrainConfig(learning_rate=c["lr"], optimizer=c["optimizer"], loss_function=c["loss"])
    parts = RunParts(model=model, loss_fn=make_loss(c["loss"]), optimizer=optimizer,
                     scheduler=make_scheduler(optimizer, tcfg), train_loader=None, test_loader=None, nbatches=STEPS,
                     nbatches_test=0, device=torch.device("cpu"), log=Logger(info), info=info,
                     num_tables=len(c["tables"]))
    data = RandomDataset(RandomDataConfig(dense_dim=c["bottom"][0], table_sizes=c["tables"], batch_size=c["batch"],
                                          num_batches=STEPS, num_indices_per_lookup=c["bag"],
                                          fixed=c.get("fixed", False), round_targets=True, seed=seed),
                         np.random.RandomState(seed), Logger(info).warn)
    states = []
    for j in range(STEPS):
        batch = data[j]
        batch = batch._replace(dense_x=batch.dense_x.to(dtype), labels=batch.labels.to(dtype))
        train_step(parts, tcfg, batch, j)
        states.append({k: v.clone() for k, v in full_state_dict(model, info).items()})
    return states


def train_configs(info: DistInfo, dtype: torch.dtype = torch.float32,
                  sharding: str = "table") -> List[List[Dict[str, torch.Tensor]]]:
    torch.sparse.check_sparse_tensor_invariants.disable()  # the explicit opt-out a run makes (torch warns otherwise)
    return [train_config(c, info, dtype=dtype, sharding=sharding) for c in CONFIGS]


def main(out: str, dtype: str = "float32", sharding: str = "table") -> int:
    torch.manual_seed(0)
    info = init_distributed()
    try:
        results = train_configs(info, getattr(torch, dtype), sharding)
        if info.is_main:
            torch.save(results, out)
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
