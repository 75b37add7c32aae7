"""Random data with ``--num-workers``: the batches a torch DataLoader's worker processes draw, made in
this process; and torch's generator moved past the reference's default initialisation."""
import numpy as np
import pytest
import torch
from torch import nn

from dlrm.data.random import BatchLoader, RandomDataConfig, RandomDataset, make_random_data_and_loaders
from dlrm.model.dlrm import skip_reference_torch_init
from helpers.models import tiny_model_config

SEED = 7


class GlobalNumpyBatches(torch.utils.data.Dataset):
    """A plain random data set drawing from NumPy's global generator, sample by sample, as the
    reference's does: batch 0 re-seeds it; each batch is dense, then every table's bags, then targets."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __len__(self):
        return self.cfg.batches

    def __getitem__(self, i):
        cfg = self.cfg
        if i == 0:
            np.random.seed(cfg.seed)
        n = min(cfg.batch_size, cfg.total_samples - i * cfg.batch_size)
        dense = np.random.rand(n, cfg.dense_dim).astype(np.float32)
        offsets, indices = [], []
        for size in cfg.table_sizes:
            starts, values = [], []
            for _ in range(n):
                bag = int(np.round(max(1.0, np.random.random(1)[0] * min(size, cfg.num_indices_per_lookup))))
                starts.append(sum(v.size for v in values))
                values.append(np.unique(np.round(np.random.random(bag) * (size - 1)).astype(np.int64)))
            offsets.append(starts)
            indices.append(np.concatenate(values))
        return dense, np.array(offsets), indices, np.random.rand(n, 1).astype(np.float32)


def _same(ours, plain):
    dense, offsets, indices, targets = plain
    assert np.array_equal(ours.dense_x.numpy(), dense)
    assert np.array_equal(ours.offsets.numpy(), offsets)
    assert all(np.array_equal(a.numpy(), b) for a, b in zip(ours.indices, indices))
    assert np.array_equal(ours.labels.numpy(), targets)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_worker_streams_match_a_torch_dataloader(workers):
    cfg = RandomDataConfig(dense_dim=3, table_sizes=(20, 4, 9), data_size=23, batch_size=3, seed=SEED,
                           num_indices_per_lookup=5)
    plain = torch.utils.data.DataLoader(GlobalNumpyBatches(cfg), batch_size=None, num_workers=workers)
    torch.manual_seed(11)
    expected = [list(plain) for _ in range(2)]  # two epochs: two iterators, two base seeds
    rng = np.random.RandomState(0)
    before = rng.get_state()
    ours = BatchLoader(RandomDataset(cfg, rng), workers)
    torch.manual_seed(11)
    got = [list(ours) for _ in range(2)]
    assert len(got[0]) == len(expected[0]) == 8
    for epoch_got, epoch_expected in zip(got, expected):
        for a, b in zip(epoch_got, epoch_expected):
            _same(a, b)
    if workers >= 2:
        _same(got[1][1], expected[1][1])
        assert not np.array_equal(got[0][1].dense_x.numpy(), got[1][1].dense_x.numpy())  # a new base seed
    after = rng.get_state()
    assert np.array_equal(before[1], after[1]) and before[2:] == after[2:]  # workers leave it alone


def _train_with_a_test_pass(train, test):
    """Batches in the order a run with a test after three training batches meets them, two epochs."""
    seen = []
    for _ in range(2):
        batches = iter(train)
        seen += [next(batches) for _ in range(3)]
        seen += list(test)  # the test loader's own iterator, while the training one is open
        seen += list(batches)
    return seen


def test_a_test_pass_between_training_batches_matches_torch_dataloaders():
    cfg = RandomDataConfig(dense_dim=2, table_sizes=(30, 5), data_size=14, batch_size=2, seed=SEED)
    plain = [torch.utils.data.DataLoader(GlobalNumpyBatches(cfg), batch_size=None, num_workers=2) for _ in "ab"]
    torch.manual_seed(4)
    expected = _train_with_a_test_pass(*plain)
    _, train_ld, _, test_ld = make_random_data_and_loaders(
        RandomDataConfig(**{**cfg.__dict__, "num_workers": 2}), np.random.RandomState(0), lambda _: None)
    torch.manual_seed(4)
    got = _train_with_a_test_pass(train_ld, test_ld)
    assert len(got) == len(expected) == 28
    for a, b in zip(got, expected):
        _same(a, b)


def test_without_workers_the_loader_still_takes_one_torch_draw_per_iterator():
    cfg = RandomDataConfig(dense_dim=2, table_sizes=(5,), data_size=4, batch_size=2)
    torch.manual_seed(3)
    list(torch.utils.data.DataLoader(GlobalNumpyBatches(cfg), batch_size=None))
    expected = torch.randint(0, 1 << 30, (4,))
    torch.manual_seed(3)
    list(BatchLoader(RandomDataset(cfg, np.random.RandomState(0))))
    assert torch.equal(torch.randint(0, 1 << 30, (4,)), expected)


def test_fixing_reference_bugs_makes_the_data_independent_of_workers():
    cfg = RandomDataConfig(dense_dim=2, table_sizes=(50, 3), data_size=9, batch_size=2, seed=5, fix_reference_bugs=True)
    runs = []
    for workers in (0, 2):
        _, train_ld, _, test_ld = make_random_data_and_loaders(
            RandomDataConfig(**{**cfg.__dict__, "num_workers": workers}), np.random.RandomState(5), lambda _: None)
        runs.append([b.dense_x for b in train_ld] + [b.dense_x for b in test_ld])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def _reference_construction(cfg):
    """torch's default initialisation of the reference's model: tables, then bottom and top MLP."""
    for rows in cfg.table_sizes:
        nn.EmbeddingBag(rows, cfg.embedding_dim, mode="sum", sparse=True)
    for widths in (cfg.bottom_mlp, cfg.top_mlp):
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            nn.Linear(n_in, n_out, bias=True)


@pytest.mark.parametrize("chunk", [64, 1 << 20])
@pytest.mark.parametrize("tables", [(4, 3, 2), (8, 50, 1003, 2)])
def test_skipping_torch_init_leaves_torch_where_the_reference_construction_does(chunk, tables):
    # numels 8, 6, 4 take torch's short normal path; 16, 100 and 2006 the filled one, 2006 not a multiple
    # of 16; with a chunk of 64 the larger ones are skipped through uniform draws
    cfg = tiny_model_config(table_sizes=tables, bottom_mlp=(13, 40, 2), top_mlp=(9, 300, 1))
    torch.manual_seed(5)
    _reference_construction(cfg)
    expected = torch.empty((), dtype=torch.int64).random_().item()
    torch.manual_seed(5)
    skip_reference_torch_init(cfg, chunk=chunk)
    assert torch.empty((), dtype=torch.int64).random_().item() == expected


LOSS_LINE = "Finished training it {}/16 of epoch 0, -1.00 ms/it, loss {}"


def test_two_workers_print_the_reference_loss(run_main, tmp_path):
    code, out, err = run_main("--mini-batch-size=4", "--data-size=64", "--print-freq=4", "--num-workers=2",
                              f"--tensor-board-filename={tmp_path / 'tb'}")
    assert code == 0, err
    assert LOSS_LINE.format(4, "0.190378") in out.splitlines()  # the reference's first printed loss
