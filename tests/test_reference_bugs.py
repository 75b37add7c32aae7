"""The reference's number-changing bugs are the default; --fix-reference-bugs fixes each of them, and
changes nothing else."""
import re

import numpy as np
import pytest
import torch

from dlrm.common import Batch
from dlrm.model import dlrm as dlrm_model
from dlrm.run import train as dlrm_train
from dlrm.run.checkpoint import load_checkpoint, save_checkpoint
from helpers.models import tiny_model_config

SMALL = ["--mini-batch-size=2", "--data-size=6"]
FIX = "--fix-reference-bugs"


def _lines(out, prefix="Finished training it"):
    return [line for line in out.splitlines() if line.startswith(prefix)]


def _losses(out):
    return [float(x) for x in re.findall(r"^Finished training it .* loss (\d+\.\d+)", out, re.M)]


def test_without_any_reference_bug_in_play_the_flag_changes_nothing(run_main):
    """The README run, and a longer one with bce, Adagrad and several epochs, print the same lines."""
    for argv in (SMALL, ["--mini-batch-size=4", "--data-size=40", "--nepochs=2", "--loss-function=bce",
                         "--optimizer=adagrad", "--arch-embedding-size=30-7-9", "--num-indices-per-lookup=5"]):
        code, plain, err = run_main(*argv)
        assert code == 0, err
        code, fixed, err = run_main(*argv, FIX)
        assert code == 0, err
        assert plain == fixed


def test_random_test_passes_move_the_training_stream_unless_fixed(run_main):
    args = ["--mini-batch-size=2", "--data-size=12", "--round-targets=true"]
    _, no_test, _ = run_main(*args)
    _, tested, _ = run_main(*args, "--test-freq=2")
    _, fixed, _ = run_main(*args, "--test-freq=2", FIX)
    assert _losses(tested)[:2] == _losses(no_test)[:2]  # before the first test pass
    assert _losses(tested)[2:] != _losses(no_test)[2:]  # the pass re-seeded and drew the stream
    assert _losses(fixed) == _losses(no_test)  # its own test stream leaves training alone
    assert len(_lines(fixed, " accuracy")) == len(_lines(tested, " accuracy")) == 3


def test_the_learning_rate_plateau_is_the_last_warmup_rate_unless_fixed(run_main):
    args = SMALL[:1] + ["--data-size=16", "--lr-num-warmup-steps=3", "--lr-decay-start-step=6",
                        "--lr-num-decay-steps=2", "--learning-rate=0.5"]
    _, reference, _ = run_main(*args)
    _, fixed, _ = run_main(*args, FIX)
    a, b = _losses(reference), _losses(fixed)
    assert a[:3] == b[:3]  # steps 1 and 2 warm up identically; step 3 is the first plateau step
    assert a[3] != b[3]  # the loss after it shows the different rate


def test_evaluation_is_limited_by_num_batches_unless_fixed():
    from dlrm.data.random import BatchLoader, RandomDataConfig, RandomDataset

    cfg = RandomDataConfig(dense_dim=4, table_sizes=(4, 3, 2), data_size=10, batch_size=2, round_targets=True)
    seen = []

    class Counting(BatchLoader):
        def __iter__(self):
            for batch in super().__iter__():
                seen.append(batch.labels.shape[0])
                yield batch

    model = dlrm_model.DLRM(tiny_model_config(), np.random.RandomState(0))
    evaluated = []
    model.register_forward_hook(lambda module, args, out: evaluated.append(out.shape[0]))
    parts = dlrm_train.RunParts(model=model, loss_fn=dlrm_model.make_loss("mse"), optimizer=None, scheduler=None,
                                train_loader=None, test_loader=Counting(RandomDataset(cfg, np.random.RandomState(1))),
                                nbatches=2, nbatches_test=5, device=torch.device("cpu"), log=dlrm_train.Logger())
    for cfg_train, fetched, used in ((dlrm_train.TrainConfig(num_batches=2), 3, 2),  # fetches one more, as the reference
                                     (dlrm_train.TrainConfig(num_batches=2, fix_reference_bugs=True), 5, 5),
                                     (dlrm_train.TrainConfig(num_batches=0), 5, 5)):
        seen.clear()
        evaluated.clear()
        dlrm_train.evaluate(parts, cfg_train, dlrm_train.TrainState(), global_step=0)
        assert (len(seen), len(evaluated)) == (fetched, used)


def _accumulation_parts(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return dlrm_train.RunParts(model=model, loss_fn=dlrm_model.make_loss("mse"), optimizer=opt,
                               scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), train_loader=None,
                               test_loader=None, nbatches=2, nbatches_test=0, device=torch.device("cpu"),
                               log=dlrm_train.Logger())


