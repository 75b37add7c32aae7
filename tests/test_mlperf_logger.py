"""MLPerf events (dlrm/outputs/mlperf_logger.py): the log file and the events on standard output."""
import re

import pytest


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
