"""The numbers the reference prints, reproduced exactly (recorded by running the reference on CPU,
torch 2.13, NumPy 2.4)."""
import re

LOSS = re.compile(r"^Finished training it (\d+)/(\d+) of epoch (\d+), -1\.00 ms/it, loss (\d+\.\d{6})$", re.M)


def _losses(out):
    return [m.group(4) for m in LOSS.finditer(out)]


def test_default_run_prints_reference_losses(run_main):
    code, out, err = run_main("--mini-batch-size=2", "--data-size=6")
    assert code == 0, err
    assert out.splitlines() == [
        "world size: 1, current rank: 0, local rank: 0",
        "Using CPU...",
        "time/loss/accuracy (if enabled):",
        "Finished training it 1/3 of epoch 0, -1.00 ms/it, loss 0.025266",
        "Finished training it 2/3 of epoch 0, -1.00 ms/it, loss 0.180494",
        "Finished training it 3/3 of epoch 0, -1.00 ms/it, loss 0.083240",
    ]


def test_debug_mode_prints_reference_losses_and_data(run_main):
    code, out, err = run_main("--mini-batch-size=2", "--data-size=6", "--debug-mode")
    assert code == 0, err
    assert _losses(out) == ["0.018993", "0.029700", "0.049903"]
    lines = out.splitlines()
    # No distributed line in debug mode; the architecture block first.
    assert lines[:16] == [
        "Using CPU...", "model arch:", "mlp top arch 3 layers, with input to output dimensions:", "[8 4 2 1]",
        "# of interactions", "8", "mlp bot arch 2 layers, with input to output dimensions:", "[4 3 2]",
        "# of features (sparse and dense)", "4", "dense feature size", "4", "sparse feature size", "2",
        "# of embeddings (= # of sparse features) 3, with dimensions 2x:", "[4 3 2]",
    ]
    order = ["data (inputs and targets):", "initial parameters (weights and bias):",
             "time/loss/accuracy (if enabled):", "updated parameters (weights and bias):"]
    positions = [lines.index(x) for x in order]
    assert positions == sorted(positions)


def test_debug_mode_batches_match_spec(run_main):
    _, out, _ = run_main("--mini-batch-size=2", "--data-size=6", "--debug-mode")
    data = out.split("data (inputs and targets):\n")[1].split("initial parameters")[0]
    # the reference's batches 0, 1 and 2
    assert "mini-batch: 0\ntensor([[0.6965, 0.2861, 0.2269, 0.5513],\n        [0.7195, 0.4231, 0.9808, 0.6848]])" in data
    assert "tensor([[1, 2],\n        [1, 1],\n        [1, 1]], dtype=torch.int32)" in data
    assert "[tensor([1, 0, 1]), tensor([0, 1]), tensor([1, 0])]\ntensor([[0.3618],\n        [0.2283]])" in data
    assert "[tensor([3, 0, 2]), tensor([1, 1, 2]), tensor([1, 1])]" in data
    assert "[tensor([2, 3, 2]), tensor([0, 0, 2]), tensor([1, 1])]\ntensor([[0.5568],\n        [0.1590]])" in data


def test_debug_mode_parameters_match_spec(run_main):
    _, out, _ = run_main("--mini-batch-size=2", "--data-size=6", "--debug-mode")
    initial = out.split("initial parameters (weights and bias):\n")[1].split("time/loss")[0]
    updated = out.split("updated parameters (weights and bias):\n")[1]
    for text in ("[[-0.34693  0.19553]\n [-0.18123  0.19197]\n [ 0.05438 -0.11105]\n [ 0.42513  0.34167]]",
                 "[-0.62618 -0.7872   0.21905]", "[[-1.53246 -0.83254]]", "[0.16794]",
                 "[ 0.30546  0.65675 -0.11032  0.33164  0.20402  0.19365 -0.23022 -0.40715]"):
        assert text in initial
    for text in ("[[-0.34698  0.19556]\n [-0.18126  0.19205]\n [ 0.05439 -0.11103]\n [ 0.4251   0.34159]]",
                 "[-0.62618 -0.78773  0.21905]", "[[-1.53243 -0.83254]]", "[0.1678]",
                 "[ 0.30546  0.65666 -0.11032  0.33164  0.20399  0.19363 -0.23022 -0.40716]",
                 "[ 0.20084 -0.99836]"):
        assert text in updated


def test_non_debug_initial_parameters_match_spec():
    """First rows of the parameters when the model is built right after seeding."""
    import numpy as np
    from dlrm.model import dlrm
    from helpers.models import tiny_model_config

    model = dlrm.DLRM(tiny_model_config(), np.random.RandomState(123))
    params = [p.detach().numpy() for p in model.parameters()]
    first_rows = [np.round((p[0] if p.ndim == 2 else p).astype(np.float64), 5).tolist() for p in params]
    assert first_rows[0] == [0.19647, -0.21386]
    assert first_rows[1] == [-0.02202, -0.12457]
    assert first_rows[2] == [-0.14419, 0.33658]
    assert first_rows[3] == [1.17912, 1.16889, 0.53669, 0.20643]
    assert first_rows[4] == [-0.08087, -0.49753, -0.14758]
    assert first_rows[-2] == [-0.88664, -0.59805]
    assert first_rows[-1] == [-1.21252]
