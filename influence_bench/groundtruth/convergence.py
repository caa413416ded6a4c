"""How far stored leave-one-out ground truth converged: per setting, the removals stored under the
current key, how many met the recipe's criterion, the largest final gradient norm (absolute and
relative to the gradient norm of the same removal-weighted objective at theta*, where warm
retraining starts) and the steps taken (``influence-bench ground-truth convergence``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from influence_bench.api.context import Context
from influence_bench.groundtruth.common import removal_weights
from influence_bench.groundtruth.entries import CONVERGED, UNKNOWN, combine_flags
from influence_bench.groundtruth.keys import replicate_keys
from influence_bench.groundtruth.recipes import recipe_for
from influence_bench.groundtruth.store import GroundTruthStore
from influence_bench.training.newton import weighted_grads


@dataclass
class Convergence:
    setting: str
    recipe: str
    removals: int
    converged: int
    unknown: int  # shards written before the flag
    max_grad_norm: float  # NaN for fixed-horizon (minibatch) recipes
    max_rel_grad_norm: float  # final / start gradient norm; NaN where not a convergence run
    max_steps: int
    median_steps: float

    def line(self) -> str:
        steps = f"{self.max_steps:>5} {self.median_steps:>6.1f}" if self.removals else f"{'-':>5} {'-':>6}"
        return (f"{self.setting:<26} {self.recipe:<15} {self.removals:>5} {self.converged:>5} {self.unknown:>5} "
                f"{self.max_grad_norm:>9.1e} {self.max_rel_grad_norm:>9.1e} {steps}")


HEADER = (f"{'setting':<26} {'recipe':<15} {'rows':>5} {'conv':>5} {'unkn':>5} {'max |g|':>9} {'max rel':>9} "
          f"{'steps':>5} {'median':>6}")


def start_grad_norms(ctx: Context, ids: np.ndarray) -> np.ndarray:
    """``[len(ids)]`` gradient norms at theta* of each removal's weighted objective."""
    w = removal_weights(ctx.n_train, np.asarray(ids, np.int64), ctx.dtype, ctx.device)
    with torch.no_grad():
        g = weighted_grads(ctx.fm, ctx.theta.expand(len(ids), -1), w, ctx.x_train, ctx.y_train, ctx.weight_decay)
    return g.norm(dim=1).cpu().numpy()


def convergence(ctx: Context, store: GroundTruthStore | None = None) -> Convergence:
    """The loo ground truth stored for ``ctx`` (shipped root and cache) at its evaluated test points."""
    store = store or GroundTruthStore()
    got = [store.load_for(k, ctx.test_idx) for k in replicate_keys(ctx, "loo")]
    ids = got[0].ids[np.all([np.isin(got[0].ids, g.ids) for g in got], axis=0)]
    rows = [g.select(ids) for g in got]
    flags = combine_flags([r.converged for r in rows]) if len(ids) else np.zeros(0, np.int8)
    gn = np.nanmax(np.stack([r.grad_norm for r in rows]), 0) if len(ids) and np.isfinite(rows[0].grad_norm).any() \
        else np.full(len(ids), np.nan)
    rel = gn / np.maximum(start_grad_norms(ctx, ids), 1e-300) if np.isfinite(gn).any() else gn
    steps = rows[0].steps
    return Convergence(ctx.setting.id, recipe_for(ctx).name, len(ids), int((flags == CONVERGED).sum()),
                       int((flags == UNKNOWN).sum()), float(np.max(gn)) if len(ids) else np.nan,
                       float(np.max(rel)) if len(ids) else np.nan,
                       int(steps.max(initial=0)), float(np.median(steps)) if len(ids) else np.nan)
