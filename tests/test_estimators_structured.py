"""The structured estimators (kfac, ekfac, last-layer, gradient-cosine, tracin, representer, trak)
against the exact quantities they approximate, in the cases where the approximation is exact,
plus contrast checks showing that the same comparison fails where it should."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import ridge_closed_form, ridge_context
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import jacrev, vmap

from influence_bench import EstimatorUnsupported
from influence_bench.api.context import Context
from influence_bench.api.loading import build_context
from influence_bench.api.registry import REGISTRY
from influence_bench.curvature import kfac
from influence_bench.curvature.products import per_sample_grads
from influence_bench.data import datasets as data_mod
from influence_bench.data.datasets import Dataset
from influence_bench.models.flat import FlatModel, LogisticRegression, build_model
from influence_bench.paths import write_npz
from influence_bench.scoring.runner import run_estimator
from influence_bench.spec import catalog
from influence_bench.spec.settings import DataSpec, ModelSpec, Setting, TrainSpec
from influence_bench.spec.settings import TestPointSpec as PointSpec
from influence_bench.training import fit as training

NAMES = ("kfac", "ekfac", "last-layer", "gradient-cosine", "tracin", "representer", "trak")
SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- helpers -----------------------------------------------------------------------------------

def synthetic_ctx(module: nn.Module, n: int, n_test: int, d: int, C: int, wd: float, seed: int,
                  theta: torch.Tensor | None = None) -> Context:
    """A context at a given (not necessarily trained) theta on seeded Gaussian data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_test, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n + n_test,), generator=g)
    ds = Dataset(x[:n], y[:n], x[n:], y[n:], C)
    fm = FlatModel(module.to(torch.float64))
    if theta is None:
        theta = torch.randn(fm.n_params, generator=g, dtype=torch.float64)
    setting = Setting(id=f"test-synthetic-{seed}", tier="smoke", data=DataSpec("iris", n, n_test),
                      model=ModelSpec("logreg"), train=TrainSpec(weight_decay=wd))
    return Context(setting, ds, fm, theta.detach(), np.arange(n_test), torch.device("cpu"))


def reference_ggn(ctx: Context) -> torch.Tensor:
    """``(1/n) sum_i J_i^T Lam_i J_i + wd I`` from per-sample Jacobians (independent of influence_bench.kfac)."""
    fm, theta, x = ctx.fm, ctx.theta, ctx.x_train
    J = vmap(lambda xi: jacrev(lambda t: fm(t, xi[None])[0])(theta))(x)  # [n, C, P]
    with torch.no_grad():
        out = fm(theta, x)
    if fm.loss == "cross_entropy":
        p = torch.softmax(out, -1)
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        lam = torch.eye(out.shape[1], dtype=out.dtype).expand(out.shape[0], -1, -1)
    G = torch.einsum("ncp,ncd,ndq->pq", J, lam, J) / x.shape[0]
    return 0.5 * (G + G.T) + ctx.weight_decay * torch.eye(G.shape[0], dtype=G.dtype)


def influence_with(ctx: Context, M: torch.Tensor) -> np.ndarray:
    """``(1/n) g_test^T M^-1 g_train`` with autograd per-sample gradients."""
    g_test, g_train = ctx.test_grads(), ctx.train_grads()
    return (torch.linalg.solve(M, g_test.T).T @ g_train.T / ctx.n_train).numpy()


def run(name: str, ctx: Context, **hp):
    est = REGISTRY.create(name, **hp)
    out, _ = run_estimator(est, ctx)
    return out, est


@pytest.fixture(scope="module")
def iris_logreg() -> Context:
    s = catalog.get_setting("iris-logreg-wd1e-3")
    with pytest.MonkeyPatch.context() as mp:  # theta* trained here, as the tests' own calls see it (helpers)
        mp.setenv("INFLUENCE_BENCH_SHIPPED_GT", "")
        return build_context(s, data_mod.load(s.data))


