"""Deterministic full-batch training to (near) convergence, cached on disk by the setting's hash.

The cache holds the flat theta* as ``.npz`` (no pickle) plus a JSON record of how it was reached.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from . import curvature
from .data import Dataset
from .models import FlatModel, build_model
from .newton import Preconditioner, newton_cg_batched
from .paths import cache_dir, read_npz, write_json, write_npz
from .settings import Setting

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class Trained:
    fm: FlatModel
    theta: torch.Tensor  # theta*, detached
    grad_norm: float
    steps: int
    from_cache: bool


def model_cache_path(setting: Setting) -> Path:
    return cache_dir() / "models" / f"{setting.id}-{setting.spec_hash}.npz"


def train_lbfgs(fm: FlatModel, theta0: torch.Tensor, data: Dataset, weight_decay: float,
                max_steps: int, grad_tol: float) -> tuple[torch.Tensor, float, int]:
    """Full-batch L-BFGS (strong Wolfe) on the training objective until ||grad|| < grad_tol."""
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_steps, history_size=50,
                            tolerance_grad=grad_tol, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = curvature.objective(fm, theta, data.x_train, data.y_train, weight_decay)
        loss.backward()
        return loss

    steps = 0
    for _ in range(10):  # LBFGS may stop early on a flat line search; restart a few times
        opt.step(closure)
        steps = opt.state[opt._params[0]]["n_iter"]
        g = torch.autograd.grad(curvature.objective(fm, theta, data.x_train, data.y_train, weight_decay), theta)[0]
        if g.norm() < grad_tol or steps >= max_steps:
            break
    gnorm = float(g.norm())
    return theta.detach(), gnorm, int(steps)


def fit(fm: FlatModel, theta0: torch.Tensor, data: Dataset, setting: Setting) -> tuple[torch.Tensor, float, int]:
    """L-BFGS to ``lbfgs_tol``, then Newton polish to ``grad_tol``; returns (theta*, ||grad||, steps)."""
    spec = setting.train
    theta, gnorm, steps = train_lbfgs(fm, theta0, data, spec.weight_decay, spec.max_steps, spec.lbfgs_tol)
    if gnorm > spec.grad_tol and spec.newton_steps > 0:
        # Newton-CG polish with a line search; deep tanh nets have near-flat directions where
        # undamped steps stall, so damping (Levenberg-Marquardt) is raised until it helps.
        H = curvature.hessian(fm, theta, data.x_train, data.y_train, spec.weight_decay)
        ones = torch.ones(1, data.x_train.shape[0], dtype=theta.dtype, device=theta.device)
        for damping in (0.0, 1e-4):
            res = newton_cg_batched(fm, theta, ones, data.x_train, data.y_train, spec.weight_decay,
                                    Preconditioner.from_hessian(H, damping), spec.newton_steps,
                                    spec.grad_tol, damping=damping, cg_iters=10)
            gn = float(res.grad_norm[0])
            if math.isfinite(gn) and gn < gnorm:
                theta, gnorm, steps = res.theta[0], gn, steps + int(res.steps[0])
            if gnorm < spec.grad_tol:
                break
    return theta, gnorm, steps


def train(setting: Setting, data: Dataset, device: str = "cpu", use_cache: bool = True) -> Trained:
    """theta* for ``setting``: loaded from the cache if present, else trained and stored."""
    dtype = DTYPES[setting.train.dtype]
    module = build_model(setting.model, data.n_features, data.n_classes, setting.train.seed, dtype,
                         in_shape=tuple(data.x_train.shape[1:])).to(device)
    fm = FlatModel(module)
    path = model_cache_path(setting)
    if use_cache and path.is_file():
        got = _load(path, fm, device, dtype)
        if got is not None:
            return got
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if use_cache and path.is_file():  # another process trained it meanwhile
            got = _load(path, fm, device, dtype)
            if got is not None:
                return got
        theta, gnorm, steps = fit(fm, fm.flat().to(device), data, setting)
        if use_cache:
            write_npz(path, theta=theta.cpu().numpy())
            write_json(path.with_suffix(".json"), {"setting": setting.id, "spec_hash": setting.spec_hash,
                                                   "grad_norm": gnorm, "steps": steps})
    return Trained(fm, theta, gnorm, steps, from_cache=False)


def _load(path: Path, fm: FlatModel, device, dtype) -> Trained | None:
    try:
        theta = torch.as_tensor(read_npz(path)["theta"]).to(device, dtype)
        meta = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError, KeyError):
        return None  # unreadable cache entry: retrain and overwrite
    if theta.numel() != fm.n_params or not torch.isfinite(theta).all():
        return None
    return Trained(fm, theta, float(meta["grad_norm"]), int(meta["steps"]), from_cache=True)
