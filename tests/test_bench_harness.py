"""bench/harness.py: the FLOP count, the line parser, the statistics and a --quick run end to end.
No timing is asserted: the numbers only have to be there and be consistent."""
import json

import pytest

from bench import harness
from helpers.models import tiny_model_config


def test_step_flops_matches_a_hand_count():
    # tables 4-3-2 (T=3), D=2, bottom 4-3-2, top 8-4-2-1, dot interaction, batch 2
    cfg = tiny_model_config()
    b = 2
    bottom = [4 * 3, 3 * 2]          # multiply-adds per sample, per layer
    top = [8 * 4, 4 * 2, 2 * 1]
    interaction = 4 * 4 * 2          # F x F x D with F = T + 1 = 4
    forward = 2 * b * (sum(bottom) + sum(top) + interaction)
    # backward: weight and input gradients (2 GEMMs) per layer, but only the weight gradient for
    # the first bottom layer; the interaction's product has two products in backward
    backward = 2 * b * (bottom[0] + 2 * bottom[1] + 2 * sum(top) + 2 * interaction)
    flops = harness.step_flops(cfg, b)
    assert (forward, backward) == (368, 688)
    assert flops["forward"] == forward
    assert flops["backward"] == backward
    assert flops["total"] == forward + backward
    assert flops["interaction_forward"] == 2 * b * interaction


def test_step_flops_cat_interaction_has_no_products():
    cfg = tiny_model_config(interaction="cat", top_mlp=(8, 4, 2, 1))
    flops = harness.step_flops(cfg, 3)
    assert flops["interaction_forward"] == 0
    assert flops["forward"] == flops["mlp_forward"] == 2 * 3 * (18 + 42)


@pytest.mark.parametrize("line, expected", [
    ("Finished training it 3/10 of epoch 0, 123.45 ms/it, loss 0.123456", (3, 10, 0, 123.45, 0.123456)),
    ("Finished training it 12/12 of epoch 2, 7.00 ms/it, loss 0.693147 (17:30)", (12, 12, 2, 7.0, 0.693147)),
    ("Finished training it 1/5 of epoch 0, -1.00 ms/it, loss 0.250000", (1, 5, 0, -1.0, 0.25)),
])
def test_parse_train_line(line, expected):
    parsed = harness.parse_train_line(line)
    assert (parsed.step, parsed.nbatches, parsed.epoch, parsed.ms, parsed.loss) == expected


def test_parse_train_line_ignores_other_lines():
    assert harness.parse_train_line("Testing at - 10/10 of epoch 0,") is None
    assert harness.parse_train_line("time/loss/accuracy (if enabled):") is None
    nan = harness.parse_train_line("Finished training it 2/4 of epoch 0, 5.00 ms/it, loss nan")
    assert nan.ms == 5.0 and nan.loss != nan.loss


def test_data_time_is_line_gap_minus_compute():
    # lines at 1.0, 1.5, 2.1 s; printed compute 400, 450, 500 ms; the first line is warm-up
    run = harness.Run(ms=[400.0, 450.0, 500.0], stamps=[1.0, 1.5, 2.1], wall_s=3.0, peak_rss_mib=100.0)
    ms, gaps = harness.after_warmup(run, warmup=1)
    assert ms == [450.0, 500.0]
    assert gaps == pytest.approx([500.0, 600.0])
    summary = harness.summarize([run], warmup=1, batch=10)
    assert summary["data_ms"]["median"] == pytest.approx(75.0)
    assert summary["samples_per_s"] == pytest.approx(1000 * 10 / 475.0)
    assert summary["startup_s"] == 1.0


def test_flag_sets_may_start_with_dashes():
    argv = ["--a", "--embedding-backend=plain", "--b", "--x=1 --y", "--quick"]
    assert harness.join_flag_sets(argv) == ["--a=--embedding-backend=plain", "--b=--x=1 --y", "--quick"]


@pytest.mark.slow
def test_quick_run_writes_json_and_markdown(tmp_path, capsys):
    json_path, md_path = tmp_path / "r.json", tmp_path / "r.md"
    code = harness.main(["--quick", "--configs", "tiny", "--a", "--embedding-backend=plain",
                         "--script-b", harness.DEFAULT_SCRIPT, "--b", "--embedding-backend=auto",
                         "--json", str(json_path), "--markdown", str(md_path)])
    assert code == 0
    report = json.loads(json_path.read_text())
    machine = report["machine"]
    for dtype in ("fp32", "bf16"):
        assert machine["gemm"][dtype]["peak_gflops"] > 0
    assert machine["bandwidth"]["copy_GBps"] > 0 and machine["bandwidth"]["gather_GBps"] > 0
    entry = report["configs"]["tiny"]
    tiny = harness.CONFIGS["tiny"]
    for key in ("A", "B"):
        v = entry["variants"][key]
        s = v["summary"]
        assert s["ms"]["n"] == tiny.num_batches - tiny.warmup
        assert s["ms"]["q1"] <= s["ms"]["median"] <= s["ms"]["q3"]
        for name in ("samples_per_s", "startup_s", "wall_s", "peak_rss_mib"):
            assert s[name] > 0
        assert "median" in s["data_ms"]
        assert v["counts"]["flops"]["total"] == harness.step_flops(tiny_model_config(), 16)["total"]
        assert v["counts"]["embedding"]["lookups"] >= v["counts"]["embedding"]["unique_rows"] > 0
        for name in ("achieved_gflops", "fraction_of_peak", "emb_GBps", "fraction_of_bandwidth", "rest_ms"):
            assert name in v["where"]
        assert len(v["runs"]) == 1 and len(v["runs"][0]["ms"]) == tiny.num_batches
    assert entry["comparison"]["speedup_b_over_a"] > 0
    markdown = md_path.read_text()
    assert "| " + " | ".join(harness.COLUMNS) + " |" in markdown
    assert "| A: --embedding-backend=plain |" in markdown
    assert "| B: " in markdown
    assert "Speed-up of B over A" in markdown and "Where the step goes" in markdown
    assert markdown.strip() in capsys.readouterr().out
