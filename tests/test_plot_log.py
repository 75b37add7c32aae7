"""tools/plot_log.py: parsing our exact log text, the figure's series, and the command line."""
import pytest

from tools import plot_log
from tools.plot_log import EvalPoint, TrainPoint

# Printed by `--mini-batch-size=2 --data-size=8 --test-freq=2 --print-freq=2 --nepochs=2`, with the
# kind of noise real logs carry: a torchrun prefix, a warning, an MLPerf event between header and metrics.
PLAIN = """\
world size: 1, current rank: 0, local rank: 0
Using CPU...
time/loss/accuracy (if enabled):
Finished training it 2/4 of epoch 0, -1.00 ms/it, loss 0.102880
Testing at - 2/4 of epoch 0,
 accuracy 50.000 %, best 50.000 %
/usr/lib/python3/site-packages/torch/foo.py:12: UserWarning: something
[rank0]: Finished training it 4/4 of epoch 0, 12.50 ms/it, loss 0.141497 (10:42)
[rank0]: Testing at - 4/4 of epoch 0,
[rank0]:  accuracy 75.000 %, best 75.000 %
Finished training it 2/4 of epoch 1, -1.00 ms/it, loss nan
Finished inference it 2/4 of epoch 1, -1.00 ms/it, loss 9.000000
"""

METRICS_0 = ("recall 0.0000, precision 0.0000, f1 0.0000, ap 0.5805, auc 0.4495, best auc 0.4495, "
             "accuracy 45.000 %, best accuracy 45.000 %")
METRICS_1 = ("recall 0.1000, precision 0.2000, f1 0.3000, ap 0.4000, auc 0.5125, best auc 0.5125, "
             "accuracy 47.500 %, best accuracy 47.500 %")
# With --mlperf-logging; the second evaluation has header and metrics on one line.
MLPERF = f"""\
:::MLLOG {{"namespace": "", "key": "run_start", "value": null}}
Finished training it 5/20 of epoch 0, -1.00 ms/it, loss 1.830210
Testing at - 5/20 of epoch 0,
:::MLLOG {{"namespace": "", "event_type": "INTERVAL_START", "key": "eval_start", "value": null}}
{METRICS_0}
Finished training it 5/20 of epoch 1, -1.00 ms/it, loss 1.693378
Testing at - 5/20 of epoch 1,{METRICS_1}
"""


def test_global_iteration_counts_whole_epochs_before():
    assert plot_log.global_iteration(1, 3, 0) == 1
    assert plot_log.global_iteration(2, 3, 1) == 5


def test_plain_log_is_parsed_exactly():
    run = plot_log.parse_log_lines(PLAIN.splitlines(), "a.log")
    assert run.train[:2] == (TrainPoint(2, 0, 0.10288, None), TrainPoint(4, 0, 0.141497, 12.5))
    assert run.train[2].iteration == 6 and run.train[2].loss != run.train[2].loss  # nan kept as nan
    assert len(run.train) == 3  # the inference line is not training
    assert run.test == (EvalPoint(2, 0, 50.0, None), EvalPoint(4, 0, 75.0, None))


def test_mlperf_metrics_attach_to_the_header_before_them():
    run = plot_log.parse_log_lines(MLPERF.splitlines(), "b.log")
    assert [(p.iteration, p.loss) for p in run.train] == [(5, 1.83021), (25, 1.693378)]
    assert run.test == (EvalPoint(5, 0, 45.0, 0.4495), EvalPoint(25, 1, 47.5, 0.5125))


def test_metrics_without_a_header_are_ignored():
    run = plot_log.parse_log_lines([" accuracy 50.000 %, best 50.000 %",
                                    "Finished training it 1/1 of epoch 0, -1.00 ms/it, loss 0.5"])
    assert run.test == () and len(run.train) == 1


def test_read_log_names_the_file_and_splits_carriage_returns(tmp_path):
    path = tmp_path / "run.log"
    path.write_bytes(b"50%|###  | 1/2\rFinished training it 1/2 of epoch 0, -1.00 ms/it, loss 0.250000\r\n")
    run = plot_log.read_log(str(path))
    assert run.name == "run.log" and run.train == (TrainPoint(1, 0, 0.25, None),)


def test_read_log_errors(tmp_path):
    with pytest.raises(plot_log.LogError, match="no such file"):
        plot_log.read_log(str(tmp_path / "missing.log"))
    (tmp_path / "empty.log").write_text("world size: 1\nTesting at - 1/2 of epoch 0,\n")
    with pytest.raises(plot_log.LogError, match=r"empty\.log: no training lines"):
        plot_log.read_log(str(tmp_path / "empty.log"))


def test_labels_are_file_names_unless_two_collide():
    assert plot_log.run_labels(["x/a.log", "y/b.log"]) == ["a.log", "b.log"]
    assert plot_log.run_labels(["x/a.log", "y/a.log", "b.log"]) == ["x/a.log", "y/a.log", "b.log"]


def _series(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_figure_overlays_runs_per_panel():
    plain = plot_log.parse_log_lines(PLAIN.splitlines()[:10], "plain.log")
    mlperf = plot_log.parse_log_lines(MLPERF.splitlines(), "mlperf.log")
    fig = plot_log.build_figure([plain, mlperf], title="two runs")
    loss_ax, acc_ax, auc_ax = fig.axes
    assert _series(loss_ax) == {"plain.log": ([2, 4], [0.10288, 0.141497]),
                                "mlperf.log": ([5, 25], [1.83021, 1.693378])}
    assert _series(acc_ax) == {"plain.log": ([2, 4], [50.0, 75.0]), "mlperf.log": ([5, 25], [45.0, 47.5])}
    assert _series(auc_ax) == {"mlperf.log": ([5, 25], [0.4495, 0.5125])}  # the plain run has no AUC
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["plain.log", "mlperf.log"]
    assert loss_ax.get_ylabel() == "training loss" and auc_ax.get_ylabel() == "test AUC"
    assert "iteration" in auc_ax.get_xlabel() and fig.get_suptitle() == "two runs"


def test_figure_without_auc_has_two_panels():
    fig = plot_log.build_figure([plot_log.parse_log_lines(PLAIN.splitlines(), "plain.log")])
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "test accuracy (%)"


def test_main_writes_a_png(tmp_path, capsys):
    (tmp_path / "a.log").write_text(PLAIN)
    (tmp_path / "b.log").write_text(MLPERF)
    out = tmp_path / "curves.png"
    assert plot_log.main([str(tmp_path / "a.log"), str(tmp_path / "b.log"), "-o", str(out), "--title", "t"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.glob("*.tmp*")) == []


@pytest.mark.parametrize("content, message", [(None, "missing.log: no such file"),
                                               ("hello\n", "missing.log: no training lines")])
def test_main_bad_input_is_one_error_line(tmp_path, capsys, content, message):
    log = tmp_path / "missing.log"
    if content is not None:
        log.write_text(content)
    out = tmp_path / "curves.png"
    assert plot_log.main([str(log), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not out.exists()


@pytest.mark.slow
def test_runs_as_a_module(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "a.log").write_text(PLAIN)
    root = os.path.dirname(os.path.dirname(os.path.abspath(plot_log.__file__)))
    done = subprocess.run([sys.executable, "-m", "tools.plot_log", str(tmp_path / "a.log"), "-o",
                           str(tmp_path / "c.png")], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "c.png").exists()
