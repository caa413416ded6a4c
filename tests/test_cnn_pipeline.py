"""CNN settings end to end on tiny seeded synthetic images (never reported as results): training,
test points, ground truth (explicit-Hessian and, above 12k parameters, unpreconditioned), exact
influence and the setting's curvature block."""

import numpy as np
import torch

from influence_bench.api.loading import build_context
from influence_bench.api.registry import REGISTRY
from influence_bench.curvature import products as curvature
from influence_bench.data.datasets import Dataset
from influence_bench.groundtruth import engine
from influence_bench.scoring.setting_info import setting_info
from influence_bench.spec.catalog import MLP_GROUND_TRUTH
from influence_bench.spec.settings import DataSpec, GroundTruthSpec, ModelSpec, Setting, TrainSpec
from influence_bench.spec.settings import TestPointSpec as PointsSpec
from influence_bench.training.newton import weighted_grads


def _images(n, n_test, shape, seed=0):
    """Class = which quadrant is bright, plus noise: learnable by a small CNN."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n + n_test) % 4
    x = 0.3 * torch.randn(n + n_test, *shape, generator=g, dtype=torch.float64)
    h, w = shape[-2] // 2, shape[-1] // 2
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        x[y == k, :, r * h:(r + 1) * h, c * w:(c + 1) * w] += 1.0
    return Dataset(x[:n], y[:n], x[n:], y[n:], n_classes=4)


def _setting(family, width, shape, n, train, gt):
    return Setting(id=f"test-{family}", tier="smoke", data=DataSpec("mnist", n, 6, layout="image"),
                   model=ModelSpec(family, width=width), train=train, ground_truth=gt,
                   test_points=PointsSpec(n_random=3))


def test_all_conv_cnn_trains_retrains_and_scores():
    s = _setting("cnn", 2, (1, 23, 23), 24, TrainSpec(weight_decay=1e-2, max_steps=500), MLP_GROUND_TRUTH)
    ctx = build_context(s, _images(24, 6, (1, 23, 23)), use_cache=False)
    assert ctx.n_params == 246 and ctx.train_grad_norm < 1e-8
    removed = np.array([0, 5, 11])
    res = engine.compute(ctx, removed)
    g = curvature.per_sample_grads(ctx.fm, ctx.theta, ctx.x_train[removed], ctx.y_train[removed]) / ctx.n_train
    assert np.all(res.grad_norm < 1e-3 * g.norm(dim=1).numpy())  # retrained far below the removal's pull
    assert np.isfinite(res.delta).all() and np.abs(res.delta).max() > 0
    est = REGISTRY.create("exact")
    infl = est.influence(ctx).numpy()
    assert infl.shape == (ctx.n_test, 24)
    # first order vs retraining on a CNN with weight decay: same sign of the loss changes
    agree = np.sign(infl[:, removed]) == np.sign(res.delta[:, ctx.test_idx].T)
    assert agree.mean() > 0.8
    info = setting_info(ctx, use_cache=False)  # synthetic data: nothing goes to the model cache
    assert info["hessian_eigenvalues"]["top"][0] > 1e-2 > 0 and info["n_params"] == 246


def test_large_cnn_ground_truth_runs_without_explicit_hessian():
    s = _setting("lenet5", 0, (3, 32, 32), 12, TrainSpec(weight_decay=1e-2, max_steps=30, newton_steps=0),
                 GroundTruthSpec(max_steps=3, damping=1e-2, cg_iters=5))
    ctx = build_context(s, _images(12, 6, (3, 32, 32)), use_cache=False)
    assert ctx.n_params == 61496 > engine.EXPLICIT_HESSIAN_MAX
    assert engine.preconditioner(ctx).kind == "identity" and not ctx.is_cached("hessian")
    res = engine.retrain(ctx, np.array([-1, 3]))
    start = weighted_grads(ctx.fm, ctx.theta[None].expand(2, -1),
                                         engine.removal_weights(12, np.array([-1, 3]), ctx.dtype, ctx.device),
                                         ctx.x_train, ctx.y_train, ctx.weight_decay).norm(dim=1)
    assert torch.all(res.grad_norm < start) and torch.isfinite(res.theta).all()
