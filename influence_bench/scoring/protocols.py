"""The protocols: which training points are removed (``loo-fixed``: every point or a seeded 100,
shared by all estimators; ``loo-topk``: per test point the k of largest |I| by the estimator under
test; ``lds``: seeded half-subsets), and how an influence matrix is set against their retrained
ground truth (``compare``). Retrained models that did not converge (``Entries.converged``) are never
scored: ``compare`` leaves them out and counts them."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from influence_bench import metrics
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


class Comparison(NamedTuple):
    """``predicted`` and ``actual`` ``[n_test, m]``: the removed points' predicted and retrained changes;
    ``keep`` ``[n_test, m]`` (None: every entry) says which entries are scored (False: the retrained
    model did not converge); ``noise_ceiling`` of that ground truth (1 for deterministic retraining, the
    replicates' split-half agreement over these removals for a stochastic one);
    ``n_unconverged_excluded``: how many removals (or LDS subsets) were left out for not converging."""

    predicted: np.ndarray
    actual: np.ndarray
    noise_ceiling: float
    keep: np.ndarray | None = None
    n_unconverged_excluded: int = 0


def compare(influence: np.ndarray, ctx: Context, protocol: str, store: GroundTruthStore | None = None
            ) -> Comparison:
    """The influence matrix against the retrained ground truth of ``protocol`` (see ``Comparison``;
    its ``noise_ceiling`` is the stored split-half *reliability*: the runner reports its square root)."""
    if protocol == "loo-fixed":
        removed = fixed_removals(ctx)
        gt = build(ctx, "loo", removed, store, cols=ctx.test_idx)
        ok = ~gt.unconverged
        return Comparison(influence[:, removed[ok]], gt.delta[ok].T, gt.noise_ceiling, None, int((~ok).sum()))
    if protocol == "loo-topk":
        top = topk_removals(influence, ctx.setting.protocol.topk)
        union = np.unique(top)
        gt = build(ctx, "loo", union, store, cols=ctx.test_idx)  # column j is test point ctx.test_idx[j]
        row = {int(r): k for k, r in enumerate(union)}
        rows = np.vectorize(lambda i: row[int(i)], otypes=[np.int64])(top) if top.size else top
        actual = np.stack([gt.delta[rows[j], j] for j in range(len(top))])
        predicted = np.take_along_axis(influence, top, 1)
        keep = ~gt.unconverged[rows]
        return Comparison(predicted, actual, gt.noise_ceiling, None if keep.all() else keep,
                          int(gt.unconverged.sum()))
    if protocol == "lds":  # over subsets: actual change vs summed influence of the left-out points
        gt = build(ctx, "lds", np.arange(lds.DEFAULT.n_subsets), store, cols=ctx.test_idx)
        ok = ~gt.unconverged
        predicted = lds.predicted_change(influence, lds.subset_masks(ctx.n_train))
        return Comparison(predicted[:, ok], gt.delta[ok].T, gt.noise_ceiling, None, int((~ok).sum()))
    raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(KNOWN_PROTOCOLS)}")


CORRELATIONS = (metrics.spearman, metrics.pearson)


def per_test(metric: Callable[[np.ndarray, np.ndarray], np.ndarray], c: Comparison) -> np.ndarray:
    """``[n_test]`` values of a row-wise ``metric`` over the scored entries of each test point."""
    def one(p: np.ndarray, a: np.ndarray) -> np.ndarray:  # undefined (NaN) with fewer than 2 entries left
        if p.shape[-1] < 2:
            return np.full(p.shape[:-1], np.nan)
        v = metric(p, a)
        # a constant prediction against a ground truth that varies ranks nothing: it scores 0, not
        # "undefined", so an estimator cannot leave its hard test points out of its own mean
        flat = (np.ptp(p, axis=-1) == 0) & (np.ptp(a, axis=-1) > 0)
        return np.where(flat, 0.0, v) if metric in CORRELATIONS else v

    if c.keep is None:
        return one(c.predicted, c.actual)
    return np.array([one(p[k][None], a[k][None])[0] for p, a, k in zip(c.predicted, c.actual, c.keep)])


