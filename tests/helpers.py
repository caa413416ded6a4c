"""Small synthetic settings for unit tests (never reported as benchmark results)."""

from __future__ import annotations

import numpy as np
import torch

from influence_bench.api.loading import build_context
from influence_bench.data.datasets import Dataset
from influence_bench.spec.settings import (
    DataSpec,
    GroundTruthSpec,
    ModelSpec,
    ProtocolSpec,
    Setting,
    TestPointSpec,
    TrainSpec,
)


def ridge_context(n: int, d: int, weight_decay: float, seed: int = 0, n_test: int = 6):
    """Ridge regression (linear model, loss 0.5 (f - y)^2) on seeded Gaussian data."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    x = rng.normal(size=(n + n_test, d))
    y = x @ w + 0.5 + rng.normal(scale=0.3, size=n + n_test)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    ds = Dataset(t(x[:n]), t(y[:n, None]), t(x[n:]), t(y[n:, None]), n_classes=1)
    setting = Setting(id=f"test-ridge-n{n}-d{d}", tier="smoke", data=DataSpec("iris", n, n_test),
                      model=ModelSpec("linear", loss="mse"), train=TrainSpec(weight_decay=weight_decay),
                      test_points=TestPointSpec(n_random=n_test))
    return build_context(setting, ds, use_cache=False)


def ridge_closed_form(ctx):
    """theta*, Hessian, per-sample gradients and exact leave-one-out test-loss changes, by algebra."""
    X = torch.cat([ctx.x_train, torch.ones(ctx.n_train, 1, dtype=torch.float64)], 1)
    Xt = torch.cat([ctx.data.x_test, torch.ones(ctx.data.x_test.shape[0], 1, dtype=torch.float64)], 1)
    y, yt = ctx.y_train[:, 0], ctx.data.y_test[:, 0]
    n, p = X.shape
    H = X.T @ X / n + ctx.weight_decay * torch.eye(p, dtype=torch.float64)
    theta = torch.linalg.solve(H, X.T @ y / n)
    g_train = (X @ theta - y)[:, None] * X
    g_test = (Xt @ theta - yt)[:, None] * Xt
    influence = g_test @ torch.linalg.solve(H, g_train.T) / n  # [all test, n]
    loss = lambda th: 0.5 * (Xt @ th - yt) ** 2  # noqa: E731
    loo = []
    for i in range(n):
        Hi = H - torch.outer(X[i], X[i]) / n
        th_i = torch.linalg.solve(Hi, (X.T @ y - X[i] * y[i]) / n)
        loo.append(loss(th_i) - loss(theta))
    return theta, H, influence, torch.stack(loo)  # loo: [n, all test]


def scipy_logreg_test_losses(ctx, weights: np.ndarray) -> np.ndarray:
    """Independent reference for convex ground truth: softmax regression (3 classes, 4 features + bias)
    refit from zero by scipy's BFGS on a numpy objective with per-point ``weights`` (0 = left out,
    1/n kept, weight decay on all), then every test point's loss. ``weights`` is ``[k, n]``."""
    import scipy.optimize

    X = np.c_[ctx.x_train.numpy(), np.ones(ctx.n_train)]
    Y = np.eye(3)[ctx.y_train.numpy()]
    Xt = np.c_[ctx.data.x_test.numpy(), np.ones(len(ctx.data.x_test))]
    yt = ctx.data.y_test.numpy()
    wd, n = ctx.weight_decay, ctx.n_train

    def fit(w):
        def f(flat):
            Wb = flat.reshape(3, 5)
            z = X @ Wb.T
            z = z - z.max(1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(1, keepdims=True))
            val = -(w * (Y * logp).sum(1)).sum() / n + 0.5 * wd * (flat ** 2).sum()
            g = ((np.exp(logp) - Y) * w[:, None]).T @ X / n + wd * Wb
            return val, g.ravel()

        res = scipy.optimize.minimize(f, np.zeros(15), jac=True, method="BFGS",
                                      options={"gtol": 1e-12, "maxiter": 10_000})
        flat = res.x
        # BFGS may stop a little short of gtol (precision loss in its line search, depending on the
        # scipy version): finish with Newton steps on the explicit numpy Hessian
        for _ in range(3):
            z = X @ flat.reshape(3, 5).T
            P = np.exp(z - z.max(1, keepdims=True))
            P /= P.sum(1, keepdims=True)
            A = np.einsum("i,ik,il->ikl", w / n, P, -P)
            A[:, range(3), range(3)] += (w / n)[:, None] * P
            H = np.einsum("ikl,ia,ib->kalb", A, X, X).reshape(15, 15) + wd * np.eye(15)
            flat = flat - np.linalg.solve(H, f(flat)[1])
        return flat.reshape(3, 5)

    def test_loss(Wb):
        z = Xt @ Wb.T
        z = z - z.max(1, keepdims=True)
        return -(z[np.arange(len(yt)), yt] - np.log(np.exp(z).sum(1)))

    return np.array([test_loss(fit(np.asarray(w, dtype=float))) for w in np.atleast_2d(weights)])


def blobs(n: int, n_test: int, seed: int = 0) -> Dataset:
    """Three seeded Gaussian classes in 4-d (float64), for minibatch-engine tests."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n + n_test) % 3
    x = torch.randn(n + n_test, 4, generator=g, dtype=torch.float64) + 1.5 * torch.nn.functional.one_hot(y, 4)[:, :4].double()
    return Dataset(x[:n], y[:n], x[n:], y[n:], n_classes=3)


def minibatch_setting(mode="warm", retrain="sgd", replicates=2, optimizer="sgd") -> Setting:
    """A small tanh MLP trained by minibatch SGD (or full batch), warm SGD ground truth in replicates."""
    train = (TrainSpec(weight_decay=1e-2, optimizer=optimizer, lr=0.1, momentum=0.9, batch_size=16, epochs=20)
             if optimizer != "lbfgs+newton" else TrainSpec(weight_decay=1e-2))
    gt = GroundTruthSpec(mode=mode, retrain=retrain, lr=0.05, momentum=0.9, batch_size=16, steps=60,
                         replicates=replicates)
    return Setting(id=f"test-minibatch-{mode}", tier="smoke", data=DataSpec("iris", 96, 24),
                   model=ModelSpec("mlp", depth=1, width=8), train=train, ground_truth=gt,
                   protocol=ProtocolSpec(default=("loo-fixed",)))


def context_as_tests_see_it(setting):
    """The setting's context under the environment every test of tests/ runs in (conftest: no shipped
    ground truth, so theta* is trained into the session's cache). A module-scoped fixture is built before
    that per-test setting applies; built without it, it would hold the *shipped* theta*, which matches a
    retrained one bit for bit only on the kind of CPU that wrote it (an AVX-512 machine's ATen kernels
    give 5e-15 apart on iris-logreg), and the ground truth the test then computes is stored under
    another theta's key."""
    import pytest

    from influence_bench.api.loading import get_context

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INFLUENCE_BENCH_SHIPPED_GT", "")
        return get_context(setting)
