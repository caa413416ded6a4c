"""Leave-one-out retraining, many models at once (``torch.func.vmap`` over removal weights).

The setting's ``GroundTruthSpec`` picks the recipe:

* ``warm`` + ``newton-cg`` (full batch, deterministic): every model starts at theta*, the removed
  point's weight is zero, and at most ``max_steps`` Newton-CG steps are taken;
* ``warm`` + ``sgd`` / ``adam`` (minibatch, ``minibatch.py``): ``steps`` optimiser steps from theta*
  on the batches of the replicate's data-order seed;
* ``scratch``: the setting's whole training recipe again, from the same initialisation: for a
  minibatch recipe on the batches of the replicate's seed (replicate 0: the seed theta* was trained
  with); for a full-batch recipe its deterministic L-BFGS + Newton fit, one model at a time.

A control model trained the same way without removal is subtracted, so continued training (or the
training noise of a replicate) is not mistaken for influence:
``delta[i] = L(z; theta_-i) - L(z; theta_control)``. Models are retrained in chunks; a chunk that
runs out of memory is halved and retried (with a warning).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .. import curvature, minibatch, training
from ..context import Context
from ..newton import NewtonResult, Preconditioner, newton_cg_batched, newton_cg_sequential
from .store import Entries

# Bump whenever a change to the retraining can change stored numbers: it is part of the store key.
ENGINE_VERSION = "warm-newton-cg/2"
# Newton-CG retraining is deterministic (no data order, no sampling): replicates are identical, so
# the noise ceiling is 1 by declaration (a test checks two builds are bit-identical). Minibatch
# recipes are stochastic: their ceiling comes from replicates (``build.py``).
NOISE_CEILING = 1.0
CEILING_METHOD = "deterministic"
MINIBATCH_VERSION = "minibatch/1"  # part of the store key of minibatch recipes


def stochastic(ctx: Context) -> bool:
    """Does retraining depend on a seed (so replicates differ)? Warm minibatch retraining, and
    scratch retraining of a minibatch-trained setting."""
    gt = ctx.setting.ground_truth
    if gt.mode == "warm":
        return gt.minibatch
    return gt.mode == "scratch" and ctx.setting.train.minibatch


def n_replicates(ctx: Context) -> int:
    return ctx.setting.ground_truth.replicates if stochastic(ctx) else 1


def check_recipe(ctx: Context) -> None:
    """Clear errors for ground-truth configurations that cannot run."""
    s = ctx.setting
    gt = s.ground_truth
    where = f"setting {s.id!r}, ground-truth mode {gt.mode!r}"
    if gt.mode == "pbrf":
        from . import pbrf

        pbrf.proximity(ctx)  # raises without a minimiser
        if gt.minibatch:
            raise ValueError(f"{where}: the PBRF is solved by Newton-CG; retrain={gt.retrain!r} does not apply")
    if gt.mode == "warm" and gt.minibatch and (gt.lr <= 0 or gt.batch_size < 1 or gt.steps < 1):
        raise ValueError(f"{where}: minibatch retraining ({gt.retrain!r}) needs lr > 0, batch_size >= 1 and "
                         f"steps >= 1 in its GroundTruthSpec; got lr={gt.lr}, batch_size={gt.batch_size}, "
                         f"steps={gt.steps}")
    if stochastic(ctx) and gt.replicates < 1:
        raise ValueError(f"{where}: replicates must be >= 1, got {gt.replicates}")


def minibatch_recipe(ctx: Context) -> tuple[minibatch.Recipe, torch.Tensor, int]:
    """(recipe, start point, base data-order seed) of minibatch retraining."""
    s = ctx.setting
    gt = s.ground_truth
    if gt.mode == "scratch":
        return training.minibatch_recipe(s, ctx.n_train), initial_theta(ctx), s.train.seed
    return (minibatch.Recipe(gt.retrain, gt.lr, gt.batch_size, gt.steps, gt.momentum), ctx.theta, gt.seed)


def initial_theta(ctx: Context) -> torch.Tensor:
    """The setting's seeded initialisation (where theta*'s training started)."""
    def make():
        m = training.initial_module(ctx.setting, ctx.data, ctx.dtype, ctx.device)
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    return ctx._memo("gt-initial-theta", make)


# Above this many parameters the explicit Hessian (P^2 floats) is not formed: retraining runs
# Newton-CG without a preconditioner (more CG iterations per step for the same accuracy).
EXPLICIT_HESSIAN_MAX = 12_000


def preconditioner(ctx: Context) -> Preconditioner:
    damping = ctx.setting.ground_truth.damping
    if ctx.n_params > EXPLICIT_HESSIAN_MAX:
        return Preconditioner.identity(damping)
    return ctx._memo(("gt-precond", damping), lambda: Preconditioner.from_hessian(ctx.hessian(), damping))


def removal_weights(n: int, removed: np.ndarray, dtype, device) -> torch.Tensor:
    """Row b is all ones except a zero at ``removed[b]``; ``removed[b] = -1`` means no removal."""
    w = torch.ones(len(removed), n, dtype=dtype, device=device)
    rows = np.flatnonzero(removed >= 0)
    w[torch.as_tensor(rows), torch.as_tensor(removed[rows])] = 0.0
    return w


def removal_downdate(ctx: Context, removed: np.ndarray) -> torch.Tensor:
    """``[B, P, C]`` factors U_b with U_b U_b^T = (removed point's Gauss-Newton curvature) / n
    (zero for the control row), so each model is preconditioned by its own leave-one-out Hessian."""
    rows = np.flatnonzero(removed >= 0)
    idx = torch.as_tensor(removed[rows])
    F = curvature.output_curvature_factors(ctx.fm, ctx.theta, ctx.x_train[idx], ctx.y_train[idx])
    U = torch.zeros(len(removed), *F.shape[1:], dtype=F.dtype, device=F.device)
    U[torch.as_tensor(rows)] = F / ctx.n_train ** 0.5
    return U


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def chunked(n: int, chunk: int, run, what: str) -> list:
    """``run(start, stop)`` over ``[0, n)`` in chunks of at most ``chunk`` models; a chunk that runs out
    of memory is halved (down to one model) and retried, with a warning saying so."""
    out, s = [], 0
    while s < n:
        stop = min(s + chunk, n)
        try:
            out.append(run(s, stop))
        except (RuntimeError, MemoryError) as exc:
            if not (_is_oom(exc) or isinstance(exc, MemoryError)) or chunk == 1:
                raise
            chunk = max(1, (stop - s) // 2)
            warnings.warn(f"{what}: out of memory retraining {stop - s} models at once; halving the chunk to "
                          f"{chunk} models and continuing", stacklevel=2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        s = stop
    return out


def retrain(ctx: Context, removed: np.ndarray, chunk: int = 128, batched: bool = True,
            replicate: int = 0) -> NewtonResult:
    """Retrain one model per entry of ``removed`` (``-1`` = control). Chunked over models."""
    check_recipe(ctx)
    gt = ctx.setting.ground_truth

    def run(s: int, stop: int) -> NewtonResult:
        rem = removed[s:stop]
        w = removal_weights(ctx.n_train, rem, ctx.dtype, ctx.device)
        if stochastic(ctx) or gt.mode == "scratch":  # no Newton preconditioner downdate to build
            return retrain_weights(ctx, w, gt.max_steps, batched=batched, replicate=replicate)
        return retrain_weights(ctx, w, gt.max_steps, removal_downdate(ctx, rem) if batched else None,
                               batched=batched)

    return _cat(chunked(len(removed), chunk, run, f"ground truth of {ctx.setting.id!r}"))


def retrain_weights(ctx: Context, weights: torch.Tensor, max_steps: int, downdate: torch.Tensor | None = None,
                    batched: bool = True, replicate: int = 0) -> NewtonResult:
    """Retrain on each row of ``weights`` ([B, n], 0 = removed) with the setting's recipe.

    Newton-CG: warm start from theta*, the setting's damping / CG budget, preconditioned by H*
    (per-model Woodbury if ``downdate``). Minibatch: ``minibatch_recipe`` on the batches of seed
    ``base seed + replicate`` (``grad_norm`` is then NaN: a minibatch run stops at a step count, not
    at a gradient tolerance). ``batched``: True = the engine's choice (vmap, except where one model
    at a time is faster: ``minibatch.prefer_sequential``), False = one model at a time, "vmap" = vmap
    regardless."""
    gt = ctx.setting.ground_truth
    if gt.mode == "pbrf":
        from . import pbrf

        return pbrf.retrain_weights(ctx, weights)
    if gt.mode == "scratch" and not ctx.setting.train.minibatch:
        return _scratch_full_batch(ctx, weights)
    if stochastic(ctx):
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
    run = newton_cg_batched if batched else newton_cg_sequential
    kw = dict(damping=gt.damping, cg_iters=gt.cg_iters)
    if batched and downdate is not None:
        kw["downdate"] = downdate
    return run(ctx.fm, ctx.theta, weights, ctx.x_train, ctx.y_train, ctx.weight_decay, preconditioner(ctx),
               max_steps, gt.grad_tol, **kw)


def _scratch_full_batch(ctx: Context, weights: torch.Tensor) -> NewtonResult:
    """Scratch retraining of a full-batch (L-BFGS + Newton) setting: the setting's own fit from its
    initialisation on each row's weighted objective, one model at a time (``torch.optim.LBFGS``
    cannot be vmapped). Deterministic: the control row reproduces theta*."""
    out = [training.fit(ctx.fm, initial_theta(ctx), ctx.data, ctx.setting, weights=w) for w in weights]
    dev, dt = ctx.theta.device, ctx.theta.dtype
    gn = torch.tensor([g for _, g, _ in out], dtype=dt, device=dev)
    return NewtonResult(torch.stack([t for t, _, _ in out]), gn,
                        torch.tensor([k for _, _, k in out], dtype=torch.long, device=dev),
                        gn < ctx.setting.train.grad_tol)


def _cat(parts: list[NewtonResult]) -> NewtonResult:
    return NewtonResult(*(torch.cat([getattr(p, f) for p in parts]) for f in ("theta", "grad_norm", "steps", "converged")))


def test_losses(ctx: Context, thetas: torch.Tensor) -> torch.Tensor:
    """``[B, n_test_all]`` losses of every test-set point under each model."""
    with torch.no_grad():
        return torch.stack([curvature.per_sample_loss(ctx.fm, t, ctx.data.x_test, ctx.data.y_test) for t in thetas])


def compute(ctx: Context, removed: np.ndarray, chunk: int = 128, batched: bool = True, replicate: int = 0) -> Entries:
    """Ground truth for ``removed`` training indices (with the control run) of one replicate."""
    removed = np.asarray(removed, dtype=np.int64)
    if ctx.setting.ground_truth.mode == "pbrf":  # no control: the PBRF optimum without removal is theta*
        from . import pbrf

        check_recipe(ctx)
        return pbrf.compute(ctx, removed, chunk=chunk)
    res = retrain(ctx, np.concatenate([[-1], removed]), chunk=chunk, batched=batched, replicate=replicate)
    losses = test_losses(ctx, res.theta)
    delta = (losses[1:] - losses[0]).cpu().numpy()
    return Entries(removed, delta, res.grad_norm[1:].cpu().numpy(), res.steps[1:].cpu().numpy())
