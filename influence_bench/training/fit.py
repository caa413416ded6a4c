"""Deterministic full-batch training to (near) convergence, cached on disk by the setting's hash.

The cache holds the flat theta* as ``.npz`` (no pickle) plus a JSON record of how it was reached.
Next to ``theta`` the same ``.npz`` holds a few training checkpoints for trajectory-based
estimators (TracIn, TRAK): see ``Checkpoints``. Cache entries written before checkpoints existed
still load; their checkpoints are recovered on first use by replaying the (deterministic) fit.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from influence_bench import tally
from influence_bench.curvature import products as curvature
from influence_bench.data.datasets import Dataset
from influence_bench.models.flat import FlatModel, build_model
from influence_bench.models.init_weights import init_weights_sha256, load_init_weights, tagged_cache_path
from influence_bench.paths import cache_dir, portable, read_npz, write_json, write_npz
from influence_bench.spec.settings import Setting
from influence_bench.training import minibatch
from influence_bench.training import shipped as shipped_models
from influence_bench.training.checkpoints import Checkpoints, TrajectoryRecorder, _RecordingLBFGS  # noqa: F401
from influence_bench.training.newton import Preconditioner, newton_cg_batched

DTYPES = {"float64": torch.float64, "float32": torch.float32}
POLISH_LM_STEPS = 200  # the adaptive Levenberg-Marquardt polish, where plain Newton polish stalled


@dataclass
class Trained:
    fm: FlatModel
    theta: torch.Tensor  # theta*, detached
    grad_norm: float
    steps: int
    from_cache: bool  # loaded, not trained (from the cache or the shipped layer)
    source: str = "trained"  # "trained", "cache" or "shipped" (``shipped_models.py``)


def model_cache_path(setting: Setting) -> Path:
    """The cache entry of theta*: keyed by what determines it (``training_hash``) and, when the user
    supplies initial weights (``init_weights.py``), by the weights file's sha256."""
    path = cache_dir() / "models" / f"{setting.id}-{setting.training_hash}.npz"
    return tagged_cache_path(path, init_weights_sha256(setting))


def initial_module(setting: Setting, data: Dataset, dtype, device) -> torch.nn.Module:
    """The setting's model at its initialisation: seeded, or the user's weights where supplied."""
    module = build_model(setting.model, data.n_features, data.n_classes, setting.train.seed, dtype,
                         in_shape=tuple(data.x_train.shape[1:]))
    load_init_weights(setting, module)
    return module.to(device)