@pytest.fixture(scope="module")
def small_mlp() -> Context:
    """A tanh MLP (one hidden layer of 6) trained to a stationary point with weight decay 1e-2."""
    s = Setting(id="test-mlp-d1-w6", tier="smoke", data=DataSpec("iris", 120, 30),
                model=ModelSpec("mlp", depth=1, width=6), train=TrainSpec(weight_decay=1e-2, lbfgs_tol=1e-4),
                test_points=PointSpec(n_random=6))
    return build_context(s, data_mod.load(catalog.IRIS), use_cache=False)


# ---- K-FAC / EK-FAC ----------------------------------------------------------------------------

@settings(max_examples=10, **SLOW)
@given(n=st.integers(8, 50), d=st.integers(1, 6), log_wd=st.floats(-4, 0), seed=st.integers(0, 10_000))
def test_kfac_exact_for_single_output_squared_error(n, d, log_wd, seed):
    """One Linear layer, one output, squared error: the output Hessian is 1 for every sample, so
    E[S_i (x) a a^T] = S (x) A exactly and K-FAC (and EK-FAC) is the exact Hessian: both must
    reproduce the closed-form ridge influence."""
    ctx = ridge_context(n, d, 10.0 ** log_wd, seed)
    *_, influence, _ = ridge_closed_form(ctx)
    want = influence[torch.as_tensor(ctx.test_idx)].numpy()
    for name in ("kfac", "ekfac"):
        got, _ = run(name, ctx)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())


@settings(max_examples=15, **SLOW)
@given(n=st.integers(5, 40), d=st.integers(1, 5), C=st.integers(2, 5), log_wd=st.floats(-3, 0),
       seed=st.integers(0, 10_000))
def test_kfac_exact_for_softmax_when_all_output_hessians_agree(n, d, C, log_wd, seed):
    """Logistic regression with zero weights and any bias: every sample has the same softmax
    output p = softmax(b), hence the same output Hessian S_i = diag(p) - p p^T, and K-FAC's
    independence assumption holds exactly: K-FAC = EK-FAC = exact GGN (= Hessian) influence."""
    module = LogisticRegression(d, C)
    g = torch.Generator().manual_seed(seed + 1)
    theta = torch.cat([torch.zeros(C * d, dtype=torch.float64), 2 * torch.randn(C, generator=g, dtype=torch.float64)])
    ctx = synthetic_ctx(module, n, 4, d, C, 10.0 ** log_wd, seed, theta)
    want = influence_with(ctx, reference_ggn(ctx))
    for name in ("kfac", "ekfac"):
        got, _ = run(name, ctx)
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10 * np.abs(want).max())


def test_kfac_is_not_exact_when_output_hessians_differ():
    """Contrast for the two tests above: at generic weights the S_i differ and K-FAC errs."""
    ctx = synthetic_ctx(LogisticRegression(4, 3), 40, 4, 4, 3, 1e-2, seed=0)
    want = influence_with(ctx, reference_ggn(ctx))
    got, _ = run("kfac", ctx)
    assert np.abs(got - want).max() > 1e-2 * np.abs(want).max()


@settings(max_examples=10, **SLOW)
@given(d=st.integers(1, 5), C=st.integers(2, 4), log_wd=st.floats(-3, 0), seed=st.integers(0, 10_000))
def test_kfac_exact_for_a_single_training_point(d, C, log_wd, seed):
    """n = 1: the expectation has one term, so S (x) A is the GGN itself (softmax, any weights)."""
    ctx = synthetic_ctx(LogisticRegression(d, C), 1, 3, d, C, 10.0 ** log_wd, seed)
    want = influence_with(ctx, reference_ggn(ctx))
    got, _ = run("kfac", ctx)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10 * np.abs(want).max())


