"""The fused embedding path inside the whole run: the same printed numbers and the same trained
parameters, bit for bit, as the plain per-table path (the reference's step)."""
import pytest
import torch

from dlrm.model import dlrm as dlrm_model
from dlrm.run.checkpoint import load_checkpoint

RUNS = [
    ["--mini-batch-size=2", "--data-size=6", "--debug-mode"],
    ["--mini-batch-size=4", "--data-size=48", "--arch-embedding-size=300-20-1-77", "--num-indices-per-lookup=6",
     "--loss-function=bce", "--round-targets=true", "--test-freq=5", "--learning-rate=0.3", "--nepochs=2"],
    ["--mini-batch-size=3", "--data-size=30", "--weighted-pooling=learned", "--arch-embedding-size=9-40-5",
     "--lr-num-warmup-steps=3", "--lr-decay-start-step=5", "--lr-num-decay-steps=4", "--learning-rate=0.2"],
    ["--mini-batch-size=5", "--data-size=40", "--weighted-pooling=fixed", "--num-indices-per-lookup-fixed=true",
     "--arch-sparse-feature-size=3", "--arch-mlp-bot=4-3", "--arch-interaction-op=cat", "--test-freq=4"],
]


@pytest.mark.slow
@pytest.mark.parametrize("argv", RUNS)
def test_fused_run_prints_and_trains_what_the_plain_run_does(run_main, tmp_path, argv):
    results = {}
    for backend in ("plain", "fused"):
        path = tmp_path / f"{backend}.pt"
        code, out, err = run_main(*argv, f"--embedding-backend={backend}", f"--save-model={path}")
        assert code == 0, err
        out = out.replace(str(path), "CHECKPOINT")
        results[backend] = (out, load_checkpoint(str(path))["state_dict"] if path.exists() else None)
    (plain_out, plain_state), (fused_out, fused_state) = results["plain"], results["fused"]
    assert fused_out == plain_out
    if plain_state is not None:
        assert list(fused_state) == list(plain_state)
        for key in plain_state:
            assert torch.equal(fused_state[key], plain_state[key]), key


def test_a_fused_checkpoint_loads_into_plain_tables_and_back(run_main, tmp_path):
    path = tmp_path / "m.pt"
    args = ["--mini-batch-size=4", "--data-size=24", "--loss-function=bce", "--round-targets=true", "--test-freq=3"]
    code, _, err = run_main(*args, "--embedding-backend=fused", f"--save-model={path}")
    assert code == 0, err
    for backend in ("plain", "fused"):
        code, out, err = run_main(*args, f"--embedding-backend={backend}", f"--load-model={path}", "--inference-only")
        assert code == 0, err
        assert "Testing for inference only" in out


@pytest.mark.parametrize("flags, why", [
    (["--optimizer=adagrad"], "--optimizer is not sgd"),
    (["--qr-flag", "--qr-threshold=2", "--arch-embedding-size=4-3-2"], "--qr-flag"),
    (["--mlperf-logging", "--mlperf-grad-accum-iter=2"], "gradient accumulation"),
])
def test_fused_is_refused_where_it_does_not_apply(run_main, flags, why):
    code, _, err = run_main("--mini-batch-size=2", "--data-size=6", "--embedding-backend=fused", *flags)
    assert code == 2 and why in err and err.startswith("error: --embedding-backend=fused does not apply")


def test_auto_fuses_large_tables_only():
    from dlrm.run.config import embedding_backend
    from dlrm.run.flags import build_parser, config_from_args
    from dlrm.distributed import DistInfo

    def chosen(*argv):
        cfg = config_from_args(build_parser().parse_args(list(argv)))
        return embedding_backend(cfg, cfg.model, DistInfo(), torch.device("cpu"))

    assert chosen() == "plain"
    assert chosen("--arch-embedding-size=600000-500000", "--arch-sparse-feature-size=2") == "fused"
    assert chosen("--arch-embedding-size=600000-500000", "--arch-sparse-feature-size=2", "--optimizer=adagrad") == "plain"


def test_onnx_export_of_a_fused_model(run_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main("--mini-batch-size=2", "--data-size=6", "--embedding-backend=fused", "--save-onnx")
    assert code == 0, err
    assert "checked with onnxruntime" in out


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_tables_from_fused_tables_equal_those_from_plain_ones(bits):
    import numpy as np
    from helpers.models import tiny_model_config

    plain = dlrm_model.DLRM(tiny_model_config(), np.random.RandomState(3))
    fused = dlrm_model.DLRM(tiny_model_config(embedding_backend="fused"), np.random.RandomState(3))
    offsets, indices = torch.tensor([[0, 1]] * 3), torch.tensor([[0, 3], [1, 2], [1, 0]])
    a = dlrm_model.QuantizedTables(plain.emb_l, bits)(offsets, indices)
    b = dlrm_model.QuantizedTables(fused.emb_l, bits)(offsets, indices)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
