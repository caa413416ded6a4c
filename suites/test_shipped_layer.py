"""The suites read the ground truth shipped with the checkout: a fresh checkout retrains nothing
that `results/ground-truth` holds (unless the user points $INFLUENCE_BENCH_SHIPPED_GT elsewhere)."""

import os

import pytest

from influence_bench import paths
from influence_bench.api.loading import get_context
from influence_bench.groundtruth import GroundTruthStore, build, engine
from influence_bench.scoring.runner import fixed_removals
from influence_bench.spec import catalog

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


@pytest.mark.parametrize("setting", catalog.select(tier="smoke"), ids=lambda s: s.id)
def test_smoke_setting_trains_and_retrains_nothing(setting, request):
    """Every smoke setting ships theta* beside its ground truth: on a fresh machine with an empty
    cache it is scored against exactly the model its ground truth was computed from, and its
    loo-fixed ground truth (every replicate) is served without retraining. (The fidelity cases
    fail, too, when a built-in estimator's top-k removals are not shipped.)"""
    from influence_bench import tally
    from influence_bench.data.datasets import DataUnavailable
    from influence_bench.training import shipped as shipped_models

    if SHIPPED_ENV_AT_START is not None:
        pytest.skip(f"$INFLUENCE_BENCH_SHIPPED_GT={SHIPPED_ENV_AT_START!r} set by the user")
    root = paths.shipped_gt_dir()
    fix = f"ship it: influence-bench ground-truth ship {setting.id} (then commit {root})"
    assert shipped_models.path_for(setting, root).is_file(), f"{setting.id}: no theta* shipped; {fix}"
    before = tally.snapshot()
    try:
        ctx = get_context(setting)
    except DataUnavailable as exc:
        if request.config.getoption("--require-data"):
            pytest.fail(f"{setting.id}: {exc}", pytrace=False)
        pytest.skip(f"{setting.id}: {exc}")
    assert ctx.theta_source == "shipped", f"{setting.id}: theta* was {ctx.theta_source}, not shipped; {fix}"
    gt = build(ctx, "loo", fixed_removals(ctx), GroundTruthStore(), cols=ctx.test_idx)
    assert gt.delta.shape == (len(fixed_removals(ctx)), ctx.n_test)
    assert not tally.since(before), f"{setting.id}: {dict(tally.since(before))}; {fix}"
