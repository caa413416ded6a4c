"""`influence-bench bench ground-truth`: batched engine vs sequential loop, same numbers, both timed."""

import json

import numpy as np

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
    # every warm-Newton path, each with its ratio, GFLOP/s against the matmul's, and agreement
    names = [p["name"] for p in r["paths"]]
    assert names == ["explicit Hessian", "Newton-CG batched", "sequential loop"]
    assert r["engine_choice"] == "explicit Hessian" and [p["default"] for p in r["paths"]] == [True, False, False]
    for p in r["paths"]:
        assert p["seconds"] > 0 and p["gflop"] > 0 and p["max_abs_diff"] <= 1e-6 * r["max_abs_delta"]
        assert abs(p["speedup"] - r["sequential_s"] / p["seconds"]) <= 1e-9 * p["speedup"]
        assert abs(p["matmul_fraction"] - p["gflops"] / r["matmul_gflops"]) <= 1e-12
        assert p["name"] in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_explicit_path_counts_its_factorisations(monkeypatch):
    """The explicit path's FLOPs are the counter's plus P^3/3 + 2 P^2 per model and step (the
    Cholesky factor and solves the counter does not see); the CG path gets no such term."""
    from influence_bench.api.loading import get_context
    from influence_bench.groundtruth import engine
    from influence_bench.groundtruth.bench import _count_gflop
    from influence_bench.spec import catalog
    from influence_bench.training import newton_explicit

    ctx = get_context(catalog.get_setting("iris-logreg-wd1e-3"))
    removed = np.array([3, 40])
    steps = int(engine.retrain(ctx, np.concatenate([[-1], removed]), batched="explicit").steps.sum())
    assert steps > 0 and newton_explicit.step_flops(15) == 15 ** 3 / 3 + 2 * 15 ** 2
    counted = {b: _count_gflop(ctx, removed, b) for b in ("explicit", "cg")}
    monkeypatch.setattr(newton_explicit, "step_flops", lambda p: 1e9)  # 1 GFLOP per model and step
    assert abs(_count_gflop(ctx, removed, "explicit") - counted["explicit"] - steps) < 1e-3
    assert _count_gflop(ctx, removed, "cg") == counted["cg"]


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
    assert r.n_models == 6 and r.vmap_s == r.batched_s and r.engine_choice == "batched (vmap)"
    assert r.max_abs_diff <= 1e-9 * max(r.max_abs_delta, 1e-12) + 1e-12
    assert "engine default" in format_bench(r)


def test_a_path_that_runs_out_of_steps_fails_the_bench_and_is_left_out_of_agreement(monkeypatch, capsys):
    """A batched path that stops every model short of the stopping rule (here: one step allowed)
    cannot pass on agreement computed over nothing: it fails, naming the path and the count."""
    from influence_bench.training import newton_explicit

    real = newton_explicit.newton_explicit_batched

    def starved(fm, theta0, weights, x, y, wd, precond, max_steps, *a, **kw):
        return real(fm, theta0, weights, x, y, wd, precond, 1, *a, **kw)

    monkeypatch.setattr(newton_explicit, "newton_explicit_batched", starved)
    assert main(["bench", "ground-truth", "iris-logreg-wd1e-3", "--n", "6"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: explicit Hessian: 6 of 6 models ran out of steps that converged in the sequential loop" in out
    assert "FAIL: explicit Hessian: no model converged" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("explicit Hessian"))
    assert row.split()[-1] == "6"  # the unconv column


def test_problems_reads_the_lost_share():
    from influence_bench.groundtruth.bench import LOST_SHARE, GroundTruthBench, PathTiming, problems

    def bench(lost):
        p = PathTiming("batched", 1.0, 2.0, 1.0, 1.0, 0.01, 0.0, True, not_converged=lost + 3, lost=lost)
        s = PathTiming("sequential loop", 2.0, 1.0, 1.0, 0.5, 0.005, 0.0, False, not_converged=3)
        return GroundTruthBench("s", 101, 1.0, 2.0, 2.0, 0.0, 1.0, 1.0, 1.0, 100.0, paths=[p, s])

    assert problems(bench(int(LOST_SHARE * 100)), 1e-6) == []
    assert problems(bench(int(LOST_SHARE * 100) + 1), 1e-6) == [
        "batched: 6 of 100 models ran out of steps that converged in the sequential loop (more than 5%)"]


def test_the_default_agreement_tolerance_follows_the_settings_dtype(monkeypatch, capsys):
    """1e-6 of the largest |delta| for float64 settings, 1e-4 for float32 ones; --rtol overrides."""
    from influence_bench.groundtruth import bench

    seen = []
    monkeypatch.setattr(bench, "problems", lambda r, rtol: seen.append(rtol) or [])
    assert main(["bench", "ground-truth", "iris-logreg-wd1e-3", "--n", "2"]) == 0
    assert main(["bench", "ground-truth", "iris-logreg-wd1e-3", "--n", "2", "--rtol", "1e-9"]) == 0
    assert seen == [1e-6, 1e-9]
