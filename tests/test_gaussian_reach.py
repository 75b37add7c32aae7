"""Gaussian random data whose clip range reaches past a table: one error line before training, only
when the draws can reach there."""
import numpy as np
import pytest

from dlrm.common import ConfigError
from dlrm.data.random import RandomDataConfig, generate_random_batch

SMALL = ["--mini-batch-size=2", "--data-size=6", "--rand-data-dist=gaussian"]


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
    code, out, err = run_main(*SMALL, *argv, f"--tensor-board-filename={tmp_path / 'tb'}")
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
    code, out, err = run_main(*SMALL, "--rand-data-max=30", "--rand-data-mu=0.5", "--rand-data-sigma=0.1",
                              f"--tensor-board-filename={tmp_path / 'tb'}")
    assert code == 0, err
    assert out.count("Finished training") == 3
