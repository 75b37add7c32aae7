"""Run-level features: MLPerf metrics and early stop, profiling, schedules, accumulation,
synthetic data, the trace tool, inference-only and ONNX export."""
import builtins
import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from dlrm.model import dlrm as dlrm_model
from dlrm.run import benchmark
from dlrm.run import train as dlrm_train
from helpers.models import tiny_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--mini-batch-size=2", "--data-size=6"]


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


def test_profiling_writes_trace_and_tables(run_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(*SMALL, "--enable-profiling")
    assert code == 0, err
    assert len(glob.glob("dlrm_s_pytorch*.json")) == 1
    shape, = glob.glob("dlrm_s_pytorch*_shape.prof")
    total, = glob.glob("dlrm_s_pytorch*_total.prof")
    assert "DLRM forward" in open(total).read() and "Input Shapes" in open(shape).read()


def test_decay_without_warmup_runs(run_main):
    """The reference crashed with decay and no warmup."""
    code, out, err = run_main(*SMALL, "--lr-num-decay-steps=2", "--lr-decay-start-step=2")
    assert code == 0, err
    assert out.count("Finished training it") == 3


def test_synthetic_data_from_the_command_line(run_main, tmp_path):
    """--data-generation=synthetic is reachable (not in the reference)."""
    for t in range(3):
        (tmp_path / f"dist_emb_{t}.log").write_text("1, 2, 3, 4, 5, 6\n0, 1, 3, 4, 5\n0.55, 0.64, 0.82, 0.91, 1.0\n")
    code, out, err = run_main(*SMALL, "--data-generation=synthetic",
                              f"--data-trace-file={tmp_path}/dist_emb_j.log")
    assert code == 0, err
    assert out.count("Finished training it") == 3


def test_missing_trace_file_is_one_line_error(run_main, tmp_path):
    code, _, err = run_main(*SMALL, "--data-generation=synthetic", f"--data-trace-file={tmp_path}/none_j.log")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.slow
def test_trace_tool_runs_as_a_script(tmp_path):
    trace = tmp_path / "trace.log"
    trace.write_text("1, 2, 3, 4, 5, 3, 4, 1, 1, 6, 3\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dlrm_data_pytorch.py"), f"--trace-file={trace}",
                           f"--dist-file={tmp_path}/dist.log", f"--synthetic-file={tmp_path}/syn.log",
                           "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "dist.log").read_text().splitlines()[1] == "0, 1, 3, 4, 5"
    assert len((tmp_path / "syn.log").read_text().split(", ")) == 11


def test_inference_only_without_checkpoint_evaluates_once(run_main):
    code, out, err = run_main(*SMALL, "--inference-only")
    assert code == 0, err
    assert "Testing for inference only" in out and " accuracy " in out and "Finished training" not in out


def test_missing_onnx_is_reported_before_training(run_main, monkeypatch):
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx":
            raise ImportError("no onnx")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    code, out, err = run_main(*SMALL, "--save-onnx")
    assert code == 2 and "pip install onnx" in err and "Finished" not in out


@pytest.mark.parametrize("generation", ["random"])
def test_onnx_export_matches_pytorch(run_main, tmp_path, monkeypatch, generation):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(*SMALL, "--save-onnx")
    assert code == 0, err
    assert "checked with onnxruntime" in out and (tmp_path / "dlrm_s_pytorch.onnx").exists()


def test_mlperf_events_are_written_when_the_package_is_installed(run_main, tmp_path):
    pytest.importorskip("mlperf_logging")
    log_file, earlier = tmp_path / "dlrm.log", tmp_path / "earlier.log"
    args = ("--mini-batch-size=8", "--data-size=64", "--test-freq=4", "--loss-function=bce", "--round-targets=true",
            "--mlperf-logging", "--mlperf-auc-threshold=0.5")
    assert run_main(*args, f"--mlperf-log-file={earlier}")[0] == 0
    size = earlier.stat().st_size
    code, out, err = run_main(*args, f"--mlperf-log-file={log_file}")
    assert code == 0, err
    assert earlier.stat().st_size == size  # a second run in one process writes to its own file only
    assert ":::MLLOG" in out  # the events go to standard output too, as in the reference
    keys = re.findall(r'"key": "(\w+)"', log_file.read_text())
    for key in ("cache_clear", "init_start", "init_stop", "run_start", "submission_benchmark", "seed",
                "global_batch_size", "block_start", "epoch_start", "eval_start", "eval_stop", "run_stop"):
        assert key in keys
    assert keys.index("init_start") < keys.index("run_start") < keys.index("epoch_start") < keys.index("eval_stop")
    assert "command line args: {" in out


def test_tensorboard_scalars(run_main, monkeypatch):
    written = []

    class Recorder:
        def add_scalar(self, tag, value, step):
            written.append((tag, step, value))

        def close(self):
            written.append(("closed", None, None))

    monkeypatch.setattr(benchmark, "make_writer", lambda name, log: Recorder())
    code, _, err = run_main(*SMALL, "--test-freq=3", "--lr-num-warmup-steps=2")
    assert code == 0, err
    assert [w[:2] for w in written] == [("Train/Loss", 1), ("Train/LR", 1), ("Train/Loss", 2), ("Train/LR", 2),
                                        ("Train/Loss", 3), ("Train/LR", 3), ("Test/Acc", 3), ("closed", None)]
    assert [w[2] for w in written if w[0] == "Train/LR"] == [0.005, 0.01, 0.01]  # the rate of each step


def test_tensorboard_runs_get_their_own_directories(tmp_path, monkeypatch):
    pytest.importorskip("torch.utils.tensorboard")
    from dlrm.outputs import side_channels as run_outputs

    monkeypatch.chdir(tmp_path)
    lines = []
    for _ in range(2):
        run_outputs.make_writer("runs", lines.append).close()
    assert len({line for line in lines}) == 2 and len(os.listdir(tmp_path / "runs")) == 2


@pytest.mark.parametrize("bits", ["8", "16"])
def test_inference_with_quantized_mlps(run_main, bits):
    code, out, err = run_main(*SMALL, "--inference-only", f"--quantize-mlp-with-bit={bits}")
    assert code == 0, err
    assert "Testing for inference only" in out and " accuracy " in out


@pytest.mark.parametrize("optimizer", ["adagrad", "rwsadagrad"])
def test_other_optimizers_train(run_main, optimizer):
    code, out, err = run_main(*SMALL, f"--optimizer={optimizer}")
    assert code == 0, err
    assert out.count("Finished training it") == 3
    assert "loss 0.025266" in out  # the first loss is computed before any step


TRICK_BASE = ["--mini-batch-size=4", "--data-size=16", "--arch-embedding-size=1000-50-300",
              "--arch-sparse-feature-size=8"]


@pytest.mark.parametrize("flags", [
    ["--qr-flag", "--qr-threshold=100", "--qr-operation=mult", "--arch-mlp-bot=4-8"],
    ["--qr-flag", "--qr-threshold=100", "--qr-operation=add", "--arch-mlp-bot=4-8"],
    ["--qr-flag", "--qr-threshold=100", "--qr-operation=concat", "--arch-mlp-bot=4-16"],  # small tables get 2D
    ["--md-flag", "--md-threshold=100", "--arch-mlp-bot=4-8"],  # a table below the threshold
    ["--md-flag", "--md-threshold=100", "--md-round-dims", "--arch-mlp-bot=4-8"],
])
def test_qr_and_md_tables_train(run_main, tmp_path, flags):
    path = tmp_path / "m.pt"
    code, out, err = run_main(*TRICK_BASE, *flags, "--test-freq=4", "--round-targets=1", "--loss-function=bce",
                              f"--save-model={path}")
    assert code == 0, err
    assert out.count("Finished training it") == 4
    from dlrm.run.checkpoint import load_checkpoint

    keys = load_checkpoint(str(path))["state_dict"]
    assert "emb_l.1.weight" in keys  # the 50-row table stays a plain table
    assert ("emb_l.0.weight_q" in keys) if "--qr-flag" in flags else ("emb_l.0.embs.weight" in keys)


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


def test_onnx_export_after_bf16_training_is_float32(run_main, tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(*SMALL, "--save-onnx", "--mixed-precision=bf16")
    assert code == 0, err
    assert "checked with onnxruntime" in out


def test_fast_numerics_from_the_command_line_stays_close_to_the_exact_run(run_main):
    args = ["--mini-batch-size=256", "--data-size=2048", "--arch-mlp-bot=64-64-16", "--arch-sparse-feature-size=16",
            "--arch-embedding-size=500-300-200-100", "--arch-mlp-top=128-128-1", "--loss-function=bce",
            "--round-targets=true", "--learning-rate=0.1"]
    code, exact, err = run_main(*args)
    assert code == 0, err
    code, fast, err = run_main(*args, "--fast-numerics")
    assert code == 0, err
    assert "fast numerics:" in err
    a, b = ([float(x) for x in re.findall(r"loss (\d\.\d+)", out)] for out in (exact, fast))
    assert len(a) == len(b) == 8 and np.allclose(a, b, rtol=5e-4, atol=0)  # fast_numerics.DRIFT_RTOL


def test_fast_numerics_is_for_cpus(run_main):
    code, _, err = run_main(*SMALL, "--fast-numerics", "--use-gpu")
    assert code == 2 and "--fast-numerics is for CPUs" in err


def test_emulated_bf16_is_said_once(run_main):
    from dlrm.model import fast_numerics

    code, _, err = run_main(*SMALL, "--mixed-precision=bf16")
    assert code == 0, err
    assert (err.count("no native bfloat16") == 1) != fast_numerics.has_native_bf16()
