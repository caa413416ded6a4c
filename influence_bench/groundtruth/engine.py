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

import numpy as np
import torch

from influence_bench.api.context import Context
from influence_bench.groundtruth.common import (  # noqa: F401
    EXPLICIT_HESSIAN_MAX,
    cat,
    chunked,
    initial_theta,
    preconditioner,
    removal_downdate,
    removal_weights,
    test_losses,
)
from influence_bench.groundtruth.entries import Entries, convergence_flags
from influence_bench.groundtruth.recipes import (  # noqa: F401
    CEILING_METHOD,
    ENGINE_VERSION,
    MINIBATCH_VERSION,
    NOISE_CEILING,
    Recipe,
    minibatch_recipe,
    n_replicates,
    recipe_for,
)
from influence_bench.training.newton import NewtonResult


def stochastic(ctx: Context) -> bool:
    """Does retraining depend on a seed (so replicates differ)? Warm minibatch retraining, and
    scratch retraining of a minibatch-trained setting."""
    return recipe_for(ctx).stochastic


def check_recipe(ctx: Context) -> None:
    """Clear errors for ground-truth configurations that cannot run."""
    r = recipe_for(ctx)
    r.check(ctx)
    gt = ctx.setting.ground_truth
    if r.stochastic and gt.replicates < 1:
        raise ValueError(f"setting {ctx.setting.id!r}, ground-truth mode {gt.mode!r}: replicates must be >= 1, "
                         f"got {gt.replicates}")


def retrain(ctx: Context, removed: np.ndarray, chunk: int = 128, batched: bool = True,
            replicate: int = 0) -> NewtonResult:
    """Retrain one model per entry of ``removed`` (``-1`` = control). Chunked over models."""
    check_recipe(ctx)
    r, gt = recipe_for(ctx), ctx.setting.ground_truth

    def run(s: int, stop: int) -> NewtonResult:
        rem = removed[s:stop]
        w = removal_weights(ctx.n_train, rem, ctx.dtype, ctx.device)
        downdate = removal_downdate(ctx, rem) if r.downdate and batched else None
        return retrain_weights(ctx, w, gt.max_steps, downdate, batched=batched, replicate=replicate)

    return cat(chunked(len(removed), chunk, run, f"ground truth of {ctx.setting.id!r}"))


def retrain_weights(ctx: Context, weights: torch.Tensor, max_steps: int, downdate: torch.Tensor | None = None,
                    batched: bool = True, replicate: int = 0) -> NewtonResult:
    """Retrain on each row of ``weights`` ([B, n], 0 = removed) with the setting's recipe
    (``recipes.TABLE``)."""
    return recipe_for(ctx).retrain_weights(ctx, weights, max_steps, downdate, batched=batched, replicate=replicate)


def compute(ctx: Context, removed: np.ndarray, chunk: int = 128, batched: bool = True, replicate: int = 0) -> Entries:
    """Ground truth for ``removed`` training indices (with the control run) of one replicate."""
    removed = np.asarray(removed, dtype=np.int64)
    r = recipe_for(ctx)
    if r.compute is not None:  # pbrf: no control, the PBRF optimum without removal is theta*
        check_recipe(ctx)
        return r.compute(ctx, removed, chunk=chunk)
    res = retrain(ctx, np.concatenate([[-1], removed]), chunk=chunk, batched=batched, replicate=replicate)
    losses = test_losses(ctx, res.theta)
    delta = (losses[1:] - losses[0]).cpu().numpy()
    # every delta is measured against the control: if it did not converge, no row did
    converged = res.converged[1:].cpu().numpy() & bool(res.converged[0])
    return Entries(removed, delta, res.grad_norm[1:].cpu().numpy(), res.steps[1:].cpu().numpy(),
                   converged=convergence_flags(converged))