@settings(max_examples=10, **SLOW)
@given(n=st.integers(5, 40), d=st.integers(1, 5), C=st.integers(2, 4), seed=st.integers(0, 10_000))
def test_ekfac_eigenvalues_are_the_exact_ggn_diagonal_in_the_kronecker_eigenbasis(n, d, C, seed):
    ctx = synthetic_ctx(LogisticRegression(d, C), n, 2, d, C, 0.0, seed)
    G = reference_ggn(ctx)  # wd = 0: the pure GGN block
    (f,) = kfac.factors(ctx, corrected=True)
    pos = kfac.flat_positions(f.layer)
    Q = torch.kron(f.Q_S, f.Q_A)
    want = torch.diagonal(Q.T @ G[pos][:, pos] @ Q).reshape(f.corrected.shape)
    torch.testing.assert_close(f.corrected, want, rtol=1e-9, atol=1e-12)


def test_ekfac_at_least_as_close_to_the_exact_ggn_as_kfac_on_the_iris_mlp():
    """EK-FAC's eigenvalues are the Frobenius-optimal diagonal in K-FAC's eigenbasis, so its
    block-diagonal matrix is never further from the exact GGN than K-FAC's (both drop the same
    off-diagonal blocks). Iris, tanh MLP 4-8-8-3, weights after 20 L-BFGS steps."""
    ds = data_mod.load(catalog.IRIS).to("cpu", torch.float64)
    module = build_model(ModelSpec("mlp", depth=2, width=8), 4, 3, seed=0)
    fm = FlatModel(module)
    theta, *_ = training.train_lbfgs(fm, fm.flat(), ds, 1e-3, max_steps=20, grad_tol=1e-12)
    setting = Setting(id="test-iris-mlp", tier="smoke", data=catalog.IRIS, model=ModelSpec("mlp", depth=2, width=8),
                      train=TrainSpec(weight_decay=1e-3))
    ctx = Context(setting, ds, fm, theta, np.arange(6), torch.device("cpu"))
    G = reference_ggn(ctx)
    errs = {}
    for corrected in (False, True):
        fs = kfac.factors(ctx, corrected)
        M = kfac.dense_curvature(fs, ctx.n_params, corrected, shift=ctx.weight_decay)
        errs[corrected] = float((M - G).norm())
        for f in fs:  # and block by block
            pos = kfac.flat_positions(f.layer)
            errs[(corrected, f.layer.name)] = float((f.dense(corrected) + 1e-3 * torch.eye(len(pos), dtype=torch.float64)
                                                     - G[pos][:, pos]).norm())
    assert errs[True] <= errs[False] * (1 + 1e-12), errs
    for f in kfac.factors(ctx, True):
        assert errs[(True, f.layer.name)] <= errs[(False, f.layer.name)] * (1 + 1e-12), errs
    assert errs[True] < errs[False] * 0.99, errs  # strictly better here, not a tie


def test_kfac_factored_gradients_match_autograd(small_mlp):
    """The per-sample gradients K-FAC uses in factored form (delta a~^T) are the autograd ones."""
    ctx = small_mlp
    layers, stats = kfac.train_stats(ctx)
    G = ctx.train_grads()
    for l, dlt, a in zip(layers, stats.loss_grads, stats.inputs):
        torch.testing.assert_close(dlt[:, :, None] * a[:, None, :], kfac.to_extended(G, l))


def test_kfac_rejects_unsupported_layers_by_name():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double()
    with pytest.raises(EstimatorUnsupported, match=r"Conv2d.*`exact`.*`cg`"):
        kfac.linear_layers(FlatModel(conv), "kfac")
    ln = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    ctx = synthetic_ctx(ln, 10, 2, 4, 3, 1e-3, seed=0)
    for name in ("kfac", "ekfac"):
        with pytest.raises(EstimatorUnsupported, match="LayerNorm"):
            REGISTRY.create(name).influence(ctx)


# ---- last-layer ----------------------------------------------------------------------------------

@settings(max_examples=12, **SLOW)
@given(n=st.integers(3, 40), d=st.integers(1, 6), C=st.integers(2, 5), log_wd=st.floats(-4, 0),
       seed=st.integers(0, 10_000))
