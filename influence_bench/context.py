"""What an estimator receives: the trained model and everything derived from it, computed once.

One ``Context`` per (setting, device) per process; per-sample gradients and the Hessian are
computed lazily and shared by every estimator that asks, so estimators never retrain or reload.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from . import curvature, data as data_mod, paths, training
from .data import Dataset
from .hashing import sha256_tensors
from .models import FlatModel
from .settings import Setting


@dataclass
class Context:
    setting: Setting
    data: Dataset  # the full train / test split of the setting
    fm: FlatModel  # the model as a function of a flat parameter vector
    theta: torch.Tensor  # theta*, flat, detached
    test_idx: np.ndarray  # which test-set points are evaluated (rows of the influence matrix)
    device: torch.device
    train_grad_norm: float = float("nan")
    train_steps: int = -1  # optimiser steps theta* took (-1: unknown)
    theta_source: str = "trained"  # where theta* came from: "trained", "cache" or "shipped"
    _cache: dict = field(default_factory=dict, repr=False)

    # ---- plain facts -----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.theta.dtype

    @property
    def model(self) -> torch.nn.Module:
        return self.fm.module

    @property
    def weight_decay(self) -> float:
        return self.setting.weight_decay

    @property
    def n_train(self) -> int:
        return int(self.data.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return len(self.test_idx)

    @property
    def n_params(self) -> int:
        return self.fm.n_params

    @property
    def theta_sha256(self) -> str:
        """sha256 of theta* (dtype, shape, bytes): part of every ground-truth store key and of the
        cached curvature record, so nothing computed from one theta* is served for another."""
        return self._memo("theta-sha256", lambda: sha256_tensors(self.theta))

    @property
    def data_sha256(self) -> str:
        """sha256 of the train and test arrays as the context holds them (``Dataset.fingerprint``)."""
        return self._memo("data-sha256", self.data.fingerprint)

    @property
    def x_train(self) -> torch.Tensor:
        return self.data.x_train

    @property
    def y_train(self) -> torch.Tensor:
        return self.data.y_train

    @property
    def x_test(self) -> torch.Tensor:
        """The evaluated test points only (``len(test_idx)`` rows)."""
        return self._memo("x_test", lambda: self.data.x_test[torch.as_tensor(self.test_idx)])

    @property
    def y_test(self) -> torch.Tensor:
        return self._memo("y_test", lambda: self.data.y_test[torch.as_tensor(self.test_idx)])

    # ---- shared derived quantities -----------------------------------------------------------
    def loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample (unregularised) losses at ``theta``."""
        return curvature.per_sample_loss(self.fm, theta, x, y)

    def objective(self, theta: torch.Tensor) -> torch.Tensor:
        """Training objective: mean loss + weight_decay/2 ||theta||^2."""
        return curvature.objective(self.fm, theta, self.x_train, self.y_train, self.weight_decay)

    def train_grads(self) -> torch.Tensor:
        """``[n_train, P]`` per-sample loss gradients at theta* (computed once, shared)."""
        return self._memo("train_grads", lambda: curvature.per_sample_grads(self.fm, self.theta, self.x_train, self.y_train))

    def test_grads(self) -> torch.Tensor:
        """``[n_test, P]`` loss gradients of the evaluated test points at theta*."""
        return self._memo("test_grads", lambda: curvature.per_sample_grads(self.fm, self.theta, self.x_test, self.y_test))

    def hessian(self) -> torch.Tensor:
        """``[P, P]`` Hessian of the training objective (incl. weight decay) at theta* (computed once)."""
        return self._memo("hessian", lambda: curvature.hessian(self.fm, self.theta, self.x_train, self.y_train, self.weight_decay))

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        return curvature.hvp(self.fm, self.theta, self.x_train, self.y_train, self.weight_decay, v)

    def hvp_seconds(self) -> float:
        """Measured wall time of one Hessian-vector product over the whole training set at theta*
        (once per context): what cost-bounded estimators and diagnostics budget with. Near zero for
        Iris and linear models; seconds for a CNN on thousands of images on CPU."""
        def make() -> float:
            import time

            v = torch.ones_like(self.theta)
            self.hvp(v)  # warm-up (allocations, kernel selection)
            t0 = time.perf_counter()
            self.hvp(v)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return time.perf_counter() - t0

        return self._memo("hvp_seconds", make)

    def check_hvp_budget(self, n_hvps: float, who: str, max_seconds: float, what: str) -> None:
        """Refuse (``EstimatorUnsupported``) when ``n_hvps`` Hessian-vector products would take longer
        than ``max_seconds`` here; the message gives the estimate and the ways out."""
        from .estimator import EstimatorUnsupported

        if self.setting.model.family in ("logreg", "linear"):  # closed-form / linear fast paths
            return
        est = n_hvps * self.hvp_seconds()
        if est > max_seconds:
            raise EstimatorUnsupported(
                f"{who} on {self.setting.id!r}: {what} needs ~{n_hvps:.0f} Hessian-vector products over "
                f"{self.n_train} training points, ~{est / 60:.0f} min at the {self.hvp_seconds():.2f} s measured "
                f"for one on {self.device} > max_seconds={max_seconds:g}. Run it on a GPU (--device cuda) or "
                "raise max_seconds.")

    def curvature_operator(self, kind: str = "hessian", chunk_size: int | None = None) -> curvature.CurvatureOperator:
        """A callable ``V [k, P] -> [k, P]`` of batched ``H v`` (``kind="hessian"``) or Gauss-Newton ``G v``
        (``"ggn"``) products at theta*, reusing one autograd graph over calls (iterative solvers)."""
        return curvature.CurvatureOperator(self.fm, self.theta, self.x_train, self.y_train, self.weight_decay,
                                           kind, chunk_size)

    def ggn(self) -> torch.Tensor:
        """``[P, P]`` Gauss-Newton matrix of the training objective (incl. weight decay), computed once;
        for a model linear in theta (logistic regression, ridge) it is the Hessian (shared with ``hessian()``)."""
        if self.setting.model.family in ("logreg", "linear"):
            return self.hessian()
        return self._memo("ggn", lambda: curvature.ggn(self.fm, self.theta, self.x_train, self.y_train, self.weight_decay))

    def checkpoints(self) -> list[tuple[torch.Tensor, float]]:
        """Training checkpoints ``[(theta_k, lr_k), ...]``, oldest first, theta* last: evenly spaced
        L-BFGS iterates with their gradient-descent-equivalent learning-rate weights (definition in
        ``training.Checkpoints``), from the model cache (replayed once if the entry predates them)."""
        return self._memo("checkpoints", lambda: training.checkpoints(
            self.setting, self.data, self.fm, self.theta).as_list(self.theta))

    def _memo(self, key: str, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


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
