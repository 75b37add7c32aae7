"""The command line: reference flags and defaults, and one-line errors for bad input."""
import os
import subprocess
import sys

import pytest

from dlrm.run import flags
from dlrm.run.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_the_reference_ones():
    ns = flags.build_parser().parse_args([])
    assert ns.embedding_dim == 2 and ns.table_sizes == (4, 3, 2) and ns.bottom_mlp == (4, 3, 2)
    assert ns.top_mlp == (4, 2, 1) and ns.interaction == "dot" and ns.loss_function == "mse"
    assert ns.optimizer == "sgd" and ns.learning_rate == 0.01 and ns.seed == 123
    assert ns.batch_size == 1 and ns.data_size == 1 and ns.num_indices_per_lookup == 10
    assert ns.print_freq == 1 and ns.test_freq == -1 and ns.print_precision == 5
    assert ns.sync_dense_params is True and ns.round_targets is False
    assert ns.trace_file == "./input/dist_emb_j.log" and ns.tensor_board_filename == "run_kaggle_pt"
    assert ns.local_rank == -1 and ns.grad_accum_iter == 1


@pytest.mark.parametrize("text, value", [("False", False), ("false", False), ("0", False), ("no", False),
                                         ("True", True), ("1", True), ("yes", True)])
def test_boolean_flags_read_false_as_false(text, value):
    """The reference read --round-targets=False as true."""
    ns = flags.build_parser().parse_args([f"--round-targets={text}", f"--num-indices-per-lookup-fixed={text}"])
    assert ns.round_targets is value and ns.fixed is value


def test_local_rank_has_both_spellings():
    assert flags.build_parser().parse_args(["--local-rank=3"]).local_rank == 3
    assert flags.build_parser().parse_args(["--local_rank=2"]).local_rank == 2


def test_synthetic_is_a_data_generation_choice():
    assert flags.build_parser().parse_args(["--data-generation=synthetic"]).generation == "synthetic"


BAD = [
    (["--arch-sparse-feature-size=3"], "does not match the bottom MLP's output width 2"),
    (["--arch-mlp-bot=4"], "--arch-mlp-bot needs at least an input and an output width"),
    (["--arch-mlp-bot=4-3-0"], "--arch-mlp-bot: every width must be at least 1"),
    (["--arch-embedding-size=4-0-2"], "table 1 has 0 rows"),
    (["--mini-batch-size=0"], "--mini-batch-size must be at least 1, got 0"),
    (["--loss-function=hinge"], "--loss-function=hinge is not supported (choose from mse, bce, wbce)"),
    (["--optimizer=adam"], "--optimizer=adam is not supported (choose from sgd, adagrad, rwsadagrad)"),
    (["--arch-interaction-op=sum"], "--arch-interaction-op=sum is not supported (choose from dot, cat)"),
    (["--weighted-pooling=weighted"], "--weighted-pooling=weighted is not supported (choose from fixed, learned)"),
    (["--arch-mlp-top=4-2-2", "--loss-function=bce"], "--arch-mlp-top must end in 1"),
    (["--learning-rate=-0.1"], "--learning-rate must not be negative"),
    (["--round-targets=maybe"], "--round-targets"),
    (["--arch-embedding-size=4-x-2"], "--arch-embedding-size"),
    (["--mini-batch-size=two"], "--mini-batch-size"),
    (["--lr-num-warmup-steps=5", "--lr-decay-start-step=2", "--lr-num-decay-steps=3"],
     "Learning rate warmup must finish before the decay starts"),
    (["--rand-data-dist=poisson"], "--rand-data-dist=poisson is not supported (choose from uniform, gaussian, zipf)"),
    (["--weighted-pooling=fixed", "--qr-flag"], "--weighted-pooling cannot be combined"),
    (["--quantize-mlp-with-bit=7"], "--quantize-mlp-with-bit must be 8, 16 or 32"),
    (["--nepochs=0"], "--nepochs must be at least 1"),
    (["--mlperf-logging", "--test-freq=1"], "add --round-targets=true"),
    (["--quantize-emb-with-bit=5"], "--quantize-emb-with-bit must be 4, 8 or 32"),
    (["--data-size=0"], "--data-size must be at least 1"),
    (["--num-indices-per-lookup=0"], "--num-indices-per-lookup must be at least 1"),
]


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_input_is_one_line_error(run_main, argv, message):
    code, out, err = run_main("--data-size=4", "--mini-batch-size=2", *argv) if "--mini-batch-size=0" not in argv \
        else run_main("--data-size=4", *argv)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


