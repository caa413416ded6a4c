"""Ground-truth recipes, one per (mode, kind of retraining), chosen from one table (``TABLE``).

Each recipe says how a batch of models is retrained on removal weights (``retrain_weights``),
its version (the store key's ``engine`` field: a change that can change stored numbers bumps it),
whether it is stochastic (depends on a data-order seed, so its replicates differ), whether it
preconditions with a per-model downdate, whether a control model is subtracted, and what it checks
before running:

* ``warm-newton``: warm start at theta*, Newton-CG steps until the gradient norm falls to
  ``GRAD_RTOL`` of its start (or ``grad_tol``), at most ``max_steps``; Levenberg-Marquardt damping
  that starts at ``damping`` and adapts per model; preconditioned by H* with a per-model Woodbury
  downdate; deterministic; a model that runs out of steps is recorded as not converged; small
  softmax-linear models solve each step exactly on explicit batched Hessians (``newton_explicit``);
* ``warm-minibatch``: ``steps`` steps of SGD / Adam from theta* on the replicate's batches;
* ``scratch-minibatch``: the setting's own minibatch training again from its initialisation;
* ``scratch-full-batch``: the setting's own L-BFGS + Newton fit, one model at a time;
* ``pbrf``: the proximal Bregman response function (``pbrf.py``), no control model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from influence_bench.api.context import Context
from influence_bench.groundtruth import pbrf
from influence_bench.groundtruth.common import initial_theta, preconditioner
from influence_bench.spec.settings import Setting
from influence_bench.training import fit as training
from influence_bench.training import minibatch, newton_explicit
from influence_bench.training.newton import NewtonResult, newton_cg_batched, newton_cg_sequential

# Bump whenever a change to the retraining can change stored numbers: it is part of the store key.
# ENGINE_VERSION keys the recipes other than warm-newton (their shipped ground truth, e.g. the CNNs'
# minibatch retraining, took hours: never bump it for a change that does not touch them);
# WARM_NEWTON_VERSION keys warm-newton alone (3: run to a relative gradient tolerance with adaptive
# Levenberg-Marquardt damping, instead of a fixed number of fixed-damping steps).
ENGINE_VERSION = "warm-newton-cg/2"
WARM_NEWTON_VERSION = "warm-newton-cg/4"  # 4: no stricter than theta* is stationary (below)
# warm-newton stops a model once ||grad|| <= max(grad_tol, GRAD_RTOL x ||grad|| at theta*) of its own
# weighted objective (measured on the Iris MLPs: the control, whose start is theta* itself, reaches
# ~1e-13; a removal starts at 1e-3..1e-1, so 1e-6 of it is 1e-9..1e-7, far above rounding).
GRAD_RTOL = 1e-6
# ... and never stricter than theta* itself is stationary on the full objective (its recorded
# gradient norm): a retrained model is asked to be a minimiser as good as the one it is compared
# with. (iris d3 wd 1e-3: theta* at 1.1e-8 after its polish; 1e-6 of a removal's start is below that.)
# Only a theta* that is a minimiser (||grad|| <= STATIONARY_MAX) sets this floor: one far from it (a
# barely trained fixture) would make every retraining "converged" before its first step.
STATIONARY_MAX = 1e-6
MINIBATCH_VERSION = "minibatch/1"  # also part of the store key of minibatch recipes
# Deterministic recipes (Newton-CG: no data order, no sampling) have identical replicates, so their
# noise ceiling is 1 by declaration (a test checks two builds are bit-identical). Stochastic
# (minibatch) recipes get theirs from replicates (``compute.combine``).
NOISE_CEILING = 1.0
CEILING_METHOD = "deterministic"


def minibatch_spec(setting: Setting, n_train: int) -> minibatch.Recipe:
    """The minibatch recipe that retrains ``setting``'s ground truth: the setting's own minibatch
    training again (scratch), or the ground-truth spec's steps (warm)."""
    gt = setting.ground_truth
    if gt.mode == "scratch":
        return training.minibatch_recipe(setting, n_train)
    return minibatch.Recipe(gt.retrain, gt.lr, gt.batch_size, gt.steps, gt.momentum)