def test_last_layer_equals_exact_for_logistic_regression(n, d, C, log_wd, seed):
    ctx = synthetic_ctx(LogisticRegression(d, C), n, 3, d, C, 10.0 ** log_wd, seed)
    got, _ = run("last-layer", ctx)
    want, _ = run("exact", ctx)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12 * np.abs(want).max())


def test_last_layer_equals_exact_on_trained_iris_logreg(iris_logreg):
    got, _ = run("last-layer", iris_logreg)
    want, _ = run("exact", iris_logreg)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12 * np.abs(want).max())


def test_last_layer_is_the_final_block_of_the_hessian_on_an_mlp(small_mlp):
    ctx = small_mlp
    layer = kfac.final_linear(ctx.fm, "test")
    pos = kfac.flat_positions(layer)
    H = ctx.hessian()[pos][:, pos]
    g_test, g_train = ctx.test_grads()[:, pos], ctx.train_grads()[:, pos]
    want = (torch.linalg.solve(H, g_test.T).T @ g_train.T / ctx.n_train).numpy()
    got, est = run("last-layer", ctx)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-11 * np.abs(want).max())
    assert est.diagnostics["layer_params"] == len(pos) < ctx.n_params
    exact, _ = run("exact", ctx)  # contrast: restricting to one layer changes the answer
    assert np.abs(got - exact).max() > 1e-3 * np.abs(exact).max()


def test_last_layer_refuses_a_model_whose_output_is_not_a_linear_layer():
    ctx = synthetic_ctx(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), 8, 2, 3, 4, 1e-3, seed=0)
    with pytest.raises(EstimatorUnsupported, match="not the output of its last nn.Linear"):
        REGISTRY.create("last-layer").influence(ctx)


# ---- gradient-cosine ------------------------------------------------------------------------------

class _GradCtx:
    """Just what gradient-cosine reads: the gradients and n."""

    def __init__(self, g_test, g_train):
        self._t, self._i = g_test, g_train
        self.n_train = g_train.shape[0]

    def test_grads(self):
        return self._t

    def train_grads(self):
        return self._i


@settings(max_examples=50, deadline=None)
@given(nt=st.integers(1, 6), n=st.integers(2, 30), P=st.integers(2, 12), seed=st.integers(0, 10_000),
       log_c=st.floats(-3, 3))