def _objective_grad(fm: FlatModel, data: Dataset, weight_decay: float):
    def g(t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            t = t.detach().requires_grad_(True)
            return torch.autograd.grad(curvature.objective(fm, t, data.x_train, data.y_train, weight_decay), t)[0]
    return g


def train_lbfgs(fm: FlatModel, theta0: torch.Tensor, data: Dataset, weight_decay: float,
                max_steps: int, grad_tol: float, recorder: TrajectoryRecorder | None = None,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, float, int]:
    """Full-batch L-BFGS (strong Wolfe) on the training objective until ||grad|| < grad_tol.

    With a ``recorder``, every accepted iterate is reported to it (same trajectory).
    """
    theta = theta0.clone().requires_grad_(True)
    kw = dict(lr=1.0, max_iter=max_steps, history_size=50, tolerance_grad=grad_tol, tolerance_change=0.0,
              line_search_fn="strong_wolfe")
    if recorder is None:
        opt = torch.optim.LBFGS([theta], **kw)
    else:
        opt = _RecordingLBFGS([theta], recorder, _objective_grad(fm, data, weight_decay), **kw)

    def closure():
        opt.zero_grad()
        loss = curvature.objective(fm, theta, data.x_train, data.y_train, weight_decay, weights)
        loss.backward()
        return loss

    steps = 0
    for _ in range(10):  # LBFGS may stop early on a flat line search; restart a few times
        opt.step(closure)
        steps = opt.state[opt._params[0]]["n_iter"]
        g = torch.autograd.grad(curvature.objective(fm, theta, data.x_train, data.y_train, weight_decay, weights),
                                theta)[0]
        if g.norm() < grad_tol or steps >= max_steps:
            break
    gnorm = float(g.norm())
    return theta.detach(), gnorm, int(steps)


def fit(fm: FlatModel, theta0: torch.Tensor, data: Dataset, setting: Setting,
        recorder: TrajectoryRecorder | None = None, weights: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, float, int]:
    """L-BFGS to ``lbfgs_tol``, then Newton polish to ``grad_tol``; returns (theta*, ||grad||, steps).

    A ``recorder`` sees every L-BFGS iterate (the result is the same with or without one).
    ``weights`` ([n], full-batch recipes only): per-point weights of the objective (0 = removed),
    for scratch retraining.
    """
    spec = setting.train
    with reproducible_threads(spec.weight_decay == 0 or spec.minibatch):
        if spec.minibatch:
            if weights is not None:
                raise ValueError("minibatch fits take their weights through minibatch.train")
            return _fit_minibatch(fm, theta0, data, setting, recorder)
        return _fit(fm, theta0, data, setting, recorder, weights)


def minibatch_recipe(setting: Setting, n_train: int) -> "minibatch.Recipe":
    """The minibatch training recipe of ``setting`` (``epochs`` whole epochs of ``n // batch_size`` steps)."""
    t = setting.train
    if t.lr <= 0 or t.batch_size < 1 or t.epochs < 1:
        raise ValueError(f"setting {setting.id!r}: {t.optimizer} training needs lr > 0, batch_size >= 1 and "
                         f"epochs >= 1; got lr={t.lr}, batch_size={t.batch_size}, epochs={t.epochs}")
    return minibatch.Recipe(t.optimizer, t.lr, t.batch_size, t.epochs * (n_train // t.batch_size), t.momentum)


def _fit_minibatch(fm: FlatModel, theta0: torch.Tensor, data: Dataset, setting: Setting,
                   recorder: TrajectoryRecorder | None = None) -> tuple[torch.Tensor, float, int]:
    """Minibatch training (``minibatch.py``); the recorder receives the end-of-epoch checkpoints,
    each weighted by the learning rate times the steps it stands for (TracInCP's weighting)."""
    n = data.x_train.shape[0]
    recipe = minibatch_recipe(setting, n)
    per_epoch = n // recipe.batch_size
    theta, kept, at = minibatch.fit(fm, theta0, data.x_train, data.y_train, setting.weight_decay, recipe,
                                    setting.train.seed, per_epoch, max_keep=recorder.max_keep if recorder else 10)
    if recorder is not None:
        bounds = np.concatenate([[0], at, [recipe.steps]])
        recorder.fixed = Checkpoints(kept, at, recipe.lr * np.diff(bounds[:-1]).astype(np.float64),
                                     float(recipe.lr * (bounds[-1] - bounds[-2])), recipe.steps)
    gnorm = float(_objective_grad(fm, data, setting.weight_decay)(theta).norm())
    return theta, gnorm, recipe.steps


@contextlib.contextmanager
def reproducible_threads(pin: bool):
    """Fits whose end point depends on rounding run on one thread. Without weight decay a net has
    no minimiser: L-BFGS runs its whole budget along a flat valley. Minibatch SGD is chaotic over
    its thousand steps. In both, rounding differences (the order of a multi-threaded reduction)
    grow into a different end point, so theta* (and the test points chosen from its losses, which
    key the shipped ground truth) would depend on the machine's thread count. With weight decay a
    full-batch fit converges to one minimiser whatever the rounding, and keeps every thread."""
    if not pin:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(fm: FlatModel, theta0: torch.Tensor, data: Dataset, setting: Setting,
         recorder: TrajectoryRecorder | None = None, weights: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, float, int]:
    spec = setting.train
    theta, gnorm, steps = train_lbfgs(fm, theta0, data, spec.weight_decay, spec.max_steps, spec.lbfgs_tol, recorder,
                                      weights)
    if recorder is not None:
        recorder.theta_end = theta.clone()
    if gnorm > spec.grad_tol and spec.newton_steps > 0:
        # Newton-CG polish with a line search; deep tanh nets have near-flat directions where
        # undamped steps stall, so damping (Levenberg-Marquardt) is raised until it helps.
        # (with ``weights`` the unweighted Hessian only preconditions: removing points changes it by O(1/n))
        H = curvature.hessian(fm, theta, data.x_train, data.y_train, spec.weight_decay)
        ones = (torch.ones(1, data.x_train.shape[0], dtype=theta.dtype, device=theta.device) if weights is None
                else weights[None].to(theta.dtype))
        # Last, adaptive Levenberg-Marquardt steps (the damping follows the gain ratio) with a longer
        # budget: on iris d3 and d6 (wd 1e-3) the first two stopped at ||grad|| 5.8e-6 and 1.1e-6.
        for damping, adaptive, budget in ((0.0, False, spec.newton_steps), (1e-4, False, spec.newton_steps),
                                          (1e-4, True, POLISH_LM_STEPS)):
            res = newton_cg_batched(fm, theta, ones, data.x_train, data.y_train, spec.weight_decay,
                                    Preconditioner.from_hessian(H, damping), budget,
                                    spec.grad_tol, damping=damping, cg_iters=10, adaptive=adaptive)
            gn = float(res.grad_norm[0])
            if math.isfinite(gn) and gn < gnorm:
                theta, gnorm, steps = res.theta[0], gn, steps + int(res.steps[0])
            if gnorm < spec.grad_tol:
                break
    return theta, gnorm, steps


def train(setting: Setting, data: Dataset, device: str = "cpu", use_cache: bool = True) -> Trained:
    """theta* for ``setting``: loaded from the cache if present, else trained and stored."""
    dtype = DTYPES[setting.train.dtype]
    fm = FlatModel(initial_module(setting, data, dtype, device))
    if use_cache:  # the shipped theta* first: the shipped ground truth was computed from it
        got = _load_shipped(setting, data, fm, device, dtype)
        if got is not None:
            return got
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
        rec = TrajectoryRecorder()
        tally.add(tally.TRAINED, setting.id)
        theta, gnorm, steps = fit(fm, fm.flat().to(device), data, setting, rec)
        ckpt = _finish(rec, fm, data, setting, theta)
        if use_cache:
            write_npz(path, theta=theta.cpu().numpy(), **ckpt.to_arrays())
            write_json(path.with_suffix(".json"), {"setting": setting.id, "spec_hash": setting.spec_hash,
                                                   "grad_norm": gnorm, "steps": steps,
                                                   "checkpoints": _ckpt_meta(ckpt)})
    return Trained(fm, theta, gnorm, steps, from_cache=False)


def _load(path: Path, fm: FlatModel, device, dtype) -> Trained | None:
    try:
        theta = torch.as_tensor(read_npz(path)["theta"]).to(device, dtype)
        meta = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError, KeyError):
        return None  # unreadable cache entry: retrain and overwrite
    if theta.numel() != fm.n_params or not torch.isfinite(theta).all():
        return None
    return Trained(fm, theta, float(meta["grad_norm"]), int(meta["steps"]), from_cache=True, source="cache")


def _load_shipped(setting: Setting, data: Dataset, fm: FlatModel, device, dtype) -> Trained | None:
    got = shipped_models.load(setting, data.fingerprint())
    if got is None:
        return None
    z, meta = got
    theta = torch.as_tensor(z["theta"])
    if theta.numel() != fm.n_params or theta.dtype != dtype or not torch.isfinite(theta).all():
        warnings.warn(f"shipped model of {setting.id!r} holds {theta.numel()} {theta.dtype} parameters, the model "
                      f"has {fm.n_params} {dtype}; training theta* here instead", shipped_models.ShippedModelWarning,
                      stacklevel=3)
        return None
    return Trained(fm, theta.to(device), float(meta["grad_norm"]), int(meta["steps"]), from_cache=True,
                   source="shipped")


def export_model(setting: Setting, data: Dataset, fm: FlatModel, theta: torch.Tensor, grad_norm: float,
                 steps: int, root: Path) -> Path:
    """Write theta* and its checkpoints into the shipped root (``shipped_models.write``)."""
    ckpt = checkpoints(setting, data, fm, theta)
    meta = {"grad_norm": float(grad_norm), "steps": int(steps), "checkpoints": _ckpt_meta(ckpt),
            "data_sha256": data.fingerprint(), "data_source": portable(data.source), "dtype": setting.train.dtype}
    return shipped_models.write(setting, root, {"theta": theta.detach().cpu().numpy(), **ckpt.to_arrays()}, meta)


def _finish(rec: TrajectoryRecorder, fm: FlatModel, data: Dataset, setting: Setting,
            theta_star: torch.Tensor) -> Checkpoints:
    if rec.fixed is not None:  # minibatch training: the epoch checkpoints as they were kept
        return rec.fixed
    end = rec.theta_end if rec.theta_end is not None else theta_star
    return rec.finish(end, theta_star, _objective_grad(fm, data, setting.weight_decay)(end))


def _ckpt_meta(ckpt: Checkpoints) -> dict:
    return {"steps": [int(s) for s in ckpt.steps], "lrs": [float(v) for v in ckpt.lrs],
            "final_lr": ckpt.final_lr, "n_lbfgs": ckpt.n_lbfgs}


def checkpoints(setting: Setting, data: Dataset, fm: FlatModel, theta: torch.Tensor,
                use_cache: bool = True) -> Checkpoints:
    """The training checkpoints of ``setting`` (see ``Checkpoints``), from the model cache.

    A cache entry without them (written before checkpoints existed), or one holding another theta*,
    or none, is recovered by replaying the deterministic fit from the same initialisation; the
    given theta* stays the final checkpoint (``replay_diff`` says how far the replay's own end
    point is from it) and, if the entry holds this theta*, the checkpoints are added to it.
    """
    path = model_cache_path(setting)
    device, dtype = theta.device, theta.dtype
    theta_np = theta.detach().cpu().numpy()

    def same_model(z: dict) -> bool:  # the entry is this theta* (not, e.g., one trained on other data)
        return "theta" in z and np.array_equal(z["theta"], theta_np)

    if use_cache:
        got = shipped_models.load(setting, data.fingerprint())
        if got is not None and "ckpt_theta" in got[0] and same_model(got[0]):
            return Checkpoints.from_arrays(got[0], device, dtype)

    if use_cache and path.is_file():
        try:
            z = read_npz(path)
            if "ckpt_theta" in z and same_model(z):
                return Checkpoints.from_arrays(z, device, dtype)
        except (OSError, ValueError, KeyError):
            pass
    replay_fm = FlatModel(initial_module(setting, data, dtype, device))
    rec = TrajectoryRecorder()
    theta_replay, _, _ = fit(replay_fm, replay_fm.flat().to(device), data, setting, rec)
    ckpt = _finish(rec, replay_fm, data, setting, theta)  # the cached theta* is the final checkpoint
    ckpt.replay_diff = float((theta_replay - theta).abs().max())
    if use_cache and path.is_file():
        with FileLock(str(path) + ".lock"):
            try:
                z = read_npz(path)
                if "ckpt_theta" not in z and same_model(z):
                    write_npz(path, **{k: v for k, v in z.items()}, **ckpt.to_arrays())
                    meta_path = path.with_suffix(".json")
                    meta = json.loads(meta_path.read_text())
                    meta["checkpoints"] = {**_ckpt_meta(ckpt), "replay_diff": ckpt.replay_diff}
                    write_json(meta_path, meta)
            except (OSError, ValueError, KeyError):
                pass
    return ckpt