def minibatch_recipe(ctx: Context) -> tuple[minibatch.Recipe, torch.Tensor, int]:
    """(recipe, start point, base data-order seed) of minibatch retraining."""
    s = ctx.setting
    recipe = minibatch_spec(s, ctx.n_train)
    if s.ground_truth.mode == "scratch":
        return recipe, initial_theta(ctx), s.train.seed
    return recipe, ctx.theta, s.ground_truth.seed


def _minibatch(ctx: Context, weights: torch.Tensor, max_steps: int, downdate=None, batched=True,
               replicate: int = 0) -> NewtonResult:
    """``minibatch_recipe`` on the batches of seed ``base seed + replicate`` (``grad_norm`` is NaN:
    a minibatch run stops at a step count, not at a gradient tolerance, so it is converged by
    definition: ``converged`` is True for every model). ``batched``: True = the
    engine's choice (vmap, except where one model at a time is faster:
    ``minibatch.prefer_sequential``), False = one model at a time, "vmap" = vmap regardless."""
    gt = ctx.setting.ground_truth
    recipe, theta0, seed = minibatch_recipe(ctx)
    what = f"ground truth of {ctx.setting.id!r} ({gt.mode}, {gt.retrain if gt.mode == 'warm' else ctx.setting.train.optimizer})"
    args = (ctx.fm, theta0, weights, ctx.x_train, ctx.y_train, ctx.weight_decay, recipe, seed + replicate)
    # one thread on CPU, as for theta*: hundreds of SGD steps amplify the rounding of a
    # multi-threaded reduction (measured: 1e-2 of max |delta| between 1 and 2 threads on the CNNs)
    with training.reproducible_threads(ctx.device.type == "cpu"):
        if batched == "vmap":  # forced (the benchmark times it where the engine would not choose it)
            theta = minibatch.train_batched(*args)
        elif batched:
            theta = minibatch.train(*args, what=what)
        else:
            theta = minibatch.train_sequential(*args)
    B = weights.shape[0]
    return NewtonResult(theta, torch.full((B,), float("nan"), dtype=theta.dtype, device=theta.device),
                        torch.full((B,), recipe.steps, dtype=torch.long, device=theta.device),
                        torch.ones(B, dtype=torch.bool, device=theta.device))


def _warm_newton(ctx: Context, weights: torch.Tensor, max_steps: int, downdate: torch.Tensor | None = None,
                 batched=True, replicate: int = 0) -> NewtonResult:
    """Warm start from theta*, the setting's damping / CG budget, preconditioned by H* (per-model
    Woodbury if ``downdate``). ``batched``: True = the engine's choice (``newton_explicit.applies``:
    explicit batched Hessians for small softmax-linear models, else Newton-CG), "explicit" / "cg" = that
    path regardless (the benchmark times both), False = ``newton_cg_sequential``."""
    gt = ctx.setting.ground_truth
    if batched is True:
        batched = "explicit" if newton_explicit.applies(ctx.fm, ctx.n_params) else "cg"
    run = {"explicit": newton_explicit.newton_explicit_batched, "cg": newton_cg_batched,
           False: newton_cg_sequential}[batched]
    kw = dict(damping=gt.damping, cg_iters=gt.cg_iters, grad_rtol=GRAD_RTOL, adaptive=True)
    if batched and downdate is not None:
        kw["downdate"] = downdate
    g_star = ctx.train_grad_norm
    tol = max(gt.grad_tol, g_star) if math.isfinite(g_star) and g_star <= STATIONARY_MAX else gt.grad_tol
    return run(ctx.fm, ctx.theta, weights, ctx.x_train, ctx.y_train, ctx.weight_decay, preconditioner(ctx),
               max_steps, tol, **kw)


def _scratch_full_batch(ctx: Context, weights: torch.Tensor, *_, **__) -> NewtonResult:
    """Scratch retraining of a full-batch (L-BFGS + Newton) setting: the setting's own fit from its
    initialisation on each row's weighted objective, one model at a time (``torch.optim.LBFGS``
    cannot be vmapped). Deterministic: the control row reproduces theta*."""
    out = [training.fit(ctx.fm, initial_theta(ctx), ctx.data, ctx.setting, weights=w) for w in weights]
    dev, dt = ctx.theta.device, ctx.theta.dtype
    gn = torch.tensor([g for _, g, _ in out], dtype=dt, device=dev)
    return NewtonResult(torch.stack([t for t, _, _ in out]), gn,
                        torch.tensor([k for _, _, k in out], dtype=torch.long, device=dev),
                        gn < ctx.setting.train.grad_tol)


