"""Score one estimator on one setting: compute its influence matrix, fetch (or build) the ground
truth for each protocol, and turn the comparison into result cases."""

from __future__ import annotations

import traceback

import numpy as np
import torch

from . import metrics
from .context import Context, get_context
from .measure import Measurement, measure
from .estimator import Estimator, EstimatorError, EstimatorUnsupported, check_output
from .groundtruth import GroundTruthStore, build, lds
from .registry import REGISTRY
from .schema import Case  # noqa: F401  (Case: the result record, re-exported here)
from .schema import setting_info as setting_shape
from .setting_info import setting_info
from .settings import Setting

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
    """(predicted, actual, noise ceiling): each array ``[n_test, m]``, the removed points' predicted and
    retrained changes; the ceiling of that ground truth (1 for deterministic retraining, the replicates'
    split-half agreement over these removals for a stochastic one)."""
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


def run_estimator(est: Estimator, ctx: Context) -> tuple[np.ndarray, Measurement]:
    """Call the estimator, validate its output; returns (influence [n_test, n_train], time and memory)."""
    where = f"estimator {est.name!r} on setting {ctx.setting.id!r}"
    with measure(ctx.device) as m:
        try:
            out = est.influence(ctx)
        except (EstimatorUnsupported, EstimatorError):
            raise
        except Exception as exc:
            raise EstimatorError(f"{where} raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}") from exc
    return check_output(out, est.name, ctx.setting.id, (ctx.n_test, ctx.n_train)).numpy(), m


def evaluate(estimator: str | Estimator, setting: Setting, device: str = "cpu",
             protocols: tuple[str, ...] | None = None, store: GroundTruthStore | None = None) -> list[Case]:
    """All cases of one estimator on one setting. Never raises for estimator failures: they become
    ``error`` / ``skipped`` cases carrying the message (the other cases still run)."""
    return evaluate_context(estimator, get_context(setting, device), protocols, store)


def evaluate_context(estimator: str | Estimator, ctx: Context, protocols: tuple[str, ...] | None = None,
                     store: GroundTruthStore | None = None, info: dict | None = None) -> list[Case]:
    """``evaluate`` on a context built by the caller (e.g. ``context.build_context`` on generated
    fixture data the setting's hash does not describe). ``info`` replaces the per-setting record of
    ``setting_info`` (curvature by Lanczos: hundreds of Hessian-vector products) when given."""
    est = REGISTRY.create(estimator) if isinstance(estimator, str) else estimator
    setting = ctx.setting
    protocols = tuple(protocols) if protocols else setting.protocol.default
    base = dict(estimator=est.name, setting=setting.id, setting_version=setting.version,
                spec_hash=setting.spec_hash, mode=setting.ground_truth.mode,
                hyperparameters=_jsonable(est.hyperparameters()), setting_info=setting_shape(setting),
                device=str(ctx.device))
    try:
        influence, cost = run_estimator(est, ctx)
    except EstimatorUnsupported as exc:
        return [Case(protocol=p, metric=m, status="skipped", message=f"{est.name} on {setting.id}: {exc}", **base)
                for p in protocols for m in metrics.METRICS]
    except EstimatorError as exc:
        return [Case(protocol=p, metric=m, status="error", message=str(exc), **base)
                for p in protocols for m in metrics.METRICS]
    compared = {p: compare(influence, ctx, p, store) for p in protocols}
    info = setting_info(ctx) if info is None else info  # after ground truth, which has formed the Hessian where it can
    cases = []
    for p in protocols:
        predicted, actual, ceiling = compared[p]
        for m, fn in metrics.METRICS.items():
            agg = metrics.aggregate(fn(predicted, actual))
            cases.append(Case(protocol=p, metric=m, value=agg.mean, ci_low=agg.ci_low, ci_high=agg.ci_high,
                              median=agg.median, min=agg.min, n_test=agg.n, n_undefined=agg.n_undefined,
                              per_test=agg.per_test, test_idx=[int(i) for i in ctx.test_idx],
                              noise_ceiling=ceiling, wall_time_s=cost.seconds, peak_memory_mb=cost.peak_memory_mb,
                              extra_memory_mb=cost.extra_memory_mb,
                              diagnostics=_jsonable({**est.diagnostics, "setting_info": info}), **base))
    return cases


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        elif isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = v
    return out
