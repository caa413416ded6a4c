"""Curvature and setting facts recorded with every case: dense and Lanczos paths agree, convex
settings have a Hessian bounded below by the weight decay, and the runner attaches the block."""

import json

import numpy as np
import pytest

from influence_bench.api.loading import get_context
from influence_bench.groundtruth import GroundTruthStore
from influence_bench.scoring import setting_info as si
from influence_bench.scoring.runner import evaluate
from influence_bench.scoring.setting_info import info_cache_path
from influence_bench.spec import catalog
from influence_bench.training.fit import model_cache_path


@pytest.mark.parametrize("route", ["explicit-hessian", "hvp"])
def test_lanczos_agrees_with_dense_eigenvalues(monkeypatch, route):
    ctx = get_context(catalog.get_setting("iris-mlp-d1-w16-wd1e-3"))
    dense = si.hessian_extremes(ctx, k=2)
    monkeypatch.setattr(si, "DENSE_EIG_MAX", 0)
    if route == "hvp":
        ctx = ctx.fresh()  # without the Hessian dense_eig formed
        monkeypatch.setattr(si, "EXPLICIT_HESSIAN_MAX", 0)
    lanczos = si.hessian_extremes(ctx, k=2)
    assert ctx.is_cached("hessian") == (route == "explicit-hessian")
    assert dense["method"] == "dense eigvalsh" and lanczos["method"].startswith("lanczos")
    # the extremes agree; further ones may not (Lanczos from one start vector can miss a repeated
    # eigenvalue: here the two smallest coincide)
    np.testing.assert_allclose(lanczos["top"][0], dense["top"][0], rtol=1e-6)
    np.testing.assert_allclose(lanczos["bottom"][0], dense["bottom"][0], rtol=1e-4, atol=1e-8)


def test_cases_carry_setting_info(tmp_path):
    setting = catalog.get_setting("iris-logreg-wd1e-3")
    cases = evaluate("exact", setting, store=GroundTruthStore(tmp_path))
    info = cases[0].diagnostics["setting_info"]
    assert all(c.diagnostics["setting_info"] == info for c in cases)
    eig = info["hessian_eigenvalues"]
    assert eig["top"][0] >= eig["top"][1] > 0
    assert eig["bottom"][0] >= setting.weight_decay * (1 - 1e-9)  # convex loss + weight decay
    assert info["test_points"]["highest_loss"] == cases[0].test_idx[0]
    assert info["n_params"] == 15 and info["train_grad_norm"] < 1e-9
    assert cases[0].diagnostics["solver"] == "cholesky"  # the estimator's own diagnostics stay
    json.dumps(cases[0].to_json(), allow_nan=False)
    ctx = get_context(setting)
    stored = json.loads(info_cache_path(ctx).read_text())
    assert stored["info"] == info  # kept beside theta*: a later run with shipped ground truth reads it
    assert stored["theta_sha256"] == ctx.theta_sha256 and stored["format"] == si.INFO_FORMAT  # verified on load
    assert ctx.theta_sha256[:16] in info_cache_path(ctx).name and \
        info_cache_path(ctx).parent == model_cache_path(setting).parent  # keyed by theta*
