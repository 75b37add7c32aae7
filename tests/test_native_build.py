"""native_build: where kernels are cached, and a build that fails returning its reason (the caller
then takes its pure-torch or NumPy path)."""
import os

from dlrm.kernels import native_build


def test_build_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(native_build.EXTENSIONS_DIR_ENV, str(tmp_path))
    path = native_build.build_dir("kernel")
    assert path.startswith(str(tmp_path) + os.sep) and path.endswith(os.sep + "kernel")
    monkeypatch.delenv(native_build.EXTENSIONS_DIR_ENV)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch"))
    assert native_build.build_dir("kernel").startswith(str(tmp_path / "torch") + os.sep)


def test_a_failed_build_returns_none_and_why(monkeypatch, tmp_path):
    monkeypatch.setenv(native_build.EXTENSIONS_DIR_ENV, str(tmp_path))
    source = tmp_path / "broken.cpp"
    source.write_text("this is not C++\n")
    monkeypatch.setattr(native_build, "SOURCE_DIR", str(tmp_path))
    module, reason, seconds = native_build.load.__wrapped__("dlrm_broken_kernel", "broken.cpp", "broken")
    assert module is None and reason.startswith("RuntimeError: ") and seconds >= 0
