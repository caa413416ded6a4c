"""Score one estimator on one setting: compute its influence matrix, fetch (or build) the ground
truth for each protocol, and turn the comparison into result cases."""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from . import metrics
from .context import Context, get_context
from .estimator import Estimator, EstimatorError, EstimatorUnsupported, check_output
from .groundtruth import GroundTruthStore, ground_truth
from .registry import REGISTRY
from .setting_info import setting_info
from .settings import Setting

PROTOCOLS = ("loo-fixed", "loo-topk")


@dataclass
class Case:
    """One (estimator, setting, protocol, metric) result; ``status`` is ok | error | skipped."""

    estimator: str
    setting: str
    setting_version: int
    spec_hash: str
    protocol: str
    mode: str
    metric: str
    status: str = "ok"
    value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    median: float | None = None
    min: float | None = None
    n_test: int = 0
    n_undefined: int = 0
    per_test: list = field(default_factory=list)
    test_idx: list = field(default_factory=list)
    noise_ceiling: float = 1.0
    wall_time_s: float | None = None
    peak_memory_mb: float | None = None
    hyperparameters: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():  # JSON has no NaN
            if isinstance(v, float) and not np.isfinite(v):
                d[k] = None
        return d


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
            ) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, actual), each ``[n_test, m]``: the removed points' predicted and retrained changes."""
    if protocol == "loo-fixed":
        removed = fixed_removals(ctx)
        actual = ground_truth(ctx, removed, store)[:, ctx.test_idx].T
        return influence[:, removed], actual
    if protocol == "loo-topk":
        top = topk_removals(influence, ctx.setting.protocol.topk)
        union = np.unique(top)
        gt = ground_truth(ctx, union, store)
        row = {int(r): k for k, r in enumerate(union)}
        actual = np.stack([gt[[row[int(i)] for i in top[j]], ctx.test_idx[j]] for j in range(len(top))])
        predicted = np.take_along_axis(influence, top, 1)
        return predicted, actual
    raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")


def _peak_rss_mb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except Exception:  # pragma: no cover - non-POSIX
        return None


def run_estimator(est: Estimator, ctx: Context) -> tuple[np.ndarray, float]:
    """Call the estimator, validate its output; returns (influence [n_test, n_train], seconds)."""
    where = f"estimator {est.name!r} on setting {ctx.setting.id!r}"
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    t0 = time.perf_counter()
    try:
        out = est.influence(ctx)
    except (EstimatorUnsupported, EstimatorError):
        raise
    except Exception as exc:
        raise EstimatorError(f"{where} raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}") from exc
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    seconds = time.perf_counter() - t0
    return check_output(out, est.name, ctx.setting.id, (ctx.n_test, ctx.n_train)).numpy(), seconds


def evaluate(estimator: str | Estimator, setting: Setting, device: str = "cpu",
             protocols: tuple[str, ...] = PROTOCOLS, store: GroundTruthStore | None = None) -> list[Case]:
    """All cases of one estimator on one setting. Never raises for estimator failures: they become
    ``error`` / ``skipped`` cases carrying the message (the other cases still run)."""
    est = REGISTRY.create(estimator) if isinstance(estimator, str) else estimator
    base = dict(estimator=est.name, setting=setting.id, setting_version=setting.version,
                spec_hash=setting.spec_hash, mode=setting.ground_truth.mode,
                hyperparameters=_jsonable(est.hyperparameters()))
    ctx = get_context(setting, device)
    try:
        influence, seconds = run_estimator(est, ctx)
    except EstimatorUnsupported as exc:
        return [Case(protocol=p, metric=m, status="skipped", message=f"{est.name} on {setting.id}: {exc}", **base)
                for p in protocols for m in metrics.METRICS]
    except EstimatorError as exc:
        return [Case(protocol=p, metric=m, status="error", message=str(exc), **base)
                for p in protocols for m in metrics.METRICS]
    compared = {p: compare(influence, ctx, p, store) for p in protocols}
    info = setting_info(ctx)  # after ground truth, which has formed the Hessian where it can
    cases = []
    for p in protocols:
        predicted, actual = compared[p]
        for m, fn in metrics.METRICS.items():
            agg = metrics.aggregate(fn(predicted, actual))
            cases.append(Case(protocol=p, metric=m, value=agg.mean, ci_low=agg.ci_low, ci_high=agg.ci_high,
                              median=agg.median, min=agg.min, n_test=agg.n, n_undefined=agg.n_undefined,
                              per_test=agg.per_test, test_idx=[int(i) for i in ctx.test_idx],
                              wall_time_s=seconds, peak_memory_mb=_peak_rss_mb(),
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