def test_gradient_cosine_scale_invariance(nt, n, P, seed, log_c):
    g = torch.Generator().manual_seed(seed)
    gt = torch.randn(nt, P, generator=g, dtype=torch.float64)
    gi = torch.randn(n, P, generator=g, dtype=torch.float64)
    est = REGISTRY.create("gradient-cosine")
    base = est.influence(_GradCtx(gt, gi))
    s = est.diagnostics["scale"]
    cos = (gt / gt.norm(dim=1, keepdim=True)) @ (gi / gi.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(base / s, cos)
    assert s == pytest.approx(float(gt.norm(dim=1).mean() * gi.norm(dim=1).mean()) / n)
    # rescaling single gradients by positive factors: I / s unchanged (gradient-dot's is not)
    ft = torch.exp(torch.randn(nt, 1, generator=g, dtype=torch.float64) * 2)
    fi = torch.exp(torch.randn(n, 1, generator=g, dtype=torch.float64) * 2)
    est2 = REGISTRY.create("gradient-cosine")
    torch.testing.assert_close(est2.influence(_GradCtx(gt * ft, gi * fi)) / est2.diagnostics["scale"], cos)
    # rescaling every gradient by c scales the whole matrix by c^2 (like gradient-dot)
    c = 10.0 ** log_c
    torch.testing.assert_close(REGISTRY.create("gradient-cosine").influence(_GradCtx(c * gt, c * gi)), c * c * base)
    # sign convention: a training gradient turned around flips its column
    flipped = REGISTRY.create("gradient-cosine").influence(_GradCtx(gt, torch.cat([-gi[:1], gi[1:]])))
    torch.testing.assert_close(flipped[:, 0], -base[:, 0])


def test_gradient_cosine_ranks_like_cosine_not_like_gradient_dot(iris_logreg):
    got, _ = run("gradient-cosine", iris_logreg)
    dot, _ = run("gradient-dot", iris_logreg)
    assert np.all(np.sign(got) == np.sign(dot))
    assert not np.array_equal(np.argsort(got[0]), np.argsort(dot[0]))  # norms reorder gradient-dot


# ---- TracIn and the training checkpoints -----------------------------------------------------------

def test_recorder_does_not_change_the_lbfgs_trajectory():
    ds = data_mod.load(catalog.IRIS).to("cpu", torch.float64)
    fm = FlatModel(build_model(ModelSpec("mlp", depth=1, width=5), 4, 3, seed=1))
    plain = training.train_lbfgs(fm, fm.flat(), ds, 1e-3, max_steps=25, grad_tol=1e-12)
    true_grad = training._objective_grad(fm, ds, 1e-3)

    class Checked(training.TrajectoryRecorder):  # the gradient reported with each step is the true one
        def step(self, before, after, grad):
            torch.testing.assert_close(grad, true_grad(before), rtol=1e-9, atol=1e-12)
            super().step(before, after, grad)

    rec = Checked(max_keep=6)
    recorded = training.train_lbfgs(fm, fm.flat(), ds, 1e-3, max_steps=25, grad_tol=1e-12, recorder=rec)
    assert torch.equal(plain[0], recorded[0]) and plain[2] == recorded[2]
    n_iter = len(rec.cum_lr) - 1
    assert 20 <= n_iter <= recorded[2] == 25  # every accepted step (an iteration may fail to move)
    steps = [s for s, _ in rec.kept]
    assert 3 <= len(steps) <= 6 and steps == list(range(rec.stride, steps[-1] + 1, rec.stride))  # evenly spaced
    assert steps[-1] > n_iter - rec.stride


def test_recorder_learning_rates_are_gradient_descent_equivalent_step_sizes():
    rec = training.TrajectoryRecorder(max_keep=4)
    g = torch.tensor([1.0, 2.0], dtype=torch.float64)
    theta = torch.zeros(2, dtype=torch.float64)
    etas = [0.5, 0.25, 2.0, 1.0, 3.0, 0.1, 0.7]
    iterates = [theta]
    for k, eta in enumerate(etas):  # gradient steps plus an orthogonal part (which eta ignores)
        new = theta - eta * g + (k + 1) * torch.tensor([2.0, -1.0], dtype=torch.float64)
        rec.step(theta, new, g)
        theta = new
        iterates.append(theta)
    rec.theta_end = theta
    star = theta - 0.3 * g  # a "polish" worth eta = 0.3
    ck = rec.finish(theta, star, g)
    assert list(ck.steps) == [2, 4, 6]
    torch.testing.assert_close(ck.thetas, torch.stack([iterates[2], iterates[4], iterates[6]]), rtol=0, atol=0)
    np.testing.assert_allclose(ck.lrs, [0.75, 3.0, 3.1])
    assert ck.final_lr == pytest.approx(0.7 + 0.3)
    assert sum(ck.lrs) + ck.final_lr == pytest.approx(sum(etas) + 0.3)
    torch.testing.assert_close(ck.as_list(star)[-1][0], star)


def test_checkpoints_are_saved_with_the_model_and_recovered_for_old_cache_entries(iris_logreg):
    ctx = iris_logreg
    ckpts = ctx.checkpoints()
    assert 5 <= len(ckpts) <= 11
    assert torch.equal(ckpts[-1][0], ctx.theta)
    assert all(lr > 0 for _, lr in ckpts[:-1])
    path = training.model_cache_path(ctx.setting)
    z = dict(np.load(path))
    assert {"theta", "ckpt_theta", "ckpt_lr"} <= set(z)
    # an entry written before checkpoints existed: theta only
    write_npz(path, theta=z["theta"])
    again = training.checkpoints(ctx.setting, ctx.data, ctx.fm, ctx.theta)
    assert again.replay_diff == 0.0  # the replayed fit is bit-for-bit the cached one
    np.testing.assert_array_equal(again.lrs, z["ckpt_lr"])
    torch.testing.assert_close(again.thetas, torch.as_tensor(z["ckpt_theta"]), rtol=0, atol=0)
    z2 = dict(np.load(path))
    np.testing.assert_array_equal(z2["theta"], z["theta"])  # theta untouched, checkpoints added back
    np.testing.assert_array_equal(z2["ckpt_lr"], z["ckpt_lr"])
    assert training.train(ctx.setting, ctx.data).from_cache  # and the entry still loads


def test_tracin_one_checkpoint_at_theta_star_with_lr_one_is_gradient_dot(iris_logreg):
    """sum_k lr_k g_j(theta_k).g_i(theta_k) / n with the single checkpoint theta*, lr 1, is
    g_j.g_i / n = gradient-dot (Pruthi et al.'s un-normalised TracIn would be n times it)."""
    got, est = run("tracin", iris_logreg, last=1, lr=1.0)
    dot, _ = run("gradient-dot", iris_logreg)
    np.testing.assert_allclose(got, dot, rtol=1e-12, atol=0)
    assert est.diagnostics["lr_weights"] == [1.0]


def test_tracin_sums_the_recorded_checkpoints(iris_logreg):
    ctx = iris_logreg
    got, est = run("tracin", ctx)
    ckpts = ctx.checkpoints()
    assert est.diagnostics["lr_weights"] == [lr for _, lr in ckpts]
    want = sum(lr * per_sample_grads(ctx.fm, t, ctx.x_test, ctx.y_test) @ per_sample_grads(ctx.fm, t, ctx.x_train, ctx.y_train).T
               for t, lr in ckpts) / ctx.n_train
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-14)
    last, _ = run("tracin", ctx, last=1)  # theta* alone, with its recorded weight
    assert not np.allclose(got, last)


