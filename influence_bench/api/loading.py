"""Loading a setting into a ``Context``: its data, theta* (shipped with the checkout, cached, or
trained here), and the test points it is evaluated on."""

from __future__ import annotations

import functools

import numpy as np
import torch

from influence_bench import paths
from influence_bench.api.context import Context
from influence_bench.curvature import products as curvature
from influence_bench.data import datasets as data_mod
from influence_bench.data.datasets import Dataset
from influence_bench.spec.settings import Setting
from influence_bench.training import fit as training


def select_test_points(test_losses: torch.Tensor, n_random: int, seed: int) -> np.ndarray:
    """The highest-loss and the median-loss test points, then ``n_random`` seeded others."""
    losses = test_losses.detach().cpu().numpy()
    order = np.argsort(losses, kind="stable")
    highest, median = int(order[-1]), int(order[len(order) // 2])
    chosen = [highest] + ([median] if median != highest else [])
    rest = np.setdiff1d(np.arange(len(losses)), chosen)
    rng = np.random.default_rng(seed)
    extra = rng.choice(rest, size=min(n_random, len(rest)), replace=False)
    return np.array(chosen + sorted(int(i) for i in extra), dtype=np.int64)


def get_context(setting: Setting, device: str = "cpu") -> Context:
    """Load the setting's data, train (or load) theta*, choose test points. Cached per process, per
    cache folder and shipped root: a context built while the shipped layer was off (a unit test) holds
    a theta* trained here, and is not what a later run with the shipped layer on should score."""
    shipped = paths.shipped_gt_dir()
    return _get_context(setting, device, str(paths.cache_dir()), None if shipped is None else str(shipped))


def forget_contexts() -> None:
    """Drop every cached context (one was edited in place by an estimator: ``scoring.isolation``);
    the next ``get_context`` rebuilds from the model cache."""
    _get_context.cache_clear()


@functools.lru_cache(maxsize=4)
def _get_context(setting: Setting, device: str, cache: str, shipped: str | None) -> Context:
    return build_context(setting, data_mod.load(setting.data), device)


def build_context(setting: Setting, ds: Dataset, device: str = "cpu", use_cache: bool = True) -> Context:
    """A context for ``setting`` on the given data (``use_cache=False`` for data the setting's
    hash does not describe, e.g. synthetic data in tests)."""
    dev = torch.device(device)
    dtype = training.DTYPES[setting.train.dtype]
    ds = ds.to(dev, dtype)
    trained = training.train(setting, ds, device=device, use_cache=use_cache)
    with torch.no_grad():
        test_losses = curvature.per_sample_loss(trained.fm, trained.theta, ds.x_test, ds.y_test)
    idx = select_test_points(test_losses, setting.test_points.n_random, setting.test_points.seed)
    return Context(setting, ds, trained.fm, trained.theta, idx, dev, trained.grad_norm, trained.steps,
                   trained.source)
