"""`influence-bench bench ground-truth`: batched engine vs sequential loop, same numbers, both timed."""

import json

from influence_bench.cli import main


def test_bench_ground_truth_agrees_and_reports_ratio_and_gflops(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "ground-truth", "iris-logreg-wd1e-3", "--n", "6", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "speedup" in text and "GFLOP/s" in text and "agreement" in text
    r = json.loads(out.read_text())
    assert r["n_models"] == 7 and r["batched_s"] > 0 and r["sequential_s"] > 0
    assert r["max_abs_diff"] <= 1e-6 * r["max_abs_delta"]
    assert r["batched_gflop"] > 0 and r["matmul_gflops"] > 0


def test_bench_unknown_setting_is_a_clear_error(capsys):
    assert main(["bench", "ground-truth", "iris-mlp-d99"]) == 2
    assert "iris-mlp-d99" in capsys.readouterr().err
