"""run_metrics: the JSON Lines metrics file, the summary line and the progress bar's log adapter."""
import json
import sys

import pytest

from dlrm.common import ConfigError
from dlrm.outputs.metrics import METRICS_FIELDS, BestResult, MetricsFile, format_summary, progress_bar
from dlrm.run import train as dlrm


def test_metrics_file_writes_one_flushed_json_line_per_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsFile(str(path)) as metrics:
        metrics.write(2, 0, loss=0.10288, lr=0.01, ms_per_it=3.5, samples_per_s=571.4)
        assert path.read_text().count("\n") == 1  # flushed before the next record or close
        metrics.write(5, 0, accuracy=0.45, auc=0.4495)
        metrics.write(6, 0, loss=float("nan"), lr=0.01)
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [list(r) for r in records] == [list(METRICS_FIELDS)] * 3
    assert records[0] == {"iteration": 2, "epoch": 0, "loss": 0.10288, "lr": 0.01, "ms_per_it": 3.5,
                          "samples_per_s": 571.4, "accuracy": None, "auc": None}
    assert records[1] == {"iteration": 5, "epoch": 0, "loss": None, "lr": None, "ms_per_it": None,
                          "samples_per_s": None, "accuracy": 0.45, "auc": 0.4495}
    assert records[2]["loss"] is None and "NaN" not in lines[2]  # strict JSON


def test_metrics_file_replaces_or_appends(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"old": 1}\n')
    with MetricsFile(str(path), append=True) as metrics:
        metrics.write(1, 0, loss=1.0)
    assert path.read_text().splitlines()[0] == '{"old": 1}'
    with MetricsFile(str(path)) as metrics:
        metrics.write(1, 0, loss=1.0)
    assert len(path.read_text().splitlines()) == 1


def test_metrics_file_in_an_unwritable_place_fails_at_construction(tmp_path):
    with pytest.raises(ConfigError, match=r"metrics file .*missing/m\.jsonl: cannot create it \(No such file"):
        MetricsFile(str(tmp_path / "missing" / "m.jsonl"))
    with pytest.raises(ConfigError, match=r"cannot create it \(Is a directory\)"):
        MetricsFile(str(tmp_path))


def test_metrics_file_write_after_close(tmp_path):
    metrics = MetricsFile(str(tmp_path / "m.jsonl"))
    metrics.close()
    metrics.close()  # closing twice is harmless
    with pytest.raises(ValueError, match="write after close"):
        metrics.write(1, 0)


def test_summary_with_auc_and_checkpoint():
    best = BestResult("auc", 0.80251, iteration=12000, epoch=0)
    assert format_summary(3723.44, 45_000_000, 3645.0, best, "model.pt") == (
        "summary: wall time 3723.4 s (1:02:03), training 12345.7 samples/s, "
        "best auc 0.8025 at iteration 12000 (epoch 0), checkpoint model.pt")


def test_summary_with_accuracy_as_the_log_prints_it():
    best = BestResult("accuracy", 0.78125, iteration=25, epoch=1)
    assert format_summary(2.06, 80, 1.6, best) == (
        "summary: wall time 2.1 s, training 50.0 samples/s, best accuracy 78.125 % at iteration 25 (epoch 1), "
        "no checkpoint")


def test_summary_without_test_or_training_time():
    assert format_summary(0.5, 0, 0.0) == "summary: wall time 0.5 s, training n/a samples/s, no test, no checkpoint"
    with pytest.raises(ValueError, match="best metric 'loss'"):
        format_summary(1.0, 1, 1.0, BestResult("loss", 0.1, 1, 0))


LINES = [dlrm.format_train_line(1, 3, 0, -1.0, 0.025266), dlrm.format_test_header(2, 3, 0),
         dlrm.format_accuracy_line(0.5, 0.5), "", "ünïcode ✓"]


def test_progress_bar_is_off_when_stdout_is_not_a_terminal(capsys):
    bar = progress_bar(3, "epoch 0")  # under pytest stdout is captured, not a terminal
    log = dlrm.Logger()
    assert not bar.enabled and bar.wrap(log) is log
    bar.update()
    bar.close()
    assert capsys.readouterr() == ("", "")


def test_lines_printed_through_the_bar_adapter_are_unchanged(capsys):
    for line in LINES:
        dlrm.Logger()(line)
    without_bar = capsys.readouterr().out

    with progress_bar(len(LINES), "epoch 0", enabled=True) as bar:
        assert bar.enabled
        log = bar.wrap(dlrm.Logger())
        for line in LINES:
            log(line)
            bar.update()
    out, err = capsys.readouterr()
    assert out == without_bar == "".join(line + "\n" for line in LINES)
    assert "epoch 0" in err and "\r" in err  # the bar drew itself on stderr, between the lines


def test_the_adapter_keeps_the_printers_own_filtering(capsys):
    class Quiet:  # a non-main rank's printer
        def __call__(self, text=""):
            pass

    with progress_bar(1, "epoch 0", enabled=True) as bar:
        bar.wrap(Quiet())("not printed")
    assert capsys.readouterr().out == ""


def test_progress_bar_follows_the_terminal_unless_forced(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # where the bar is drawn
    with progress_bar(1, "x") as bar:
        assert bar.enabled
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)  # a captured log
    with progress_bar(1, "x") as bar:
        assert not bar.enabled
    with progress_bar(1, "x", enabled=False) as bar:
        assert not bar.enabled
