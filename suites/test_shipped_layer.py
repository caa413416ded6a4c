"""The suites read the ground truth shipped with the checkout: a fresh checkout retrains nothing
that `results/ground-truth` holds (unless the user points $INFLUENCE_BENCH_SHIPPED_GT elsewhere)."""

import os

import pytest

from influence_bench import catalog, paths
from influence_bench.context import get_context
from influence_bench.groundtruth import GroundTruthStore, build, engine
from influence_bench.runner import fixed_removals

# read at collection, before any fixture of another directory can change the environment
SHIPPED_ENV_AT_START = os.environ.get("INFLUENCE_BENCH_SHIPPED_GT")


def test_suites_read_the_checkouts_shipped_ground_truth(monkeypatch):
    if SHIPPED_ENV_AT_START is not None:
        pytest.skip(f"$INFLUENCE_BENCH_SHIPPED_GT={SHIPPED_ENV_AT_START!r} set by the user")
    store = GroundTruthStore()
    assert store.shipped == paths.repo_root() / "results" / "ground-truth"

    def no_retraining(*a, **k):
        raise AssertionError("shipped ground truth was retrained")

    monkeypatch.setattr(engine, "compute", no_retraining)
    ctx = get_context(catalog.get_setting("iris-logreg-wd1e-3"))
    assert build(ctx, "loo", fixed_removals(ctx), store, cols=ctx.test_idx).delta.shape == (120, ctx.n_test)
