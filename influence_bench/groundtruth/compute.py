"""Computing entries now, without a store: one replicate of leave-one-out or LDS retraining, and
the combination of replicates into a ground truth with its noise ceiling."""

from __future__ import annotations

import numpy as np

from influence_bench import metrics
from influence_bench.api.context import Context
from influence_bench.groundtruth import engine, lds
from influence_bench.groundtruth.entries import Entries


def compute(ctx: Context, kind: str, ids: np.ndarray, lds_spec: lds.LdsSpec = lds.DEFAULT,
            replicate: int = 0) -> Entries:
    """Retrain the models of ``ids`` now (no store), for one replicate."""
    if kind == "loo":
        return engine.compute(ctx, ids, replicate=replicate)
    return lds.compute(ctx, ids, lds_spec, replicate=replicate)


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
                   first.steps, noise_ceiling=ceiling, cols=first.cols)
