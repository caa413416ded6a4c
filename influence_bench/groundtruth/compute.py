"""Computing entries now, without a store: one replicate of leave-one-out or LDS retraining, and
the combination of replicates into a ground truth with its noise ceiling."""

from __future__ import annotations

import numpy as np
import torch

from influence_bench import metrics
from influence_bench.api.context import Context
from influence_bench.groundtruth import engine, lds
from influence_bench.groundtruth.entries import Entries, combine_flags, convergence_flags
from influence_bench.groundtruth.lds import DEFAULT, LdsSpec, subset_masks


def compute(ctx: Context, kind: str, ids: np.ndarray, lds_spec: lds.LdsSpec = lds.DEFAULT,
            replicate: int = 0) -> Entries:
    """Retrain the models of ``ids`` now (no store), for one replicate."""
    if kind == "loo":
        return engine.compute(ctx, ids, replicate=replicate)
    return compute_lds(ctx, ids, lds_spec, replicate=replicate)


def combine(replicates: list[Entries]) -> Entries:
    """The ground truth of R replicates (same ids and columns): their mean, with the noise ceiling of
    their split-half agreement (Spearman-Brown corrected; NaN for a single replicate)."""
    first = replicates[0]
    if len(replicates) == 1:
        return first
    deltas = np.stack([e.delta for e in replicates])  # [R, m, cols]
    ceiling = metrics.noise_ceiling(deltas.transpose(0, 2, 1)) if len(first.ids) > 2 else float("nan")
    return Entries(first.ids, deltas.mean(0), np.nanmax(np.stack([e.grad_norm for e in replicates]), 0)
                   if np.isfinite(first.grad_norm).any() else first.grad_norm,
                   first.steps, noise_ceiling=ceiling, cols=first.cols,
                   converged=combine_flags([e.converged for e in replicates]))


def compute_lds(ctx: Context, ids: np.ndarray, spec: LdsSpec = DEFAULT, chunk: int = 128, replicate: int = 0) -> Entries:
    """Ground truth for subsets ``ids`` (row k: subset ``ids[k]``), with the control run (one replicate
    of a stochastic recipe)."""
    ids = np.asarray(ids, dtype=np.int64)
    masks = subset_masks(ctx.n_train, spec)[ids]
    weights = torch.as_tensor(np.vstack([np.ones((1, ctx.n_train)), masks.astype(np.float64)]),
                              dtype=ctx.dtype, device=ctx.device)
    engine.check_recipe(ctx)
    parts = engine.chunked(len(weights), chunk, lambda s, stop: engine.retrain_weights(
        ctx, weights[s:stop], spec.max_steps, replicate=replicate), f"LDS ground truth of {ctx.setting.id!r}")
    res = engine.cat(parts)
    losses = engine.test_losses(ctx, res.theta)
    delta = (losses[1:] - losses[0]).cpu().numpy()
    return Entries(ids, delta, res.grad_norm[1:].cpu().numpy(), res.steps[1:].cpu().numpy(),
                   noise_ceiling=engine.NOISE_CEILING, converged=convergence_flags(res.converged[1:].cpu().numpy()))
