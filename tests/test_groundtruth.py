import numpy as np
import pytest
from helpers import scipy_logreg_test_losses

from influence_bench.api.loading import get_context
from influence_bench.groundtruth import GroundTruthStore, engine, ground_truth
from influence_bench.spec import catalog


@pytest.fixture(scope="module")
def iris_logreg():
    return get_context(catalog.get_setting("iris-logreg-wd1e-3"))


@pytest.fixture(scope="module")
def iris_mlp():
    return get_context(catalog.get_setting("iris-mlp-d1-w16-wd1e-3"))


def test_batched_retraining_equals_sequential_loop(iris_mlp):
    removed = np.array([0, 7, 33, 64, 101, 119])
    batched = engine.compute(iris_mlp, removed, batched=True)
    sequential = engine.compute(iris_mlp, removed, batched=False)
    np.testing.assert_allclose(batched.delta, sequential.delta, atol=1e-6, rtol=0)
    assert np.abs(batched.delta).max() > 1e-4  # the comparison is not between zeros
    # chunking over models changes nothing
    chunked = engine.compute(iris_mlp, removed, chunk=2)
    np.testing.assert_allclose(chunked.delta, batched.delta, atol=1e-10, rtol=0)


def test_convex_ground_truth_equals_independent_scipy_retraining(iris_logreg):
    """Retrain from scratch with scipy's BFGS on a numpy objective: the exact LOO optimum."""
    ctx = iris_logreg
    n = ctx.n_train
    removed = np.array([3, 50, 97])
    weights = np.ones((1 + len(removed), n))
    weights[1 + np.arange(len(removed)), removed] = 0  # row 0: nothing removed (the control)
    losses = scipy_logreg_test_losses(ctx, weights)
    want = losses[1:] - losses[0]
    got = engine.compute(ctx, removed).delta
    np.testing.assert_allclose(got, np.array(want), atol=1e-8, rtol=1e-5)


def test_store_caches_and_computes_only_missing(iris_logreg, tmp_path, monkeypatch):
    store = GroundTruthStore(tmp_path)
    calls = []
    real = engine.compute
    monkeypatch.setattr(engine, "compute", lambda ctx, rem, **kw: calls.append(list(rem)) or real(ctx, rem, **kw))
    a = ground_truth(iris_logreg, np.array([5, 1, 9]), store)
    b = ground_truth(iris_logreg, np.array([9, 2, 5]), store)
    assert calls == [[1, 5, 9], [2]]
    np.testing.assert_array_equal(a[[2, 0]], b[[0, 2]])  # same index, same numbers, any order
    ground_truth(iris_logreg, np.array([1, 2]), store)
    assert len(calls) == 2


def test_out_of_range_removal_is_a_clear_error(iris_logreg, tmp_path):
    with pytest.raises(IndexError, match="iris-logreg-wd1e-3.*removed indices must lie in"):
        ground_truth(iris_logreg, np.array([0, 500]), GroundTruthStore(tmp_path))


def test_warm_ground_truth_is_deterministic(iris_mlp):
    a = engine.compute(iris_mlp, np.array([4, 8]))
    b = engine.compute(iris_mlp, np.array([4, 8]))
    np.testing.assert_array_equal(a.delta, b.delta)

