"""ONNX export (dlrm/outputs/onnx_export.py): a missing package is said before training, and the
exported model runs in onnxruntime as the PyTorch one does."""
import builtins

import pytest

from helpers.runs import SMALL


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


def test_onnx_export_after_bf16_training_is_float32(run_main, tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(*SMALL, "--save-onnx", "--mixed-precision=bf16")
    assert code == 0, err
    assert "checked with onnxruntime" in out
