"""Random data: the vectorised generator against a plain per-sample implementation of the reference's
draws, the test batches' stream, and Gaussian clip ranges that reach past a table."""
import numpy as np
import pytest
import torch

from dlrm.common import ConfigError
from dlrm.data.random import (RandomDataConfig, RandomDataset, generate_random_batch,
                               make_random_data_and_loaders)
from helpers.rng import same_state


def plain_batch(rng, n, cfg):
    """The reference's draws written out sample by sample: dense rand(n, M); per table, per sample,
    the bag size random(1) (unless fixed) and the bag's draws; then targets rand(n, 1). Uniform
    indices are unique(round(r * (rows - 1))); gaussian ones unique(clip(normal)) truncated to int
    (so a bag can repeat an index), or with --fix-reference-bugs truncated first, then unique."""
    dense = rng.rand(n, cfg.dense_dim).astype(np.float32)
    offsets, indices = [], []
    mu = (cfg.rand_min + cfg.rand_max) / 2 if cfg.rand_mu == -1 else cfg.rand_mu
    for size in cfg.table_sizes:
        table_offsets, table_indices, count = [], [], 0
        for _ in range(n):
            if cfg.fixed:
                bag = cfg.num_indices_per_lookup
            else:
                r = rng.random(1)
                bag = int(np.round(max(1.0, r[0] * min(size, cfg.num_indices_per_lookup))))
            if cfg.distribution == "uniform":
                r = rng.random(bag)
                values = np.unique(np.round(r * (size - 1)).astype(np.int64))
            else:
                r = rng.normal(mu, cfg.rand_sigma, bag)
                clipped = np.clip(r, cfg.rand_min, cfg.rand_max)
                if cfg.fix_reference_bugs:
                    values = np.unique(clipped.astype(np.int64))
                else:
                    values = np.unique(clipped).astype(np.int64)
            table_offsets.append(count)
            count += values.size
            table_indices.append(values)
        offsets.append(table_offsets)
        indices.append(np.concatenate(table_indices))
    targets = rng.rand(n, 1).astype(np.float32)
    if cfg.round_targets:
        targets = np.round(targets)
    return dense, np.array(offsets, dtype=np.int64), indices, targets