def test_gradient_accumulation_keeps_only_the_stepping_batch_unless_fixed():
    """The reference zeroes the gradients right before the stepping batch's backward: a step with
    --mlperf-grad-accum-iter=2 uses the second batch's gradients alone."""
    dense, labels = torch.rand(4, 4), torch.rand(4, 1)
    offsets, indices = torch.tensor([[0, 1]] * 3), torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0], [1, 0, 1, 0]])
    halves = [Batch(dense[s], offsets, indices[:, s], labels[s]) for s in (slice(0, 2), slice(2, 4))]
    accum = dlrm_train.TrainConfig(grad_accum_iter=2, mlperf_logging=True, learning_rate=0.1)
    reference = dlrm_model.DLRM(tiny_model_config(), np.random.RandomState(1))
    parts = _accumulation_parts(reference)
    dlrm_train.train_step(parts, accum, halves[0], 0)
    dlrm_train.train_step(parts, accum, halves[1], 1)
    second_only = dlrm_model.DLRM(tiny_model_config(), np.random.RandomState(1))
    dlrm_train.train_step(_accumulation_parts(second_only), dlrm_train.TrainConfig(), halves[1], 0)
    for a, b in zip(reference.parameters(), second_only.parameters()):
        assert torch.equal(a.detach(), b.detach())


def test_fixed_gradient_accumulation_equals_one_big_batch():
    """With --fix-reference-bugs two accumulated half batches (each loss scaled by 1/2) step like one
    full batch."""
    cfg = dlrm_train.TrainConfig(grad_accum_iter=2, mlperf_logging=True, learning_rate=0.1, fix_reference_bugs=True)
    # Two half batches sum their gradients in another order than one batch: check the algebra in
    # float64, where reordering sums of 4 terms moves a value by about 4 * 2**-53 of its terms' scale.
    dense, labels = torch.rand(4, 4, dtype=torch.float64), torch.rand(4, 1, dtype=torch.float64)
    offsets, indices = torch.tensor([[0, 1, 2, 3]] * 3), torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0], [1, 0, 1, 0]])
    big = dlrm_model.DLRM(tiny_model_config(), np.random.RandomState(1)).double()
    small = dlrm_model.DLRM(tiny_model_config(), np.random.RandomState(1)).double()
    dlrm_train.train_step(_accumulation_parts(big), dlrm_train.TrainConfig(), Batch(dense, offsets, indices, labels), 0)
    parts = _accumulation_parts(small)
    halves = [Batch(dense[s], offsets[:, :2], indices[:, s], labels[s]) for s in (slice(0, 2), slice(2, 4))]
    dlrm_train.train_step(parts, cfg, halves[0], 0)
    untouched = dlrm_model.DLRM(tiny_model_config(), np.random.RandomState(1)).double()
    assert all(torch.equal(a, b) for a, b in zip(small.bot_l.parameters(), untouched.bot_l.parameters()))
    dlrm_train.train_step(parts, cfg, halves[1], 1)
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)


def test_resuming_from_the_first_epoch_skips_its_batches_in_every_epoch_unless_fixed(run_main, tmp_path):
    """The reference skips the saved batch count in every later epoch too."""
    path = str(tmp_path / "m.pt")
    args = ["--mini-batch-size=2", "--data-size=12", "--round-targets=true", "--loss-function=bce"]
    code, _, err = run_main(*args, "--test-freq=6", f"--save-model={path}")
    assert code == 0, err
    payload = load_checkpoint(path)
    payload["epoch"], payload["iter"] = 0, 4  # taken after batch 4 of the first epoch
    save_checkpoint(path, payload)
    code, reference, err = run_main(*args, "--nepochs=2", f"--load-model={path}")
    assert code == 0, err
    code, fixed, err = run_main(*args, "--nepochs=2", f"--load-model={path}", FIX)
    assert code == 0, err
    steps = [line.split(",")[0] for line in _lines(reference)]
    assert steps == [f"Finished training it {j}/6 of epoch {k}" for k in (0, 1) for j in (5, 6)]
    steps = [line.split(",")[0] for line in _lines(fixed)]
    assert steps == ([f"Finished training it {j}/6 of epoch 0" for j in (5, 6)]
                     + [f"Finished training it {j}/6 of epoch 1" for j in range(1, 7)])


@pytest.mark.parametrize("fix", [False, True])
def test_debug_mode_parameter_groups(run_main, fix):
    """Without learned pooling weights, the reference's three debug-mode groups train exactly like
    one group: the flag changes nothing there."""
    args = SMALL + ["--debug-mode"] + ([FIX] if fix else [])
    code, out, err = run_main(*args)
    assert code == 0, err
    assert _losses(out) == [0.018993, 0.029700, 0.049903]


