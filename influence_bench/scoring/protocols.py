"""The protocols: which training points are removed (``loo-fixed``: every point or a seeded 100,
shared by all estimators; ``loo-topk``: per test point the k of largest |I| by the estimator under
test; ``lds``: seeded half-subsets), and how an influence matrix is set against their retrained
ground truth (``compare``)."""

from __future__ import annotations

import numpy as np

from influence_bench.api.context import Context
from influence_bench.groundtruth import lds
from influence_bench.groundtruth.builder import build
from influence_bench.groundtruth.store import GroundTruthStore

# Run by default. "lds" is available on request (``protocols=`` / ``--protocol``): on Iris logistic
# regression its 100 subset retrainings take 0.3 s, but on the Iris MLPs 30-45 s each, and warm
# Newton from theta* does not reach grad_tol there within 40 steps (see groundtruth/lds.py).
PROTOCOLS = ("loo-fixed", "loo-topk")


KNOWN_PROTOCOLS = PROTOCOLS + ("lds",)


def fixed_removals(ctx: Context) -> np.ndarray:
    p = ctx.setting.protocol
    if ctx.n_train <= p.fixed_all_below:
        return np.arange(ctx.n_train)
    rng = np.random.default_rng(p.fixed_seed)
    return np.sort(rng.choice(ctx.n_train, size=min(p.fixed_n, ctx.n_train), replace=False))


def topk_removals(influence: np.ndarray, k: int) -> np.ndarray:
    """``[n_test, k]`` per test point, the training indices of largest |I| (ties: lower index)."""
    k = min(k, influence.shape[1])
    return np.argsort(-np.abs(influence), axis=1, kind="stable")[:, :k]


def compare(influence: np.ndarray, ctx: Context, protocol: str, store: GroundTruthStore | None = None
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """(predicted, actual, reliability): each array ``[n_test, m]``, the removed points' predicted and
    retrained changes; the reliability of that ground truth (1 for deterministic retraining, the
    replicates' Spearman-Brown corrected split-half agreement over these removals for a stochastic
    one; the store's ``noise_ceiling`` holds it). The runner reports ``sqrt`` of it as the ceiling."""
    if protocol == "loo-fixed":
        removed = fixed_removals(ctx)
        gt = build(ctx, "loo", removed, store, cols=ctx.test_idx)
        return influence[:, removed], gt.delta.T, gt.noise_ceiling
    if protocol == "loo-topk":
        top = topk_removals(influence, ctx.setting.protocol.topk)
        union = np.unique(top)
        gt = build(ctx, "loo", union, store, cols=ctx.test_idx)  # column j is test point ctx.test_idx[j]
        row = {int(r): k for k, r in enumerate(union)}
        actual = np.stack([gt.delta[[row[int(i)] for i in top[j]], j] for j in range(len(top))])
        predicted = np.take_along_axis(influence, top, 1)
        return predicted, actual, gt.noise_ceiling
    if protocol == "lds":  # over subsets: actual change vs summed influence of the left-out points
        gt = build(ctx, "lds", np.arange(lds.DEFAULT.n_subsets), store, cols=ctx.test_idx)
        return lds.predicted_change(influence, lds.subset_masks(ctx.n_train)), gt.delta.T, gt.noise_ceiling
    raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(KNOWN_PROTOCOLS)}")


