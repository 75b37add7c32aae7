"""What a run writes and says besides the reference's lines (metrics file, summary, graph, progress,
ONNX name, final model, profiler files and names, TensorBoard), and the start-up checks that fail before
training."""
import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest

from dlrm.outputs import metrics as run_metrics
from dlrm.run import benchmark
from helpers.runs import ROOT, SMALL

TESTED = ["--mini-batch-size=4", "--data-size=24", "--loss-function=bce", "--round-targets=true", "--test-freq=3"]


def _one_error(code, err, message):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err


# --- the metrics file, the summary line, the progress bar -----------------------------------------


def test_metrics_file_has_a_record_per_printed_line_and_per_test(run_main, tmp_path):
    path = tmp_path / "m.jsonl"
    code, out, err = run_main(*TESTED, "--print-freq=2", f"--metrics-file={path}")
    assert code == 0, err
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(list(r) == list(run_metrics.METRICS_FIELDS) for r in records)
    train = [r for r in records if r["loss"] is not None]
    tests = [r for r in records if r["accuracy"] is not None]
    printed = [float(x) for x in re.findall(r"loss (\d\.\d+)", out)]
    accuracies = [float(x) / 100 for x in re.findall(r"^ accuracy (\d+\.\d+) %", out, re.M)]
    assert [round(r["loss"], 6) for r in train] == printed
    assert [r["iteration"] for r in train] == [2, 3, 4, 6] and [r["iteration"] for r in tests] == [3, 6]
    assert [round(r["accuracy"] * 100, 3) for r in tests] == [round(a * 100, 3) for a in accuracies]
    assert all(r["lr"] == 0.01 and r["ms_per_it"] > 0 and r["samples_per_s"] > 0 for r in train)


def test_every_run_ends_with_a_summary_on_stderr(run_main, tmp_path):
    path = tmp_path / "c.pt"
    code, out, err = run_main(*TESTED, f"--save-model={path}")
    assert code == 0, err
    summary = err.strip().splitlines()[-1]
    best = max(float(x) for x in re.findall(r"^ accuracy (\d+\.\d+) %", out, re.M))
    assert re.fullmatch(r"summary: wall time \d+\.\d s, training \d+\.\d samples/s, best accuracy "
                        rf"{best:.3f} % at iteration [36] \(epoch 0\), checkpoint {re.escape(str(path))}", summary)
    assert "summary" not in out  # stdout keeps the reference's lines only


def test_progress_bar_leaves_the_log_lines_unchanged(run_main, monkeypatch):
    code, plain, _ = run_main(*TESTED)
    monkeypatch.setattr(run_metrics, "_is_terminal", lambda stream: True)  # as if on a terminal
    code, barred, err = run_main(*TESTED, "--progress")
    assert code == 0, err
    assert barred == plain
    assert "epoch 0" in err and "test" in err  # the bars were drawn, on stderr


# --- the compute graph, ONNX file name, final model, profiler and quantization lines ----------------


@pytest.mark.parametrize("inference", [False, True])
def test_compute_graph_is_written_and_never_fails_the_run(run_main, tmp_path, monkeypatch, inference):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no Graphviz dot here: the source file and a hint
    code, out, err = run_main(*SMALL, "--plot-compute-graph", *(["--inference-only"] if inference else []))
    assert code == 0, err
    source = (tmp_path / "dlrm_s_pytorch_graph.gv").read_text()
    assert source.startswith("digraph") and "bot_l.0.weight" in source
    assert ("BinaryCrossEntropy" in source or "MseLoss" in source) != inference  # the loss is in the training graph
    assert "install Graphviz" in err


def test_onnx_file_name_can_be_chosen(run_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(*SMALL, "--save-onnx", f"--onnx-file={tmp_path}/model.onnx")
    assert code == 0, err
    assert (tmp_path / "model.onnx").is_file() and not (tmp_path / "dlrm_s_pytorch.onnx").exists()


def test_save_model_without_tests_writes_the_final_model(run_main, tmp_path):
    from dlrm.run.checkpoint import load_checkpoint

    path = tmp_path / "final.pt"
    code, out, err = run_main(*SMALL, "--nepochs=2", f"--save-model={path}")
    assert code == 0, err
    payload = load_checkpoint(str(path))
    assert (payload["epoch"], payload["iter"], payload["nbatches"]) == (1, 3, 3)
    assert "Saving the final model" in err and "Saving model to" not in out  # the reference's line is for tests
    code, out, err = run_main(*SMALL, f"--load-model={path}", "--inference-only")
    assert code == 0, err


def test_profiler_names_its_files(run_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(*SMALL, "--enable-profiling")
    assert code == 0, err
    line = [x for x in err.splitlines() if x.startswith("profiler: wrote ")][0]
    names = line[len("profiler: wrote "):].split(", ")
    assert len(names) == 3 and all((tmp_path / n).is_file() for n in names)


@pytest.mark.parametrize("bits, ratio", [(8, 1.5), (4, 2.5)])
def test_quantization_says_the_tables_size_before_and_after(run_main, bits, ratio):
    code, _, err = run_main("--mini-batch-size=2", "--data-size=6", "--arch-embedding-size=400-300-200",
                            "--arch-sparse-feature-size=16", "--arch-mlp-bot=4-16", "--inference-only",
                            f"--quantize-emb-with-bit={bits}")
    assert code == 0, err
    sizes = re.search(rf"quantized the tables to {bits} bits per value: (\d+\.\d) KiB -> (\d+\.\d) KiB", err)
    assert sizes and float(sizes.group(1)) / float(sizes.group(2)) > ratio


# --- outputs that could not be written, found at start-up --------------------------------------------


@pytest.mark.parametrize("flag", ["--save-model", "--metrics-file", "--onnx-file"])
def test_unwritable_outputs_fail_before_training(run_main, tmp_path, flag):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    extra = ["--save-onnx"] if flag == "--onnx-file" else []
    code, out, err = run_main(*SMALL, *extra, f"{flag}={blocker}/out")
    _one_error(code, err, f"{flag}={blocker}/out: {blocker} is not a directory")
    assert "Finished" not in out and "Using CPU" not in out  # before anything else
    code, out, err = run_main(*SMALL, *extra, f"{flag}={tmp_path}")
    _one_error(code, err, "is a directory")
    code, out, err = run_main(*SMALL, *extra, f"{flag}={tmp_path}/missing/out")
    _one_error(code, err, "does not exist")


def test_profiling_and_graph_in_an_unusable_directory_fail_before_training(run_main, monkeypatch):
    monkeypatch.chdir("/proc")  # no file can be created here, even by root
    for flag in ("--enable-profiling", "--plot-compute-graph"):
        code, out, err = run_main(*SMALL, flag)
        assert code == 2 and flag in err and "Finished" not in out


# --- flags accepted and then ignored, or wrong ---------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--numpy-rand-seed=-1"], "--numpy-rand-seed must be in [0, 2**32)"),
    (["--numpy-rand-seed=4294967296"], "--numpy-rand-seed must be in [0, 2**32)"),
    (["--rand-data-dist=gaussian", "--rand-data-min=5", "--rand-data-max=1"], "--rand-data-min=5 is above"),
    (["--qr-flag", "--qr-collisions=0"], "--qr-collisions must be at least 1"),
    (["--qr-flag", "--md-flag"], "--qr-flag and --md-flag cannot be combined"),
    (["--dist-backend=tcp"], "--dist-backend=tcp is not supported"),
    (["--num-workers=-2"], "--num-workers must not be negative"),
])
def test_wrong_flag_values_are_one_line_errors(run_main, argv, message):
    code, _, err = run_main(*SMALL, *argv)
    _one_error(code, err, message)


