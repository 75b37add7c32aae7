"""The run as a whole (dlrm/run/benchmark.py): an inference-only run without a checkpoint."""
from helpers.runs import SMALL


def test_inference_only_without_checkpoint_evaluates_once(run_main):
    code, out, err = run_main(*SMALL, "--inference-only")
    assert code == 0, err
    assert "Testing for inference only" in out and " accuracy " in out and "Finished training" not in out