@pytest.mark.slow
def test_bad_input_from_a_real_process_has_no_traceback():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), "--arch-sparse-feature-size=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_a_real_process_exits_with_every_file_complete(tmp_path):
    """The command line skips the interpreter's teardown at exit: every line of the files a run
    writes must still reach them (the MLPerf log through logging's own flush at exit)."""
    mlperf_log = tmp_path / "dlrm.log"
    metrics = tmp_path / "m.jsonl"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), "--mini-batch-size=8",
                           "--num-batches=6", "--print-freq=1", "--test-freq=3", "--round-targets=true",
                           "--mlperf-logging", f"--mlperf-log-file={mlperf_log}", f"--metrics-file={metrics}",
                           f"--save-model={tmp_path / 'c.pt'}"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Finished training it") == 6 and proc.stderr.rstrip().splitlines()[-1].startswith(
        "summary: ")
    assert len(metrics.read_text().splitlines()) == 6 + 2  # six training lines and two tests
    with open(mlperf_log) as f:
        assert '"key": "block_stop"' in f.read().splitlines()[-1]  # the run's last event
    assert "state_dict" in load_checkpoint(str(tmp_path / "c.pt"))


def test_help_groups_the_flags(run_main):
    code, out, _ = run_main("--help")
    assert code == 0
    for group in ("model:", "data:", "training:", "evaluation:", "output:"):
        assert group in out
    assert "--arch-sparse-feature-size" in out and "--mlperf-bin-shuffle" in out


def test_print_time_and_wall_time(run_main):
    code, out, _ = run_main("--mini-batch-size=2", "--data-size=4", "--print-time", "--print-wall-time")
    import re
    lines = [ln for ln in out.splitlines() if ln.startswith("Finished")]
    assert len(lines) == 2
    for line in lines:
        assert re.fullmatch(r"Finished training it \d/2 of epoch 0, \d+\.\d\d ms/it, loss \d\.\d{6} \(\d\d:\d\d\)", line)


def test_print_freq_and_nepochs(run_main):
    code, out, _ = run_main("--mini-batch-size=2", "--data-size=10", "--print-freq=2", "--nepochs=2")
    steps = [ln.split(" of epoch")[0].split("it ")[1] + ln.split("of epoch ")[1][0]
             for ln in out.splitlines() if ln.startswith("Finished")]
    assert steps == ["2/50", "4/50", "5/50", "2/51", "4/51", "5/51"]


def test_num_batches_limits_training(run_main):
    code, out, _ = run_main("--mini-batch-size=2", "--data-size=100", "--num-batches=3")
    assert [ln for ln in out.splitlines() if ln.startswith("Finished")][-1].startswith("Finished training it 3/3 ")


def test_test_freq_prints_accuracy_and_tracks_best(run_main):
    code, out, _ = run_main("--mini-batch-size=8", "--data-size=64", "--nepochs=4", "--test-freq=4",
                            "--loss-function=bce", "--round-targets=true", "--learning-rate=0.3",
                            "--arch-mlp-top=8-4-1", "--numpy-rand-seed=3")
    import re
    accs = [(float(a), float(b)) for a, b in re.findall(r"^ accuracy (\d+\.\d{3}) %, best (\d+\.\d{3}) %$", out, re.M)]
    assert len(accs) == 8
    best = 0.0
    for acc, shown_best in accs:  # best really is the best so far (the reference never kept it)
        best = max(best, acc)
        assert shown_best == best
    assert "Testing at - 4/8 of epoch 0," in out
