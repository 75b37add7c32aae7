"""A small model trained step by step, and its checkpoint payloads, for the checkpoint-chain tests."""
import numpy as np
import torch

from dlrm.data.random import RandomDataConfig, RandomDataset
from dlrm.distributed import DistInfo
from dlrm.model.dlrm import DLRM, ModelConfig, make_loss, top_mlp_input_width
from dlrm.model.fused_embedding import parameters_excluding_fused
from dlrm.run.checkpoint import Position, checkpoint_payload
from dlrm.run.config import TrainConfig
from dlrm.run.train import make_optimizer, make_scheduler
from dlrm.store.tables import StoredTables

SIZES, DIM, BATCH, STEPS = (40, 7, 300, 90), 4, 16, 9
CONFIG = {"model": "tiny", "optimizer": "adagrad"}


def small_run(tmp_path, optimizer, backend="plain", store=False):
    """A model, its optimizer and schedule, and its batches."""
    width = top_mlp_input_width("dot", False, len(SIZES), DIM)
    cfg = ModelConfig(embedding_dim=DIM, table_sizes=SIZES, bottom_mlp=(5, DIM), top_mlp=(width, 3, 1),
                      embedding_backend=backend)
    model = DLRM(cfg, np.random.RandomState(3))
    if store:
        model.emb_l = StoredTables(SIZES, DIM, np.random.RandomState(3), str(tmp_path / "store"), 12 * 64, optimizer)
    params = parameters_excluding_fused(model) if backend == "fused" else list(model.parameters())
    opt = make_optimizer(optimizer, params, 0.1, tables=model.emb_l)
    if backend == "fused":
        model.emb_l.follow_optimizer_lr(opt)
    schedule = make_scheduler(opt, TrainConfig(lr_num_warmup_steps=2, lr_decay_start_step=3, lr_num_decay_steps=4))
    data = RandomDataset(RandomDataConfig(dense_dim=5, table_sizes=SIZES, batch_size=BATCH, num_batches=STEPS,
                                          num_indices_per_lookup=3, round_targets=True, seed=5),
                         np.random.RandomState(5), print)
    return model, opt, schedule, [data[j] for j in range(STEPS)]


def train_step(model, opt, schedule, batch):
    loss = make_loss("bce")(model(batch.dense_x, batch.offsets, batch.indices), batch.labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    schedule.step()


def payload_at(model, opt, name, schedule, step):
    at = Position(nepochs=1, nbatches=STEPS, nbatches_test=0, epoch=0, step=step, train_loss=0.5, test_acc=0.0)
    return checkpoint_payload(model, opt, name, schedule, len(SIZES), DistInfo(), at)


def assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert sorted(a, key=str) == sorted(b, key=str), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
