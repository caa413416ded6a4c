"""Warm Newton with explicit batched Hessians (``training/newton_explicit.py``): the same ground
truth as the sequential Newton-CG reference, per-model stopping, indefinite Hessians handled as
the CG path handles them, and the size bound."""

import numpy as np
import pytest
import torch

from influence_bench.api.loading import get_context
from influence_bench.groundtruth import engine, recipes
from influence_bench.groundtruth.common import removal_weights
from influence_bench.spec import catalog
from influence_bench.training import newton, newton_explicit

REMOVED = np.array([0, 17, 50, 64, 97, 119])


@pytest.fixture(scope="module")
def logreg():
    return get_context(catalog.get_setting("iris-logreg-wd1e-3"))


@pytest.fixture(scope="module")
def mlp():
    return get_context(catalog.get_setting("iris-mlp-d1-w16-wd1e-3"))


def _hessian_error(ctx, thetas, weights) -> float:
    """Largest |H_b v - HVP_b(v)| / |HVP_b(v)| over random v: the formed Hessians against autograd."""
    args = (ctx.x_train, ctx.y_train, ctx.weight_decay)
    H = newton_explicit.weighted_hessians(ctx.fm, thetas, weights, *args)
    v = torch.randn(thetas.shape, dtype=thetas.dtype, generator=torch.Generator().manual_seed(0))
    want = newton.weighted_hvps(ctx.fm, thetas, weights, v, *args)
    return float(((H @ v[:, :, None]).squeeze(-1) - want).norm(dim=1).max() / want.norm(dim=1).min())


def _agreement(ctx, removed, batched="explicit") -> tuple[float, bool]:
    """(max |delta - delta_sequential| / max |delta_sequential|, whether every model's theta lies
    within what both stopping rules allow: ||theta - theta_seq|| <= (||g|| + ||g_seq||) / weight decay,
    the distance bound of a weight-decay-strongly-convex objective)."""
    rows = np.concatenate([[-1], removed])
    res, ref = engine.retrain(ctx, rows, batched=batched), engine.retrain(ctx, rows, batched=False)
    assert res.converged.all() and ref.converged.all()
    dist = (res.theta - ref.theta).norm(dim=1)
    within = bool((dist <= (res.grad_norm + ref.grad_norm) / ctx.weight_decay).all())
    d, d_ref = (engine.test_losses(ctx, t) for t in (res.theta, ref.theta))
    delta, delta_ref = (d[1:] - d[0]).numpy(), (d_ref[1:] - d_ref[0]).numpy()
    assert np.abs(delta_ref).max() > 1e-4  # the comparison is not between zeros
    return float(np.abs(delta - delta_ref).max() / np.abs(delta_ref).max()), within


def test_explicit_agrees_with_the_sequential_reference(logreg):
    rel, within = _agreement(logreg, REMOVED)
    # both stop at ||g|| <= ~3e-10 (theta*'s own gradient norm): that, not rounding, bounds the
    # agreement (measured 2.5e-7 here; batched Newton-CG against the same reference: 1.2e-7 on 20)
    assert within and rel <= 1e-6
    # the engine's default on a small softmax-linear model is this path, with the same numbers
    assert newton_explicit.applies(logreg.fm, logreg.n_params)
    default = engine.compute(logreg, REMOVED)
    np.testing.assert_array_equal(default.delta, engine.compute(logreg, REMOVED, batched="explicit").delta)


def test_formed_hessians_are_the_objectives(logreg, mlp, monkeypatch):
    """Closed form (softmax-linear) and autograd (MLP) Hessians against Hessian-vector products,
    per-row weights and weight decay included; a wrong sign fails the check, and makes exact
    Newton take more steps than the sequential Newton-CG (which it never does otherwise)."""
    g = torch.Generator().manual_seed(1)
    for ctx in (logreg, mlp):
        w = removal_weights(ctx.n_train, np.array([-1, 5, 60]), ctx.dtype, ctx.device)
        thetas = ctx.theta + 0.1 * torch.randn(3, ctx.n_params, dtype=ctx.dtype, generator=g)
        assert _hessian_error(ctx, thetas, w) < 1e-10
    rows = np.concatenate([[-1], REMOVED])
    steps_ref = engine.retrain(logreg, rows, batched=False).steps
    assert (engine.retrain(logreg, rows, batched="explicit").steps <= steps_ref).all()

    formed = newton_explicit.weighted_hessians
    monkeypatch.setattr(newton_explicit, "weighted_hessians", lambda *a: -formed(*a))
    w = removal_weights(logreg.n_train, np.array([-1, 5]), logreg.dtype, logreg.device)
    assert _hessian_error(logreg, logreg.theta.expand(2, -1), w) > 1.0
    assert (engine.retrain(logreg, rows, batched="explicit").steps > steps_ref).any()


