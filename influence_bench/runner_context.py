"""``evaluate_context``: ``runner.evaluate`` on a context built by the caller.

``runner.evaluate`` takes a catalog setting and builds (or reuses) its context from the setting's
dataset. Code that evaluates on data the setting's hash does not describe (generated fixtures,
e.g. suites/test_imagenet_fixture.py) builds its own ``Context`` with
``context.build_context(setting, ds, ...)`` and scores it here, with the runner's own pieces
(``run_estimator``, ``compare``, the ground-truth store, the metrics), so the result cases are the
runner's. ``info`` replaces the per-setting curvature record (``setting_info``), whose Lanczos
runs are hundreds of Hessian-vector products: pass a dict to skip it.
"""

from __future__ import annotations

from . import metrics
from .context import Context
from .estimator import Estimator, EstimatorError, EstimatorUnsupported
from .groundtruth import GroundTruthStore
from .registry import REGISTRY
from .runner import PROTOCOLS, _jsonable, compare, ground_truth_ceiling, run_estimator
from .schema import Case
from .schema import setting_info as setting_shape
from .setting_info import setting_info


def evaluate_context(estimator: str | Estimator, ctx: Context, protocols: tuple[str, ...] = PROTOCOLS,
                     store: GroundTruthStore | None = None, info: dict | None = None) -> list[Case]:
    """All cases of one estimator on a prebuilt context (see ``runner.evaluate``, which this mirrors)."""
    est = REGISTRY.create(estimator) if isinstance(estimator, str) else estimator
    setting = ctx.setting
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
    info = setting_info(ctx) if info is None else info
    cases = []
    for p in protocols:
        predicted, actual = compared[p]
        ceiling = ground_truth_ceiling(ctx, p, store)
        for m, fn in metrics.METRICS.items():
            agg = metrics.aggregate(fn(predicted, actual))
            cases.append(Case(protocol=p, metric=m, value=agg.mean, ci_low=agg.ci_low, ci_high=agg.ci_high,
                              median=agg.median, min=agg.min, n_test=agg.n, n_undefined=agg.n_undefined,
                              per_test=agg.per_test, test_idx=[int(i) for i in ctx.test_idx],
                              noise_ceiling=ceiling, wall_time_s=cost.seconds, peak_memory_mb=cost.peak_memory_mb,
                              extra_memory_mb=cost.extra_memory_mb,
                              diagnostics=_jsonable({**est.diagnostics, "setting_info": info}), **base))
    return cases