@pytest.mark.parametrize("argv, message", [
    (["--inference-only"], "--inference-only without --load-model evaluates a freshly drawn model"),
    (["--quantize-emb-with-bit=8"], "apply with --inference-only only"),
    (["--use-gpu"], "--use-gpu, but CUDA is not available: running on the CPU"),
    (["--dist-backend=gloo"], "--dist-backend=gloo has no effect in a single process"),
    (["--sharding=row"], "--sharding=row has no effect in a single process"),
    (["--a2a-precision=bf16"], "--a2a-precision=bf16 has no effect in a single process"),
    (["--embedding-cache-gib=2"], "apply with --embedding-store=disk only; the tables are in memory"),
])
def test_ignored_flags_are_said_once(run_main, argv, message):
    import torch

    if "--use-gpu" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = run_main(*SMALL, "--nepochs=2", *argv)
    assert code == 0, err
    assert err.count(message) == 1


# --- processes that end cleanly -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_rank_without_partners_says_what_it_waits_for_and_gives_up():
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29981"}
    env.pop("TORCHELASTIC_RUN_ID", None)
    start = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), *SMALL, "--dist-init-timeout=3"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.time() - start < 60
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == ("rank 0: waiting for all 2 processes at 127.0.0.1:29981 (backend gloo; giving up after "
                        "3 s, --dist-init-timeout)")
    assert len(lines) == 2 and lines[1].startswith("error: rank 0: the other processes of the 2 did not join")


# --- a write that fails mid-run is one line naming the file -------------------------------------------


def test_a_full_disk_at_a_checkpoint_is_one_line_error(run_main, tmp_path, monkeypatch):
    import errno

    import torch

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    path = tmp_path / "m.pt"
    code, out, err = run_main(*TESTED, f"--save-model={path}")
    assert code == 2 and "Saving model to" in out
    assert err.strip().splitlines()[-1] == f"error: {path}: cannot write the checkpoint (No space left on device)"
    assert not [name for name in os.listdir(tmp_path) if name != "c.pt"]  # no temporary left behind


def test_a_metrics_file_that_stops_taking_writes_is_one_line_error(run_main, tmp_path, monkeypatch):
    import errno

    def full(self, line):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_metrics.MetricsFile, "_write_line", full)
    path = tmp_path / "m.jsonl"
    code, _, err = run_main(*SMALL, f"--metrics-file={path}")
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: metrics file {path}: cannot write (No space left on device)")


# --- profiler files and TensorBoard scalars ------------------------------------------------------------


def test_profiling_writes_trace_and_tables(run_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(*SMALL, "--enable-profiling")
    assert code == 0, err
    assert len(glob.glob("dlrm_s_pytorch*.json")) == 1
    shape, = glob.glob("dlrm_s_pytorch*_shape.prof")
    total, = glob.glob("dlrm_s_pytorch*_total.prof")
    assert "DLRM forward" in open(total).read() and "Input Shapes" in open(shape).read()


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


def test_an_empty_tensorboard_name_writes_nothing(run_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(*SMALL, "--tensor-board-filename=")
    assert code == 0, err
    assert "TensorBoard" not in err and os.listdir(tmp_path) == []


def test_tensorboard_runs_get_their_own_directories(tmp_path, monkeypatch):
    pytest.importorskip("torch.utils.tensorboard")
    from dlrm.outputs import side_channels as run_outputs

    monkeypatch.chdir(tmp_path)
    lines = []
    for _ in range(2):
        run_outputs.make_writer("runs", lines.append).close()
    assert len({line for line in lines}) == 2 and len(os.listdir(tmp_path / "runs")) == 2