def test_each_model_stops_on_its_own(logreg):
    """A model that meets the criterion at step k leaves the batch: its theta is bitwise the one a
    run capped at k steps returns, however many steps the others take; the control never moves."""
    rows = np.concatenate([[-1], np.arange(12)])
    full = engine.retrain(logreg, rows, batched="explicit")
    steps = full.steps.numpy()
    assert full.converged.all() and steps[0] == 0 and len(set(steps[1:])) > 1
    k = int(steps[1:].min())
    capped = engine.retrain_weights(logreg, removal_weights(logreg.n_train, rows, logreg.dtype, logreg.device),
                                    k, engine.removal_downdate(logreg, rows), batched="explicit")
    stopped = steps == k
    assert stopped[1:].any() and (steps > k).any()
    assert torch.equal(full.theta[torch.as_tensor(stopped)], capped.theta[torch.as_tensor(stopped)])
    assert torch.equal(full.theta[0], logreg.theta)


def test_indefinite_hessian_takes_the_cg_paths_step(mlp):
    """Where H + lam I is not positive definite the step is the CG path's truncated PCG (stopped at
    negative curvature) on the explicit matrix: the same step ``newton_cg_batched`` computes with
    Hessian-vector products. Positive definite rows get the exact damped Newton step."""
    ctx, lam = mlp, 1e-3
    g = torch.Generator().manual_seed(0)
    thetas = torch.stack([ctx.theta, ctx.theta + 0.3 * torch.randn(ctx.n_params, dtype=ctx.dtype, generator=g)])
    w = removal_weights(ctx.n_train, np.array([7, 7]), ctx.dtype, ctx.device)
    args = (ctx.x_train, ctx.y_train, ctx.weight_decay)
    H = newton_explicit.weighted_hessians(ctx.fm, thetas, w, *args)
    lams = torch.full((2,), lam, dtype=ctx.dtype)
    evals = torch.linalg.eigvalsh(H + lam * torch.eye(ctx.n_params, dtype=ctx.dtype))[:, 0]
    assert evals[0] > 0 > evals[1]  # one definite row, one indefinite
    grads = newton.weighted_grads(ctx.fm, thetas, w, *args)
    rtol = torch.clamp(grads.norm(dim=1).sqrt(), max=0.1)
    precond = recipes.preconditioner(ctx)
    s = newton_explicit._steps(ctx.fm, thetas, w, grads, lams, *args, lambda r, bad: precond.solve(r),
                               ctx.setting.ground_truth.cg_iters, rtol)
    exact = torch.linalg.solve(H[0] + lam * torch.eye(ctx.n_params, dtype=ctx.dtype), grads[0])
    torch.testing.assert_close(s[0], exact, rtol=1e-9, atol=1e-12)
    cg = newton._pcg(lambda v: newton.weighted_hvps(ctx.fm, thetas[1:], w[1:], v, *args) + lam * v, grads[1:],
                     precond.solve, ctx.setting.ground_truth.cg_iters, rtol[1:])
    torch.testing.assert_close(s[1], cg[0], rtol=1e-7, atol=1e-10)
    assert float((s[1] * grads[1]).sum()) > 0  # still a descent direction


def test_size_bound_sends_larger_models_to_cg(logreg, mlp, monkeypatch):
    rows = np.concatenate([[-1], REMOVED[:3]])
    cg = engine.retrain(logreg, rows, batched="cg")
    monkeypatch.setattr(newton_explicit, "EXPLICIT_NEWTON_MAX", logreg.n_params - 1)
    assert not newton_explicit.applies(logreg.fm, logreg.n_params)
    assert torch.equal(engine.retrain(logreg, rows).theta, cg.theta)  # the default is now Newton-CG
    with pytest.raises(ValueError, match="EXPLICIT_NEWTON_MAX"):
        engine.retrain(logreg, rows, batched="explicit")
    # MLPs keep Newton-CG by default (their autograd Hessians cost ~P HVPs a step), explicit on request
    monkeypatch.undo()
    assert newton_explicit.can_form(mlp.n_params) and not newton_explicit.applies(mlp.fm, mlp.n_params)
