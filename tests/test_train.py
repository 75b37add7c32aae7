"""The training loop (dlrm/run/train.py): MLPerf metrics and early stop, the optimizers, bf16 mixed
precision and the debug mode's parameter groups."""
import re

import numpy as np
import pytest
import torch

from dlrm.model import dlrm as dlrm_model
from dlrm.run import benchmark
from dlrm.run import train as dlrm_train
from helpers.models import tiny_model_config
from helpers.runs import SMALL


def test_mlperf_metrics_line_and_early_stop_end_the_run(run_main):
    """The threshold stops the whole run, not just the batch loop (the reference's never fired)."""
    code, out, err = run_main("--mini-batch-size=8", "--data-size=64", "--test-freq=4", "--loss-function=bce",
                              "--round-targets=true", "--mlperf-logging", "--mlperf-acc-threshold=0.48", "--nepochs=3")
    assert code == 0, err
    assert re.search(r"^recall \d\.\d{4}, precision \d\.\d{4}, f1 \d\.\d{4}, ap \d\.\d{4}, auc \d\.\d{4}, "
                     r"best auc \d\.\d{4}, accuracy \d+\.\d{3} %, best accuracy \d+\.\d{3} %$", out, re.M)
    assert "threshold 0.480000 reached, stop training" in out
    ours = [line for line in out.splitlines() if not line.startswith(":::MLLOG")]  # events, if installed
    assert ours[-1].endswith("stop training")
    assert "of epoch 1" not in out


def test_sklearn_metrics_match_a_plain_computation():
    scores = np.array([0.1, 0.8, 0.6, 0.3, 0.9])
    targets = np.array([0.0, 1.0, 0.0, 0.0, 1.0])
    m = dlrm_train.sklearn_metrics(scores, targets)
    assert m["accuracy"] == pytest.approx(4 / 5) and m["recall"] == 1.0 and m["precision"] == pytest.approx(2 / 3)
    # AUC: fraction of (positive, negative) pairs ranked correctly = 6 / 6
    assert m["roc_auc"] == 1.0


@pytest.mark.parametrize("optimizer", ["adagrad", "rwsadagrad"])
def test_other_optimizers_train(run_main, optimizer):
    code, out, err = run_main(*SMALL, f"--optimizer={optimizer}")
    assert code == 0, err
    assert out.count("Finished training it") == 3
    assert "loss 0.025266" in out  # the first loss is computed before any step


def test_bf16_mixed_precision_is_close_and_keeps_float32_parameters(run_main):
    code, exact, err = run_main(*SMALL)
    assert code == 0, err
    code, mixed, err = run_main(*SMALL, "--mixed-precision=bf16")
    assert code == 0, err
    losses = [[float(x) for x in re.findall(r"loss (\d\.\d+)", out)] for out in (exact, mixed)]
    assert len(losses[1]) == 3 and losses[0] != losses[1]  # it does change the numbers ...
    assert np.allclose(losses[0], losses[1], atol=5e-3)  # ... but only by bf16 rounding
    model = dlrm_model.DLRM(tiny_model_config(), np.random.RandomState(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the loop wraps the forward in
        out = model(torch.rand(2, 4), torch.tensor([[0, 1]] * 3), torch.tensor([[0, 1]] * 3))
    assert out.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())


def _debug_model(run_main, monkeypatch, *extra):
    """The model of a --debug-mode run with learned pooling weights, after training."""
    built = []

    class Recorded(dlrm_model.DLRM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(benchmark, "DLRM", Recorded)
    code, _, err = run_main(*SMALL, "--debug-mode", "--weighted-pooling=learned", *extra)
    assert code == 0, err
    return built[0]


def test_debug_mode_leaves_learned_pooling_weights_untrained_as_the_reference(run_main, monkeypatch):
    """The reference's debug mode builds three parameter groups (tables, bottom, top MLP) that
    leave the learned pooling weights out of the optimizer."""
    model = _debug_model(run_main, monkeypatch)
    assert all(torch.equal(w, torch.ones_like(w)) for w in model.v_W_l)
    assert not torch.equal(model.bot_l[0].bias, dlrm_model.DLRM(model.cfg, np.random.RandomState(0)).bot_l[0].bias)


def test_fixed_debug_mode_trains_learned_pooling_weights(run_main, monkeypatch):
    model = _debug_model(run_main, monkeypatch, "--fix-reference-bugs")
    assert any(not torch.equal(w, torch.ones_like(w)) for w in model.v_W_l)  # they moved