def _pbrf(ctx: Context, weights: torch.Tensor, *_, **__) -> NewtonResult:
    return pbrf.retrain_weights(ctx, weights)


def _check_warm_minibatch(ctx: Context) -> None:
    gt = ctx.setting.ground_truth
    if gt.lr <= 0 or gt.batch_size < 1 or gt.steps < 1:
        raise ValueError(f"setting {ctx.setting.id!r}, ground-truth mode {gt.mode!r}: minibatch retraining "
                         f"({gt.retrain!r}) needs lr > 0, batch_size >= 1 and steps >= 1 in its GroundTruthSpec; "
                         f"got lr={gt.lr}, batch_size={gt.batch_size}, steps={gt.steps}")


def _check_pbrf_minibatch(ctx: Context) -> None:
    pbrf.proximity(ctx)  # raises without a minimiser
    gt = ctx.setting.ground_truth
    raise ValueError(f"setting {ctx.setting.id!r}, ground-truth mode {gt.mode!r}: the PBRF is solved by Newton-CG; "
                     f"retrain={gt.retrain!r} does not apply")


def _no_check(ctx: Context) -> None:
    pass


@dataclass(frozen=True)
class Recipe:
    name: str
    version: str  # the store key's "engine" field
    stochastic: bool  # retraining depends on a data-order seed: replicates differ
    retrain_weights: Callable[..., NewtonResult]  # (ctx, weights [B, n], max_steps, downdate, batched, replicate)
    downdate: bool = False  # preconditioned per model by its own leave-one-out Hessian
    compute: Callable | None = None  # replaces the control-subtracted computation (pbrf: theta* is its control)
    check: Callable[[Context], None] = _no_check  # clear errors before anything runs


TABLE: dict[tuple[str, str], Recipe] = {
    ("warm", "newton-cg"): Recipe("warm-newton", WARM_NEWTON_VERSION, False, _warm_newton, downdate=True),
    ("warm", "minibatch"): Recipe("warm-minibatch", ENGINE_VERSION, True, _minibatch, check=_check_warm_minibatch),
    ("scratch", "full-batch"): Recipe("scratch-full-batch", ENGINE_VERSION, False, _scratch_full_batch),
    ("scratch", "minibatch"): Recipe("scratch-minibatch", ENGINE_VERSION, True, _minibatch),
    ("pbrf", "newton-cg"): Recipe("pbrf", pbrf.PBRF_VERSION, False, _pbrf, compute=pbrf.compute,
                                  check=lambda ctx: pbrf.proximity(ctx) and None),
    ("pbrf", "minibatch"): Recipe("pbrf", pbrf.PBRF_VERSION, False, _pbrf, check=_check_pbrf_minibatch),
}


def recipe_for(ctx: Context) -> Recipe:
    """The recipe of ``ctx``'s ground-truth spec: warm and pbrf by the spec's own ``retrain``,
    scratch by how theta* was trained (it repeats that training)."""
    gt, s = ctx.setting.ground_truth, ctx.setting
    if gt.mode == "scratch":
        kind = "minibatch" if s.train.minibatch else "full-batch"
    else:
        kind = "minibatch" if gt.minibatch else "newton-cg"
    try:
        return TABLE[(gt.mode, kind)]
    except KeyError:
        raise ValueError(f"setting {s.id!r}: no ground-truth recipe for mode {gt.mode!r} with {kind} retraining; "
                         f"known: {', '.join(f'{m}/{k}' for m, k in TABLE)}") from None


def n_replicates(ctx: Context) -> int:
    """Replicates of the ground truth: the spec's for a stochastic recipe, 1 for a deterministic one."""
    return ctx.setting.ground_truth.replicates if recipe_for(ctx).stochastic else 1
