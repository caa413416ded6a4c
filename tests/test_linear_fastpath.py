"""The closed-form batched path for logistic regression equals the generic vmap/autograd path."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, jvp

from influence_bench.curvature import linear as linear_fastpath
from influence_bench.curvature import products as curvature
from influence_bench.models.flat import FlatModel, build_model
from influence_bench.spec.settings import ModelSpec


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), d=st.integers(1, 8), c=st.integers(2, 5), b=st.integers(1, 4),
       wd=st.floats(0, 1), seed=st.integers(0, 1000))
def test_fastpath_equals_autograd(n, d, c, b, wd, seed):
    g = torch.Generator().manual_seed(seed)
    fm = FlatModel(build_model(ModelSpec("logreg"), d, c, seed))
    assert linear_fastpath.applies(fm)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    thetas = torch.randn(b, fm.n_params, generator=g, dtype=torch.float64)
    vs = torch.randn(b, fm.n_params, generator=g, dtype=torch.float64)
    weights = (torch.rand(b, n, generator=g) > 0.3).to(torch.float64)
    for k in range(b):
        f = lambda t: curvature.objective(fm, t, x, y, wd, weights[k])  # noqa: E731
        torch.testing.assert_close(linear_fastpath.objective(fm, thetas, weights, x, y, wd)[k], f(thetas[k]))
        torch.testing.assert_close(linear_fastpath.grads(fm, thetas, weights, x, y, wd)[k], grad(f)(thetas[k]))
        want = jvp(grad(f), (thetas[k],), (vs[k],))[1]
        torch.testing.assert_close(linear_fastpath.hvps(fm, thetas, weights, vs, x, y, wd)[k], want)


def test_ground_truth_batched_equals_sequential_on_logistic_regression():
    from influence_bench.api.loading import get_context
    from influence_bench.groundtruth import engine
    from influence_bench.spec import catalog

    ctx = get_context(catalog.get_setting("iris-logreg-wd1e-3"))
    removed = np.array([2, 40, 77, 118])
    a = engine.compute(ctx, removed, batched=True).delta
    b = engine.compute(ctx, removed, batched=False).delta
    # both engines stop once the gradient is 1e-6 of its start (recipes.GRAD_RTOL), at iterates that
    # differ within that tolerance: measured 3e-6 of max |delta| apart (1e-12 when run to 1e-11)
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)
    assert np.abs(a).max() > 1e-4
