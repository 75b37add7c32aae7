"""bench/bench_inference.py on the CLI's tiny default model: the table's rows and columns, the
model sizes (counted by hand) and fp32 against itself. No timing is asserted."""
import json

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
