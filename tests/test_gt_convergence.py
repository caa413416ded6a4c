"""Ground truth that converged, or says so: warm Newton runs to its relative gradient criterion,
every stored row records whether it converged, and scoring leaves unconverged removals out."""

import dataclasses
import json

import numpy as np
import pytest

from influence_bench.api.loading import get_context
from influence_bench.cli.main import main
from influence_bench.groundtruth import GroundTruthStore, engine
from influence_bench.groundtruth.convergence import convergence, start_grad_norms
from influence_bench.groundtruth.entries import CONVERGED, UNCONVERGED, UNKNOWN, Entries
from influence_bench.groundtruth.recipes import GRAD_RTOL, recipe_for
from influence_bench.groundtruth.store import StoreKey
from influence_bench.paths import write_npz
from influence_bench.reporting.table import fidelity_table
from influence_bench.scoring.protocols import compare
from influence_bench.scoring.runner import evaluate_context
from influence_bench.spec import catalog


@pytest.fixture(scope="module")
def mlp():
    return get_context(catalog.get_setting("iris-mlp-d1-w16-wd1e-3"))


def _budget(ctx, steps: int):
    s = ctx.setting
    return dataclasses.replace(ctx, setting=dataclasses.replace(
        s, ground_truth=dataclasses.replace(s.ground_truth, max_steps=steps)), _cache={})


def test_warm_newton_reaches_its_relative_criterion(mlp):
    removed = np.array([0, 17, 64, 119])
    res = engine.retrain(mlp, np.concatenate([[-1], removed]))
    start = start_grad_norms(mlp, removed)
    assert res.converged.all()
    gt = mlp.setting.ground_truth
    assert (res.grad_norm[1:].numpy() <= np.maximum(GRAD_RTOL * start, gt.grad_tol)).all()
    assert (res.steps.numpy() < gt.max_steps).all()
    entries = engine.compute(mlp, removed)
    assert (entries.converged == CONVERGED).all()


def test_tiny_step_budget_is_recorded_unconverged_and_excluded_from_scoring(mlp, tmp_path):
    tiny = _budget(mlp, 1)
    store = GroundTruthStore(tmp_path, shipped=None)
    influence = np.asarray(np.random.default_rng(0).normal(size=(tiny.n_test, tiny.n_train)))
    c = compare(influence, tiny, "loo-fixed", store)
    stored = store.load(engine_key(tiny))
    n_bad = int((stored.converged == UNCONVERGED).sum())
    assert n_bad > 0 and (stored.converged != UNKNOWN).all()  # recorded, and stored
    assert c.n_unconverged_excluded == n_bad
    assert c.predicted.shape == c.actual.shape == (tiny.n_test, tiny.n_train - n_bad)
    top = compare(influence, tiny, "loo-topk", store)
    assert top.keep is not None and top.n_unconverged_excluded > 0
    # the failure path end to end: the case says how many removals it left out, the table shows it
    cases = evaluate_context("exact", tiny, ("loo-fixed",), store, info={})
    assert {c.n_unconverged_excluded for c in cases} == {n_bad}
    assert cases[0].to_json()["n_unconverged_excluded"] == n_bad
    assert f"~{n_bad}" in fidelity_table(cases)
    # with the setting's own budget nothing is left out
    assert compare(influence, mlp, "loo-fixed", GroundTruthStore(tmp_path / "full")).n_unconverged_excluded == 0


def engine_key(ctx):
    from influence_bench.groundtruth.keys import store_key

    return store_key(ctx, "loo")


def test_shards_without_the_flag_load_as_unknown_and_flags_follow_rows(tmp_path):
    key = StoreKey("s", "warm", "loo", {"x": 1}, 2)
    flags = np.array([CONVERGED, UNCONVERGED, CONVERGED], np.int8)
    e = Entries(np.arange(3), np.arange(6.0).reshape(3, 2), np.zeros(3), np.ones(3, np.int64), converged=flags)
    store = GroundTruthStore(tmp_path, shipped=None)
    store.save_chunk(key, e)
    got = store.load(key)
    np.testing.assert_array_equal(got.converged, flags)
    np.testing.assert_array_equal(got.select(np.array([1, 0])).converged, [UNCONVERGED, CONVERGED])
    np.testing.assert_array_equal(got.restrict(np.array([1])).converged, flags)
    # a shard written before the flag existed
    arrays, meta = GroundTruthStore.shard_payload(key, Entries(np.array([5]), np.ones((1, 2)), np.zeros(1),
                                                               np.ones(1, np.int64)))
    del arrays["converged"], meta["sha256"]["converged"]
    write_npz(store.dir(key) / "shard-old.npz", meta=np.array(json.dumps(meta)), **arrays)
    merged = store.load(key)
    np.testing.assert_array_equal(merged.select(np.array([5, 1])).converged, [UNKNOWN, UNCONVERGED])
    assert not merged.select(np.array([5])).unconverged.any()  # unknown is not known-unconverged
    assert store.info(key)["convergence_unknown"] == 1 and store.info(key)["unconverged"] == 1


def test_minibatch_recipes_keep_their_engine_version():
    """Bumping warm-newton must not move the store keys of the shipped minibatch (CNN) ground truth."""
    from influence_bench.groundtruth.recipes import ENGINE_VERSION, TABLE, WARM_NEWTON_VERSION

    assert ENGINE_VERSION == "warm-newton-cg/2" and WARM_NEWTON_VERSION != ENGINE_VERSION
    assert {r.version for (m, k), r in TABLE.items() if m != "pbrf" and r.name != "warm-newton"} == {ENGINE_VERSION}


def test_convergence_table_of_a_store(capsys, tmp_path):
    from influence_bench.groundtruth.builder import build

    ctx = get_context(catalog.get_setting("iris-logreg-wd1e-3"))
    assert recipe_for(ctx).name == "warm-newton"
    store = GroundTruthStore(tmp_path, shipped=None)
    build(ctx, "loo", np.arange(ctx.n_train), store, cols=ctx.test_idx)
    row = convergence(ctx, store)
    assert row.removals == row.converged == ctx.n_train and row.unknown == 0
    assert row.max_rel_grad_norm <= GRAD_RTOL or row.max_grad_norm <= ctx.setting.ground_truth.grad_tol
    assert main(["ground-truth", "convergence", "iris-logreg-wd1e-3", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "max rel" in out and "iris-logreg-wd1e-3" in out and "warm-newton" in out


def test_a_constant_prediction_scores_zero_not_undefined():
    """An estimator returning a constant row where the ground truth varies cannot drop that test
    point from its mean: it counts as 0 (no ranking); a constant ground truth stays undefined."""
    import numpy as np

    from influence_bench import metrics
    from influence_bench.scoring.protocols import Comparison, per_test

    pred = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    act = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0], [5.0, 5.0, 5.0]])
    got = per_test(metrics.spearman, Comparison(pred, act, 1.0))
    assert got[0] == 1.0 and got[1] == 0.0 and np.isnan(got[2])
    agg = metrics.aggregate(got)
    assert agg.n == 2 and agg.mean == 0.5
