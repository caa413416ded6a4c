"""Cost-bounded curvature: estimators built on Hessian-vector products refuse, with an estimate, when
their products would exceed max_seconds on this machine, and the curvature record falls back to the
top eigenvalues only."""

import dataclasses

import pytest
from helpers import blobs, minibatch_setting

from influence_bench.api.context import HVP_COST_MODEL
from influence_bench.api.estimator import EstimatorUnsupported
from influence_bench.api.loading import build_context
from influence_bench.api.registry import REGISTRY
from influence_bench.scoring import setting_info


@pytest.fixture
def ctx():
    return build_context(minibatch_setting(optimizer="lbfgs+newton", retrain="newton-cg", replicates=1),
                         blobs(96, 24), use_cache=False)


def test_hvp_cost_is_modelled_once_from_counted_flops(ctx):
    t = ctx.hvp_seconds()
    overhead, rate = HVP_COST_MODEL["cpu"]
    assert t == overhead + ctx.hvp_flops() / rate and ctx.hvp_seconds() == t
    assert ctx.hvp_flops() > 0


def test_hvp_cost_does_not_depend_on_the_machines_load(ctx, monkeypatch):
    """A product that takes a second (a loaded machine) is modelled like an instant one: the set of
    cases that run depends on the code, the setting and the device class only."""
    import time

    from influence_bench.curvature import products

    real = products.hvp

    def slow(*a, **k):
        time.sleep(1.0)
        return real(*a, **k)

    fresh = dataclasses.replace(ctx, _cache={})  # nothing counted or modelled yet
    want = ctx.hvp_seconds()
    monkeypatch.setattr(products, "hvp", slow)
    assert fresh.hvp_seconds() == want


@pytest.mark.parametrize("name", ["exact", "cg", "arnoldi", "lissa"])
def test_hvp_estimators_refuse_beyond_their_budget_with_the_estimate(ctx, name):
    ctx = ctx.with_cached("hvp_seconds", 10.0)  # as if one product took 10 s (a CNN on CPU)
    with pytest.raises(EstimatorUnsupported, match=rf"{name} on 'test-minibatch-warm'.*Hessian-vector products.*"
                                                   r"max_seconds=120.*GPU"):
        REGISTRY.create(name).influence(ctx)
    REGISTRY.create(name, max_seconds=1e9).influence(ctx)  # a raised budget runs it


def test_curvature_record_falls_back_to_top_eigenvalues(ctx):
    ctx = ctx.with_cached("hvp_seconds", 10.0)
    info = setting_info.hessian_extremes(ctx)
    assert info["bottom"] is None and "top only" in info["method"] and len(info["top"]) == 3
    ctx = ctx.with_cached("hvp_seconds", 1e-4)
    dense = setting_info.hessian_extremes(ctx)
    assert abs(dense["top"][0] - info["top"][0]) < 1e-6 * abs(dense["top"][0])  # 10 Lanczos steps suffice here