# ---- representer points -------------------------------------------------------------------------

def test_representer_decomposition_reproduces_the_outputs(small_mlp):
    """At the stationary point of a model trained with weight decay the final layer is
    sum_i alpha_i f~_i^T exactly, so the terms sum to the test outputs with nothing left over."""
    ctx = small_mlp
    assert ctx.train_grad_norm < 1e-9
    est = REGISTRY.create("representer")
    terms = est.decomposition(ctx, ctx.x_test)  # [n_test, n, C]
    with torch.no_grad():
        out = ctx.fm(ctx.theta, ctx.x_test)
    torch.testing.assert_close(terms.sum(1), out, rtol=1e-7, atol=1e-8)
    # contrast: away from the stationary point the decomposition does not hold
    moved = dataclasses.replace(ctx, theta=ctx.theta + 1e-2, _cache={})
    with torch.no_grad():
        out_moved = ctx.fm(moved.theta, ctx.x_test)
    assert (REGISTRY.create("representer").decomposition(moved, ctx.x_test).sum(1) - out_moved).abs().max() > 1e-3


def test_representer_influence_is_the_loss_change_of_deleting_a_term(small_mlp):
    ctx = small_mlp
    got, est = run("representer", ctx)
    assert est.diagnostics["representer_residual"] < 1e-7
    terms = est.decomposition(ctx, ctx.x_test)
    out = ctx.fm(ctx.theta, ctx.x_test).detach()
    dL = torch.softmax(out, -1) - nn.functional.one_hot(ctx.y_test, out.shape[1])  # dL_t/dPhi_t
    want = -(dL[:, None, :] * terms).sum(-1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-14)
    # ... which is last-layer gradient-dot / weight decay
    pos = kfac.flat_positions(kfac.final_linear(ctx.fm, "test"))
    dot = ctx.test_grads()[:, pos] @ ctx.train_grads()[:, pos].T / ctx.n_train / ctx.weight_decay
    np.testing.assert_allclose(got, dot.numpy(), rtol=1e-8, atol=1e-12 * float(dot.abs().max()))


