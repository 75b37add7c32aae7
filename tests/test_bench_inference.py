"""bench/bench_inference.py on the CLI's tiny default model: the table's rows and columns, the
model sizes (counted by hand) and fp32 against itself. No timing is asserted."""
import json

import pytest

from bench import bench_inference

# tables 4-3-2 with D=2 (9 rows); bottom 4-3-2 and top 8-4-2-1 hold 23 + 49 = 72 float32 values
MLP_BYTES = 72 * 4
EXPECTED_BYTES = {
    "fp32": 9 * 2 * 4 + MLP_BYTES,
    "emb-8bit": 9 * (2 + 4 + 4) + MLP_BYTES,  # a byte per value, float32 scale and bias per row
    "emb-4bit": 9 * (1 + 2 + 2) + MLP_BYTES,  # two values per byte, float16 scale and bias per row
}


def test_quick_sweep_table(tmp_path, capsys):
    json_path, md_path = tmp_path / "inf.json", tmp_path / "inf.md"
    code = bench_inference.main(["--quick", "--batch-sizes", "1,4", "--json", str(json_path),
                                 "--markdown", str(md_path)])
    assert code == 0
    report = json.loads(json_path.read_text())
    rows = {(r["variant"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {(v, n) for v in bench_inference.VARIANTS for n in (1, 4)}
    for (variant, n), r in rows.items():
        assert 2 <= r["iters"] == len(r["times_ms"]) <= 6
        assert r["samples_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"]
        assert 0.0 <= r["mean_abs_diff"] <= r["max_abs_diff"] < 0.05
        assert 0.0 <= r["agreement"] <= 1.0
        if variant in EXPECTED_BYTES:
            assert r["model_bytes"] == EXPECTED_BYTES[variant]
    for n in (1, 4):
        fp32 = rows[("fp32", n)]
        assert fp32["max_abs_diff"] == 0.0 and fp32["agreement"] == 1.0
        assert rows[("int8-mlp", n)]["model_bytes"] < fp32["model_bytes"]
    markdown = md_path.read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0] == "| " + " | ".join(bench_inference.COLUMNS) + " |"
    assert len(table) == 1 + 4 * 2
    assert all(line.count("|") == len(bench_inference.COLUMNS) + 1 for line in table)
    assert markdown.strip() in capsys.readouterr().out


def test_unknown_variant_is_an_error(capsys):
    assert bench_inference.main(["--quick", "--batch-sizes", "2", "--variants", "fp32,fp8"]) == 2
    assert "unknown variant 'fp8'" in capsys.readouterr().err


def test_kaggle_model_is_the_default():
    flags = bench_inference.model_flags(["--numpy-rand-seed=3"], quick=False)
    assert flags[:-1] == list(bench_inference.KAGGLE_MODEL_FLAGS) and flags[-1] == "--numpy-rand-seed=3"
    own = ["--arch-sparse-feature-size=4"]
    assert bench_inference.model_flags(own, quick=False) == own


def test_tables_served_from_files_predict_what_memory_predicts(tmp_path):
    """--stores: the model with its tables in files behind caches of 0, 50 and 100 % of their rows
    predicts fp32's probabilities exactly, and leaves its store directory empty."""
    json_path, store = tmp_path / "inf.json", tmp_path / "store"
    store.mkdir()
    code = bench_inference.main(["--quick", "--batch-sizes", "1,4", "--variants", "fp32", "--stores",
                                 "memory,disk:0,disk:50,disk:100", f"--embedding-store-dir={store}", "--warm-batches", "2",
                                 "--json", str(json_path)])
    assert code == 0
    rows = {(r["variant"], r["batch"]): r for r in json.loads(json_path.read_text())["rows"]}
    assert set(rows) == {(v, n) for v in ("fp32", "disk 0%", "disk 50%", "disk 100%") for n in (1, 4)}
    for r in rows.values():
        assert r["max_abs_diff"] == 0.0 and r["agreement"] == 1.0
    # in RAM: the MLPs, and a cache of 0, 4 and 9 of the 9 rows (D=2, float32, no optimizer state)
    assert [rows[(f"disk {p}%", 1)]["model_bytes"] for p in (0, 50, 100)] == [MLP_BYTES + r * 8 for r in (0, 4, 9)]
    assert list(store.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["--stores", "disk:150"], "--stores: 'disk:150' is neither memory nor disk:P"),
    (["--stores", "ssd"], "--stores: 'ssd' is neither memory nor disk:P"),
    (["--stores", "memory,disk:10"], "--stores with disk entries needs --variants=fp32"),
])
def test_bad_stores_are_an_error(capsys, argv, message):
    assert bench_inference.main(["--quick", "--batch-sizes", "2", *argv]) == 2
    assert message in capsys.readouterr().err