CASES = [
    dict(dense_dim=4, table_sizes=(4, 3, 2), num_indices_per_lookup=10),
    dict(dense_dim=3, table_sizes=(1000, 5, 1, 77), num_indices_per_lookup=7),
    dict(dense_dim=3, table_sizes=(1000, 5, 77), num_indices_per_lookup=7, fixed=True),
    dict(dense_dim=13, table_sizes=(1460, 1, 10131227, 3), num_indices_per_lookup=1, fixed=True, round_targets=True),
    dict(dense_dim=5, table_sizes=(100000, 20), num_indices_per_lookup=100, round_targets=True),
    dict(dense_dim=2, table_sizes=(50, 60), num_indices_per_lookup=4, distribution="gaussian",
         rand_min=0, rand_max=49, rand_sigma=10),
    dict(dense_dim=2, table_sizes=(50, 6), num_indices_per_lookup=4, fixed=True, distribution="gaussian",
         rand_min=0, rand_max=5, rand_sigma=3),
    dict(dense_dim=2, table_sizes=(50, 60), num_indices_per_lookup=4, distribution="gaussian",
         rand_min=0, rand_max=49, rand_sigma=10, fix_reference_bugs=True),
    dict(dense_dim=2, table_sizes=(50, 6), num_indices_per_lookup=9, fixed=True, distribution="gaussian",
         rand_min=0, rand_max=5, rand_sigma=3, fix_reference_bugs=True),
    dict(dense_dim=3, table_sizes=(20,), num_indices_per_lookup=6, distribution="gaussian"),  # the defaults
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n", [1, 2, 37])
def test_fast_generator_equals_plain_one(case, n):
    cfg = RandomDataConfig(**case)
    fast_rng, plain_rng = np.random.RandomState(11), np.random.RandomState(11)
    for _ in range(3):  # consecutive batches continue the stream identically
        batch = generate_random_batch(fast_rng, n, cfg)
        dense, offsets, indices, targets = plain_batch(plain_rng, n, cfg)
        assert np.array_equal(batch.dense_x.numpy(), dense)
        assert np.array_equal(batch.offsets.numpy(), offsets)
        assert len(batch.indices) == len(indices)
        for fast, plain in zip(batch.indices, indices):
            assert fast.dtype == torch.int64 and np.array_equal(fast.numpy(), plain)
        assert np.array_equal(batch.labels.numpy(), targets)
        assert same_state(fast_rng, plain_rng)


def test_large_batches_computed_on_two_threads_equal_the_plain_draws():
    """Enough draws that the tables are computed on a thread pool: the values do not change."""
    from dlrm.data import random as dlrm_data_pytorch

    cfg = RandomDataConfig(dense_dim=2, table_sizes=(100000, 3000, 7), num_indices_per_lookup=100)
    n = 800
    assert n * 50 * 2 > dlrm_data_pytorch._POOL_MIN_DRAWS  # about 50 draws a bag on the two big tables
    fast_rng, plain_rng = np.random.RandomState(5), np.random.RandomState(5)
    batch = generate_random_batch(fast_rng, n, cfg)
    dense, offsets, indices, targets = plain_batch(plain_rng, n, cfg)
    assert np.array_equal(batch.offsets.numpy(), offsets) and np.array_equal(batch.labels.numpy(), targets)
    assert all(np.array_equal(f.numpy(), p) for f, p in zip(batch.indices, indices))
    assert same_state(fast_rng, plain_rng)


def _bags(batch, t=0):
    ends = list(batch.offsets[t, 1:].tolist()) + [len(batch.indices[t])]
    return [batch.indices[t][start:end] for start, end in zip(batch.offsets[t].tolist(), ends)]


def test_gaussian_bags_repeat_indices_as_the_reference_does():
    """The reference deduplicates the clipped floats before truncating them, so a bag can repeat an
    index; the default keeps that (the plain implementation above checks the exact values)."""
    cfg = RandomDataConfig(dense_dim=1, table_sizes=(10,), num_indices_per_lookup=50, fixed=True,
                           distribution="gaussian", rand_min=0, rand_max=9, rand_sigma=3)
    bags = _bags(generate_random_batch(np.random.RandomState(0), 8, cfg))
    assert any(len(bag.unique()) < len(bag) for bag in bags)
    assert all(torch.equal(bag, bag.sort().values) for bag in bags)


def test_fixed_gaussian_bags_hold_no_duplicate_indices():
    cfg = RandomDataConfig(dense_dim=1, table_sizes=(10,), num_indices_per_lookup=50, fixed=True,
                           distribution="gaussian", rand_min=0, rand_max=9, rand_sigma=3, fix_reference_bugs=True)
    for bag in _bags(generate_random_batch(np.random.RandomState(0), 8, cfg)):
        assert len(bag.unique()) == len(bag)


def test_dataset_sizes_and_last_partial_batch():
    cfg = RandomDataConfig(dense_dim=2, table_sizes=(5,), data_size=7, batch_size=3)
    data = RandomDataset(cfg, np.random.RandomState(1))
    assert len(data) == 3
    assert [data[i].dense_x.shape[0] for i in range(3)] == [3, 3, 1]
    cfg = RandomDataConfig(dense_dim=2, table_sizes=(5,), data_size=7, batch_size=3, num_batches=4)
    assert len(RandomDataset(cfg, np.random.RandomState(1))) == 4  # num_batches redefines the size


def test_batch_zero_reseeds_so_every_epoch_sees_the_same_data():
    cfg = RandomDataConfig(dense_dim=2, table_sizes=(5, 9), data_size=6, batch_size=2, seed=5)
    data = RandomDataset(cfg, np.random.RandomState(99))
    first = [data[i] for i in range(3)]
    second = [data[i] for i in range(3)]
    for a, b in zip(first, second):
        assert torch.equal(a.dense_x, b.dense_x) and torch.equal(a.labels, b.labels)
    plain = np.random.RandomState(5)
    dense, _, _, _ = plain_batch(plain, 2, cfg)
    assert np.array_equal(first[0].dense_x.numpy(), dense)


def test_test_batches_are_the_training_batches_and_move_the_stream():
    """As in the reference: a test pass re-seeds the training stream at test batch 0 and draws the
    training batches again, so the training batches after it continue from the end of the pass."""
    cfg = RandomDataConfig(dense_dim=3, table_sizes=(50, 4, 9), data_size=10, batch_size=4, seed=5,
                           num_indices_per_lookup=5)
    rng = np.random.RandomState(77)  # the run's stream: already used by the model's draws
    _, train_ld, _, test_ld = make_random_data_and_loaders(cfg, rng, lambda _: None)
    it = iter(train_ld)
    got = [next(it), next(it)]  # training batches 0 and 1
    tests = list(test_ld)  # a test pass
    got.append(next(it))  # training batch 2, after the pass

    plain = np.random.RandomState(0)
    plain.seed(5)  # training batch 0 re-seeds
    expected = [plain_batch(plain, 4, cfg), plain_batch(plain, 4, cfg)]
    plain.seed(5)  # so does test batch 0
    expected_tests = [plain_batch(plain, n, cfg) for n in (4, 4, 2)]
    expected.append(plain_batch(plain, 2, cfg))  # batch 2 holds the last 2 samples
    for batch, (dense, offsets, indices, targets) in zip(got + tests, expected + expected_tests):
        assert np.array_equal(batch.dense_x.numpy(), dense) and np.array_equal(batch.labels.numpy(), targets)
        assert np.array_equal(batch.offsets.numpy(), offsets)
        assert all(np.array_equal(a.numpy(), b) for a, b in zip(batch.indices, indices))
    assert same_state(rng, plain)


def test_fixed_test_set_is_not_the_training_set_and_does_not_shift_it():
    """With --fix-reference-bugs the test set has its own stream (seed + 1)."""
    cfg = RandomDataConfig(dense_dim=2, table_sizes=(50,), data_size=4, batch_size=2, seed=5, fix_reference_bugs=True)
    rng = np.random.RandomState(5)
    _, train_ld, _, test_ld = make_random_data_and_loaders(cfg, rng, lambda _: None)
    train0 = next(iter(train_ld))
    test0 = next(iter(test_ld))
    assert not torch.equal(train0.dense_x, test0.dense_x)
    it = iter(train_ld)
    a = next(it)
    list(test_ld)  # a test pass in between
    b = next(it)
    it2 = iter(train_ld)
    next(it2)
    c = next(it2)
    assert torch.equal(a.dense_x, train0.dense_x) and torch.equal(b.dense_x, c.dense_x)


# --- Gaussian data whose clip range reaches past a table: one error line before training, only when the
# draws can reach there.

GAUSSIAN = ["--mini-batch-size=2", "--data-size=6", "--rand-data-dist=gaussian"]


def _config(distribution="gaussian", **flags):
    return RandomDataConfig(dense_dim=4, table_sizes=(4, 3, 2), data_size=6, batch_size=2,
                            distribution=distribution, **flags)


def _plain_indices(cfg, draws=20000, seed=0):
    """What the reference's gaussian bags can hold: normal draws clipped to [min, max], truncated."""
    mu = (cfg.rand_min + cfg.rand_max) / 2 if cfg.rand_mu == -1 else cfg.rand_mu
    values = np.random.RandomState(seed).normal(mu, cfg.rand_sigma, draws)
    return np.clip(values, cfg.rand_min, cfg.rand_max).astype(np.int64)


@pytest.mark.parametrize("argv, message", [
    (["--rand-data-max=2"], "--rand-data-max=2 lets gaussian indices reach 2, but table 2 has 2 rows"),
    (["--rand-data-max=7.5", "--arch-embedding-size=9-7"], "reach 7, but table 1 has 7 rows"),
    (["--rand-data-min=-1"], "--rand-data-min=-1 lets gaussian indices reach -1"),
])
def test_a_clip_range_past_a_table_is_one_error_before_training(run_main, tmp_path, argv, message):
    code, out, err = run_main(*GAUSSIAN, *argv, f"--tensor-board-filename={tmp_path / 'tb'}")
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert "Finished training" not in out


@pytest.mark.parametrize("flags", [dict(rand_max=2), dict(rand_min=-1), dict(rand_max=3, rand_sigma=0.2)])
def test_refused_ranges_are_reached_by_the_plain_draws(flags):
    with pytest.raises(ConfigError, match="lets gaussian indices reach"):
        _config(**flags)
    cfg = _config(distribution="uniform", **flags)  # the same range, which uniform draws do not use
    indices = _plain_indices(cfg)
    assert indices.max() >= min(cfg.table_sizes) or indices.min() < 0


@pytest.mark.parametrize("flags", [
    dict(rand_max=1.9), dict(rand_min=-0.9),  # truncation keeps these in the table
    dict(rand_max=30, rand_mu=0.5, rand_sigma=0.1),  # 15 sigmas to the first row outside: never drawn
])
def test_ranges_the_draws_cannot_leave_are_accepted_and_stay_in_the_tables(flags):
    cfg = _config(**flags)  # the config checks itself
    rng = np.random.RandomState(1)
    for _ in range(50):
        batch = generate_random_batch(rng, 64, cfg)
        for rows, indices in zip(cfg.table_sizes, batch.indices):
            assert 0 <= int(indices.min()) and int(indices.max()) < rows


def test_a_narrow_gaussian_with_a_wide_clip_range_trains(run_main, tmp_path):
    code, out, err = run_main(*GAUSSIAN, "--rand-data-max=30", "--rand-data-mu=0.5", "--rand-data-sigma=0.1",
                              f"--tensor-board-filename={tmp_path / 'tb'}")
    assert code == 0, err
    assert out.count("Finished training") == 3


# --- zipf ids (not in the reference) -------------------------------------------------------------


def _zipf_probabilities(rows: int, s: float, first: int) -> np.ndarray:
    """P(row = j) for j < first under the power law of exponent s over ranks 1..rows + 1 (the
    continuous inverse CDF floored): (F(j + 2) - F(j + 1)) with F(x) = (x^(1-s) - 1) / ((rows + 1)^(1-s) - 1)."""
    j = np.arange(first, dtype=np.float64)
    if s == 1.0:  # F(x) = log(x) / log(rows + 1)
        return (np.log(j + 2) - np.log(j + 1)) / np.log(rows + 1.0)
    top = (rows + 1.0) ** (1 - s) - 1
    return ((j + 2) ** (1 - s) - (j + 1) ** (1 - s)) / top


@pytest.mark.parametrize("s", [0.8, 1.0, 1.05, 1.5])
def test_zipf_ids_follow_the_power_law(s):
    rows, n = 1000, 200_000
    cfg = RandomDataConfig(dense_dim=1, table_sizes=(rows,), num_indices_per_lookup=1, fixed=True,
                           distribution="zipf", zipf_exponent=s)
    ids = generate_random_batch(np.random.RandomState(3), n, cfg).indices[0].numpy()
    assert ids.min() >= 0 and ids.max() < rows
    counts = np.bincount(ids, minlength=rows)[:5]
    p = _zipf_probabilities(rows, s, 5)
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < 5 * sigma), (counts, n * p)  # binomial: 5 sigma, fixed seed
    assert counts[0] > counts[1] > counts[4]


def test_zipf_ids_come_from_the_uniform_draws():
    """The dense features and labels are the same numbers as uniform's: the same draws, only the
    rows they map to differ."""
    args = dict(dense_dim=3, table_sizes=(50, 7, 2000), num_indices_per_lookup=4)
    uniform = generate_random_batch(np.random.RandomState(5), 64, RandomDataConfig(**args))
    zipf = generate_random_batch(np.random.RandomState(5), 64, RandomDataConfig(**args, distribution="zipf"))
    assert torch.equal(uniform.dense_x, zipf.dense_x) and torch.equal(uniform.labels, zipf.labels)
    assert not all(torch.equal(a, b) for a, b in zip(uniform.indices, zipf.indices))


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_zipf_exponent_that_is_not_positive_is_refused(run_main, value):
    code, out, err = run_main("--mini-batch-size=2", "--data-size=4", "--rand-data-dist=zipf",
                              f"--rand-data-zipf-exponent={value}")
    assert code == 2 and err.strip().splitlines() == [f"error: --rand-data-zipf-exponent must be positive, got {value}"]
