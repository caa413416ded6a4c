"""`influence-bench bench ground-truth`: batched engine vs sequential loop, same numbers, both timed."""

import json

from influence_bench.cli.main import main


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


def test_bench_minibatch_recipe_times_vmap_against_torch_optim():
    import numpy as np
    from helpers import blobs, minibatch_setting

    from influence_bench.api.loading import build_context
    from influence_bench.groundtruth.bench import bench_ground_truth, format_bench

    ctx = build_context(minibatch_setting(), blobs(96, 24), use_cache=False)
    r = bench_ground_truth(ctx, np.arange(5))
    assert r.n_models == 6 and r.vmap_s == r.batched_s and r.engine_choice == "vmap"
    assert r.max_abs_diff <= 1e-9 * max(r.max_abs_delta, 1e-12) + 1e-12
    assert "engine default" in format_bench(r)
