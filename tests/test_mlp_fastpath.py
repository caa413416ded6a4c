"""The hand-written batched tanh-MLP path (``curvature/mlp.py``) against torch.func on the module
itself: objectives, gradients and exact Hessian-vector products over depths, widths, losses and
removal weights; and which models it takes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import grad, jvp, vmap

from influence_bench.curvature import mlp as fast
from influence_bench.curvature import products
from influence_bench.models.flat import FlatModel, LogisticRegression, mlp
from influence_bench.training import newton, newton_explicit


def _problem(depth, width, loss, n, B, seed):
    g = torch.Generator().manual_seed(seed)
    fm = FlatModel(mlp(4, 3, depth, width).double(), loss)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = (torch.randint(0, 3, (n,), generator=g) if loss == "cross_entropy"
         else torch.randn(n, 3, generator=g, dtype=torch.float64))
    thetas = torch.randn(B, fm.n_params, generator=g, dtype=torch.float64)
    weights = (torch.rand(B, n, generator=g, dtype=torch.float64) > 0.2).to(torch.float64)
    vs = torch.randn(B, fm.n_params, generator=g, dtype=torch.float64)
    return fm, x, y, thetas, weights, vs


def _reference(fm, x, y, wd):
    def obj(t, w):
        return products.objective(fm, t, x, y, wd, w)

    def hvp(t, w, v):
        return jvp(grad(lambda s: obj(s, w)), (t,), (v,))[1]

    return vmap(obj), vmap(grad(obj)), vmap(hvp)


@settings(max_examples=12, deadline=None)
@given(depth=st.integers(1, 3), width=st.sampled_from([1, 5, 16]), loss=st.sampled_from(["cross_entropy", "mse"]),
       n=st.integers(1, 30), B=st.integers(1, 5), wd=st.sampled_from([0.0, 1e-3]), seed=st.integers(0, 2 ** 16))
def test_matches_torch_func_on_the_module(depth, width, loss, n, B, wd, seed):
    fm, x, y, thetas, weights, vs = _problem(depth, width, loss, n, B, seed)
    assert fast.applies(fm)
    obj, grads, hvps = _reference(fm, x, y, wd)
    args = (x, y, wd)
    for got, want in [(fast.objective(fm, thetas, weights, *args), obj(thetas, weights)),
                      (fast.grads(fm, thetas, weights, *args), grads(thetas, weights)),
                      (fast.hvps(fm, thetas, weights, vs, *args), hvps(thetas, weights, vs))]:
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_newton_engine_and_the_explicit_hessians_use_it():
    """``newton.weighted_*`` dispatch to the fast path for MLPs, and the explicit Hessians formed from
    its products equal torch.func's ``hessian`` of the module."""
    fm, x, y, thetas, weights, vs = _problem(2, 6, "cross_entropy", 12, 3, 0)
    args = (x, y, 1e-3)
    torch.testing.assert_close(newton.weighted_hvps(fm, thetas, weights, vs, *args),
                               fast.hvps(fm, thetas, weights, vs, *args), rtol=0, atol=0)
    H = newton_explicit.weighted_hessians(fm, thetas, weights, *args)
    want = vmap(lambda t, w: torch.func.hessian(lambda s: products.objective(fm, s, x, y, 1e-3, w))(t))(thetas, weights)
    torch.testing.assert_close(H, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("module, loss, takes", [
    (mlp(4, 3, 2, 8), "cross_entropy", True),
    (mlp(4, 3, 1, 8), "mse", True),
    (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), "cross_entropy", False),
    (nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.Tanh()), "cross_entropy", False),
    (nn.Sequential(nn.Linear(4, 3)), "cross_entropy", False),
    (nn.Linear(4, 3), "cross_entropy", False),
])
def test_applies_only_to_linear_tanh_chains(module, loss, takes):
    assert fast.applies(FlatModel(module.double(), loss)) is takes


@pytest.mark.parametrize("model", ["mlp", "linear"])
def test_an_hvp_operator_reused_over_directions_gives_each_fresh_product(model):
    """CG builds one operator per Newton step and calls it every iteration: each call equals the
    reference product for its own direction (nothing of one call leaks into the next), and
    Newton-CG with the operator is bit for bit Newton-CG without it."""
    from influence_bench.curvature import linear
    if model == "mlp":
        fm, x, y, thetas, weights, _ = _problem(2, 6, "cross_entropy", 12, 3, 1)
    else:
        fm, x, y, thetas, weights, _ = _problem(1, 3, "cross_entropy", 12, 3, 1)
        fm = FlatModel(LogisticRegression(4, 3).double(), "cross_entropy")
        thetas = torch.randn(3, fm.n_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        assert linear.applies(fm)
    args = (x, y, 1e-3)
    _, _, hvps = _reference(fm, x, y, 1e-3)
    op = newton.weighted_hvp_operator(fm, thetas, weights, *args)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        v = torch.randn(thetas.shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(op(v), hvps(thetas, weights, v), rtol=1e-10, atol=1e-12)

    theta0 = thetas[0]
    precond = newton.Preconditioner.from_hessian(
        newton_explicit.weighted_hessians(fm, theta0[None], weights[:1], *args)[0], 1e-3)
    with_op = newton.training_objective(fm, *args)
    without = newton.BatchedObjective(with_op.value, with_op.grads, with_op.hvps)
    runs = [newton.newton_cg_batched(fm, theta0, weights, *args, precond, 5, 0.0, damping=1e-3,
                                     objective=o, adaptive=True) for o in (with_op, without)]
    assert torch.equal(runs[0].theta, runs[1].theta) and torch.equal(runs[0].steps, runs[1].steps)