def test_representer_refuses_zero_weight_decay():
    ctx = synthetic_ctx(LogisticRegression(3, 2), 10, 2, 3, 2, 0.0, seed=0)
    with pytest.raises(EstimatorUnsupported, match="weight decay"):
        REGISTRY.create("representer").influence(ctx)


# ---- TRAK -----------------------------------------------------------------------------------------

def unprojected_trak(ctx: Context, ridge: float) -> np.ndarray:
    """(1 - p_t) grad f_t^T (sum_i grad f_i grad f_i^T + ridge I)^-1 grad f_i (1 - p_i) at theta*,
    gradients of the margin f = log p_y - log(1 - p_y) by plain autograd, one sample at a time."""
    def grads_and_p(x, y):
        gs, ps = [], []
        for xi, yi in zip(x, y):
            t = ctx.theta.clone().requires_grad_(True)
            logp = torch.log_softmax(ctx.fm(t, xi[None])[0], -1)
            p = logp[yi].exp()
            f = logp[yi] - torch.log1p(-p)
            gs.append(torch.autograd.grad(f, t)[0])
            ps.append(float(p.detach()))
        return torch.stack(gs), torch.tensor(ps, dtype=torch.float64)
    F, p = grads_and_p(ctx.x_train, ctx.y_train)
    Ft, pt = grads_and_p(ctx.x_test, ctx.y_test)
    K = F.T @ F + ridge * torch.eye(ctx.n_params, dtype=torch.float64)
    return ((1 - pt)[:, None] * (torch.linalg.solve(K, Ft.T).T @ F.T) * (1 - p)[None, :]).numpy()


@pytest.mark.parametrize("kernel", ["direct", "eigh"])
@pytest.mark.parametrize("which", ["iris_logreg", "small_mlp"])
def test_trak_with_full_projection_and_one_checkpoint_is_the_unprojected_formula(which, kernel, request, monkeypatch):
    """Both kernels: the unprojected Cholesky solve (proj_dim >= P with a ridge, the default there) and
    the projected eigendecomposition it replaces."""
    import sys

    ctx = request.getfixturevalue(which)
    monkeypatch.setattr(sys.modules[type(REGISTRY.create("trak")).__module__], "DIRECT_KERNEL", kernel == "direct")
    ridge = ctx.n_train * ctx.weight_decay
    want = unprojected_trak(ctx, ridge)
    got, est = run("trak", ctx, proj_dim=ctx.n_params + 20, last=1)
    assert est.diagnostics["kernel_rank"] == [ctx.n_params] and not est.diagnostics["projected"]
    assert est.diagnostics["kernel"] == kernel
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())
    # a projection smaller than the parameter count is an approximation, not the formula
    small, _ = run("trak", ctx, proj_dim=max(2, ctx.n_params // 3), last=1)
    assert np.abs(small - want).max() > 1e-3 * np.abs(want).max()


def test_trak_seeded_and_free_of_global_randomness(iris_logreg):
    torch.manual_seed(1)
    a, _ = run("trak", iris_logreg, proj_dim=8, seed=3)
    torch.manual_seed(2)
    b, _ = run("trak", iris_logreg, proj_dim=8, seed=3)
    c, _ = run("trak", iris_logreg, proj_dim=8, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_trak_ensembles_over_checkpoints(iris_logreg):
    ctx = iris_logreg
    full, est = run("trak", ctx, proj_dim=32)
    assert est.diagnostics["n_checkpoints"] == len(ctx.checkpoints())
    one, _ = run("trak", ctx, proj_dim=32, last=1)
    assert not np.allclose(full, one)
