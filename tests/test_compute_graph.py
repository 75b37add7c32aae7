"""compute_graph.write_compute_graph: the Graphviz source always, the PDF where `dot` exists, and
never an exception into the run."""
import os
import re
import stat
import sys

import pytest
import torch

from dlrm.outputs.compute_graph import write_compute_graph

pytest.importorskip("torchviz")  # in requirements.txt; the missing-package path is tested by hiding it


@pytest.fixture
def tiny():
    """(loss, prediction, named parameters) of Linear(3, 2) → ReLU → Linear(2, 1) on a batch of 4."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    pred = model(torch.randn(4, 3))
    loss = torch.nn.functional.mse_loss(pred, torch.zeros(4, 1))
    return loss, pred, dict(model.named_parameters())


@pytest.fixture
def bin_dir(tmp_path, monkeypatch):
    """An otherwise empty directory as the whole PATH: no Graphviz unless a test puts a `dot` there."""
    path = tmp_path / "bin"
    path.mkdir()
    monkeypatch.setenv("PATH", str(path))
    return path


def fake_dot(bin_dir, body):
    script = bin_dir / "dot"
    script.write_text(f"#!/bin/sh\n# called as: dot -Tpdf IN -o OUT\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def parse_digraph(text):
    """{node id: label} and [(from, to)] of torchviz's output; fails unless it is one digraph."""
    assert text.startswith("digraph {") and text.rstrip().endswith("}")
    assert text.count("{") == text.count("}") == 1
    nodes = dict(re.findall(r'^\t(\d+) \[label=("[^"]*"|\w+)', text, flags=re.M))
    edges = re.findall(r"^\t(\d+) -> (\d+)", text, flags=re.M)
    assert edges and all(a in nodes and b in nodes for a, b in edges)
    return {k: v.strip('"') for k, v in nodes.items()}, edges


def test_without_dot_writes_the_source_and_says_how_to_render(tiny, tmp_path, bin_dir):
    loss, _, params = tiny
    lines = []
    stem = str(tmp_path / "train_graph")
    assert write_compute_graph(loss, params, stem, lines.append) == [stem + ".gv"]
    labels, _ = parse_digraph((tmp_path / "train_graph.gv").read_text())
    for name, p in params.items():  # every parameter is a leaf labelled with its name and shape
        assert f"{name}\n ({', '.join(map(str, p.shape))})" in labels.values()
    assert "MseLossBackward0" in labels.values()
    assert lines == [f"compute graph written to {stem}.gv; to draw it, install Graphviz (apt-get install graphviz, "
                     f"or brew install graphviz) and run: dot -Tpdf {stem}.gv -o {stem}.pdf"]
    assert not (tmp_path / "train_graph.pdf").exists()
    assert sorted(os.listdir(tmp_path)) == ["bin", "train_graph.gv"]  # no temporary left behind


def test_inference_graph_of_the_prediction(tiny, tmp_path, bin_dir):
    _, pred, params = tiny
    write_compute_graph(pred, params, str(tmp_path / "infer"), lambda _: None)
    labels, _ = parse_digraph((tmp_path / "infer.gv").read_text())
    assert "AddmmBackward0" in labels.values() and "MseLossBackward0" not in labels.values()


def test_with_dot_renders_a_pdf(tiny, tmp_path, bin_dir):
    fake_dot(bin_dir, 'test "$1" = -Tpdf && test -s "$2" && printf "%%PDF-1.4 fake" > "$4"')
    lines = []
    stem = str(tmp_path / "g")
    assert write_compute_graph(tiny[0], tiny[2], stem, lines.append) == [stem + ".gv", stem + ".pdf"]
    assert (tmp_path / "g.pdf").read_bytes() == b"%PDF-1.4 fake"
    assert lines == [f"compute graph written to {stem}.gv and {stem}.pdf"]


def test_failing_dot_is_a_warning_and_keeps_the_source(tiny, tmp_path, bin_dir):
    fake_dot(bin_dir, 'echo "Error: syntax error in line 1" >&2; exit 1')
    lines = []
    stem = str(tmp_path / "g")
    assert write_compute_graph(tiny[0], tiny[2], stem, lines.append) == [stem + ".gv"]
    assert lines == [f"warning: compute graph {stem}: dot -Tpdf failed (exit 1): Error: syntax error in line 1; "
                     f"only {stem}.gv written"]
    assert sorted(os.listdir(tmp_path)) == ["bin", "g.gv"]


def test_unwritable_directory_is_a_warning(tiny, tmp_path):
    lines = []
    stem = str(tmp_path / "missing-dir" / "g")
    assert write_compute_graph(tiny[0], tiny[2], stem, lines.append) == []
    assert lines == [f"warning: compute graph {stem}: cannot write it (No such file or directory); nothing written"]


def test_missing_torchviz_is_a_warning(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchviz", None)  # makes `import torchviz` raise ImportError
    lines = []
    assert write_compute_graph(tiny[0], tiny[2], str(tmp_path / "g"), lines.append) == []
    assert lines == ["warning: the compute graph needs torchviz (pip install torchviz); no graph written"]
    assert os.listdir(tmp_path) == []


def test_tensor_without_history_is_a_warning(tiny, tmp_path):
    _, pred, params = tiny
    lines = []
    stem = str(tmp_path / "g")
    assert write_compute_graph(pred.detach(), params, stem, lines.append) == []
    assert lines == [f"warning: compute graph {stem}: the tensor has no autograd history (computed under "
                     "torch.no_grad() or inference_mode?); nothing written"]