# --- checkpoints and resuming ---------------------------------------------------------------------

POLICY = ["--mini-batch-size=8", "--data-size=64", "--nepochs=4", "--test-freq=4", "--loss-function=bce",
          "--round-targets=true", "--learning-rate=0.3", "--arch-mlp-top=8-4-1", "--numpy-rand-seed=3"]


def _tests(out, metric=r" accuracy (\d+\.\d+) %"):
    """[(epoch, iter, value, saved)] for every test the run printed, in order."""
    tests = []
    for line in out.splitlines():
        at = re.match(r"Testing at - (\d+)/\d+ of epoch (\d+),", line)
        value = re.search(metric, line)
        if at:
            tests.append([int(at.group(2)), int(at.group(1)), None, False])
        elif value and tests and tests[-1][2] is None:
            tests[-1][2] = float(value.group(1))
        elif line.startswith("Saving model to"):
            tests[-1][3] = True
    return [tuple(t) for t in tests]


def _plain_saves(values, start, fix):
    """Where each policy writes: the reference beats the value it started from at every test; the fix
    beats the best so far."""
    saves, best = [], start
    for value in values:
        saves.append(value > best)
        best = max(best, value) if fix else best
    return saves


@pytest.mark.parametrize("fix", [False, True])
def test_checkpoints_are_written_at_every_test_beating_the_start_unless_fixed(run_main, tmp_path, fix):
    path = tmp_path / "m.pt"
    code, out, err = run_main(*POLICY, f"--save-model={path}", f"--tensor-board-filename={tmp_path / 'tb'}",
                              *([FIX] if fix else []))
    assert code == 0, err
    tests = _tests(out)
    values = [t[2] for t in tests]
    assert _plain_saves(values, 0.0, False) != _plain_saves(values, 0.0, True)  # the run tells them apart
    assert [t[3] for t in tests] == _plain_saves(values, 0.0, fix)
    last = [t for t in tests if t[3]][-1]
    payload = load_checkpoint(str(path))  # what a later --load-model loads
    assert (payload["epoch"], payload["iter"]) == last[:2]
    assert f"{payload['test_acc'] * 100:3.3f}" == f"{last[2]:3.3f}"


