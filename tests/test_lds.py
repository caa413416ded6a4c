"""LDS ground truth (Park et al. 2023, docs/protocol.md's sign convention) through the batched engine."""

import numpy as np
import pytest
from helpers import context_as_tests_see_it, scipy_logreg_test_losses

from influence_bench.groundtruth import GroundTruthStore, lds, lds_ground_truth, store_key
from influence_bench.groundtruth.compute import compute_lds
from influence_bench.scoring.runner import evaluate
from influence_bench.spec import catalog

IRIS = catalog.get_setting("iris-logreg-wd1e-3")


@pytest.fixture(scope="module")
def ctx():
    return context_as_tests_see_it(IRIS)


def test_subsets_are_seeded_halves_independent_of_chunking():
    spec = lds.LdsSpec(n_subsets=7, alpha=0.5, seed=3)
    m = lds.subset_masks(120, spec)
    assert m.shape == (7, 120) and (m.sum(1) == 60).all()
    np.testing.assert_array_equal(m, lds.subset_masks(120, spec))
    assert not (m[0] == m[1]).all()
    np.testing.assert_array_equal(m[:3], lds.subset_masks(120, lds.LdsSpec(n_subsets=3, seed=3)))
    assert not (m == lds.subset_masks(120, lds.LdsSpec(n_subsets=7, seed=4))).all()


def test_prediction_is_the_summed_influence_of_the_left_out_points():
    influence = np.array([[1.0, 2.0, 4.0], [0.0, -1.0, 3.0]])
    masks = np.array([[True, False, True], [False, False, True]])  # True = kept
    np.testing.assert_array_equal(lds.predicted_change(influence, masks), [[2.0, 3.0], [-1.0, -1.0]])


def test_subset_ground_truth_equals_independent_scipy_retraining(ctx):
    """Weighted logistic regression (left-out points weight 0, 1/n kept) by scipy's BFGS from zero."""
    n = ctx.n_train
    spec = lds.LdsSpec(n_subsets=4)
    masks = lds.subset_masks(n, spec)
    losses = scipy_logreg_test_losses(ctx, np.stack([np.ones(n), masks[1], masks[3]]).astype(float))
    want = losses[1:] - losses[0]
    got = compute_lds(ctx, np.array([1, 3]), spec)
    assert (got.converged == 1).all() and got.grad_norm.max() < 1e-9  # warm Newton's criterion (measured 4e-10)
    np.testing.assert_allclose(got.delta, want, atol=1e-7, rtol=1e-5)


def test_exact_influence_scores_high_lds_on_logistic_regression(ctx, tmp_path):
    store = GroundTruthStore(tmp_path)
    cases = evaluate("exact", IRIS, protocols=("lds",), store=store)
    sp = next(c for c in cases if c.metric == "spearman")
    assert sp.status == "ok" and sp.protocol == "lds" and sp.noise_ceiling == 1.0
    assert sp.value > 0.9, sp.per_test  # measured 0.960 (gradient-dot: 0.39); a sign error would make it negative
    key = store_key(ctx, "lds")
    assert len(store.load(key).ids) == lds.DEFAULT.n_subsets  # stored under its own key
    assert len(store.load(store_key(ctx, "loo")).ids) == 0
    np.testing.assert_array_equal(lds_ground_truth(ctx, store), store.load(key).lookup(np.arange(100)))