@pytest.mark.parametrize("fix", [False, True])
def test_a_resumed_run_compares_its_tests_with_the_loaded_accuracy(run_main, tmp_path, fix):
    """After --load-model the reference's starting best is the checkpoint's accuracy."""
    path = tmp_path / "m.pt"
    common = POLICY[:2] + ["--nepochs=2"] + POLICY[3:] + [f"--tensor-board-filename={tmp_path / 'tb'}"]
    flag = [FIX] if fix else []
    code, _, err = run_main(*common, "--nepochs=1", f"--save-model={path}", *flag)
    assert code == 0, err
    payload = load_checkpoint(str(path))
    payload.update(epoch=0, iter=0, test_acc=0.0)
    save_checkpoint(str(path), payload)
    code, out, err = run_main(*common, f"--load-model={path}", f"--save-model={tmp_path / 'again.pt'}", *flag)
    assert code == 0, err
    values = [t[2] for t in _tests(out)]
    start = sorted(values)[len(values) // 2] / 100  # a loaded accuracy some tests beat and some do not
    payload["test_acc"] = start
    save_checkpoint(str(path), payload)
    code, out, err = run_main(*common, f"--load-model={path}", f"--save-model={tmp_path / 'again.pt'}", *flag)
    assert code == 0, err
    tests = _tests(out)
    assert [t[2] for t in tests] == values
    assert [t[3] for t in tests] == _plain_saves([v / 100 for v in values], start, fix)
    assert any(t[3] for t in tests) and not all(t[3] for t in tests)


def test_under_mlperf_the_reference_saves_whatever_auc_it_loaded_unless_fixed(run_main, tmp_path, monkeypatch):
    """The reference restores the best accuracy only: its AUC baseline stays 0."""
    from dlrm.outputs import mlperf_logger
    from dlrm.run import benchmark

    real = mlperf_logger.make_mlperf_logger  # its log in tmp_path, not beside the module
    monkeypatch.setattr(benchmark, "make_mlperf_logger",
                        lambda enabled, log_file=None: real(enabled, log_file=str(tmp_path / "dlrm.log")))
    path = tmp_path / "m.pt"
    common = POLICY + ["--nepochs=1", "--mlperf-logging", f"--tensor-board-filename={tmp_path / 'tb'}"]
    code, out, err = run_main(*common, f"--save-model={path}")
    assert code == 0, err
    assert all(t[3] for t in _tests(out, r"auc (\d+\.\d+), best auc"))
    payload = load_checkpoint(str(path))
    payload.update(epoch=0, iter=0, test_auc=1.0)
    save_checkpoint(str(path), payload)
    for flag, saved in (([], True), ([FIX], False)):
        code, out, err = run_main(*common, f"--load-model={path}", f"--save-model={tmp_path / 'again.pt'}", *flag)
        assert code == 0, err
        tests = _tests(out, r"auc (\d+\.\d+), best auc")
        assert len(tests) == 2 and all(t[3] == saved for t in tests)


def _lrs(metrics_path):
    import json

    with open(metrics_path, encoding="utf-8") as handle:
        return [r["lr"] for r in map(json.loads, handle) if r["lr"] is not None]


def test_resuming_restarts_the_learning_rate_schedule_unless_fixed(run_main, tmp_path):
    """Warmup over W=4 steps from base 0.4: step s runs at 0.4 * min(s, 4) / 4. Saved after two steps;
    the first resumed step runs at the saved optimizer's rate (step 3's); then the reference's new
    schedule goes on from its step 2, and the fixed run from step 4."""
    path, base = tmp_path / "m.pt", 0.4
    args = ["--mini-batch-size=2", "--data-size=12", "--round-targets=true", "--loss-function=bce",
            f"--learning-rate={base}", "--lr-num-warmup-steps=4", f"--tensor-board-filename={tmp_path / 'tb'}"]
    code, _, err = run_main(*args, "--num-batches=2", f"--save-model={path}")  # saved at the end: batch 2
    assert code == 0, err
    assert load_checkpoint(str(path))["iter"] == 2
    rate = [None] + [base * min(s, 4) / 4 for s in range(1, 9)]
    for flag, steps in (([], [3, 2, 3, 4]), ([FIX], [3, 4, 5, 6])):
        metrics = tmp_path / "metrics.jsonl"
        code, _, err = run_main(*args, f"--load-model={path}", f"--metrics-file={metrics}", *flag)
        assert code == 0, err
        assert _lrs(metrics) == pytest.approx([rate[s] for s in steps], rel=1e-12)


def _row_wise_checkpoint(run_main, tmp_path, args, accumulator):
    """A first-epoch checkpoint of a row-wise Adagrad run, its position moved to the start and every
    accumulator set to ``accumulator``."""
    path = tmp_path / f"acc{accumulator}.pt"
    code, _, err = run_main(*args, f"--save-model={path}")
    assert code == 0, err
    payload = load_checkpoint(str(path))
    for entry in payload["opt_state_dict"]["state"].values():
        for key in ("momentum", "sum"):
            if key in entry:
                entry[key] = torch.full_like(entry[key], accumulator)
    payload.update(epoch=0, iter=0)
    save_checkpoint(str(path), payload)
    return path


def test_resumed_row_wise_adagrad_drops_the_loaded_accumulators_unless_fixed(run_main, tmp_path):
    """The reference's optimizer makes its accumulators at its first step, over the loaded ones:
    a loaded accumulator of 5 trains like one of 0 (the initial value), unless fixed."""
    args = SMALL + ["--optimizer=rwsadagrad", "--learning-rate=0.5", f"--tensor-board-filename={tmp_path / 'tb'}"]
    large, zero = (_row_wise_checkpoint(run_main, tmp_path, args, value) for value in (5.0, 0.0))
    assert "momentum" in load_checkpoint(str(large))["opt_state_dict"]["state"][0]  # the reference's key
    losses = {}
    for flag in ([], [FIX]):
        for path in (large, zero):
            code, out, err = run_main(*args, f"--load-model={path}", *flag)
            assert code == 0, err
            losses[bool(flag), path] = _losses(out)
    assert losses[False, large] == losses[False, zero] == losses[True, zero]
    assert losses[True, large][1:] != losses[True, zero][1:]  # the first loss is before any step


def test_a_position_beyond_this_data_set_is_refused_when_fixed(run_main, tmp_path):
    """The fix skips the saved batches in the saved epoch only: the run would lose that epoch silently."""
    path = tmp_path / "m.pt"
    args = ["--mini-batch-size=2", "--round-targets=true", "--loss-function=bce", "--nepochs=2",
            f"--tensor-board-filename={tmp_path / 'tb'}"]
    code, _, err = run_main(*args, "--data-size=20", "--test-freq=10", f"--save-model={path}")
    assert code == 0, err
    payload = load_checkpoint(str(path))
    payload.update(epoch=0, iter=5)
    save_checkpoint(str(path), payload)
    code, out, err = run_main(*args, "--data-size=6", f"--load-model={path}")  # 3 batches
    assert code == 0 and "nothing will be trained" in err and "Finished training" not in out
    code, _, err = run_main(*args, "--data-size=6", f"--load-model={path}", FIX)
    assert code == 2 and "saved after batch 5 of 10, but this run has 3 batches per epoch" in err
