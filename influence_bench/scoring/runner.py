"""Score one estimator on one setting: compute its influence matrix, fetch (or build) the ground
truth for each protocol, and turn the comparison into result cases."""

from __future__ import annotations

import numpy as np
import torch

from influence_bench import metrics, progress
from influence_bench.api.arguments import create, estimator_label
from influence_bench.api.context import Context
from influence_bench.api.estimator import Estimator, EstimatorError, EstimatorUnsupported, check_output
from influence_bench.api.loading import get_context
from influence_bench.api.provenance import estimator_source
from influence_bench.data.datasets import lossy_note
from influence_bench.groundtruth.store import GroundTruthStore
from influence_bench.reporting.schema import (
    Case,  # noqa: F401  (Case: the result record, re-exported here)
    setting_shape,
)
from influence_bench.scoring.isolation import Limits, call, safe_diagnostics
from influence_bench.scoring.measure import Measurement
from influence_bench.scoring.protocols import (  # noqa: F401
    KNOWN_PROTOCOLS,
    PROTOCOLS,
    compare,
    fixed_removals,
    per_test,
    topk_removals,
)
from influence_bench.scoring.setting_info import setting_info
from influence_bench.scoring.warmup import warm_up
from influence_bench.spec.settings import Setting


def run_estimator(est: Estimator, ctx: Context, limits: Limits | None = None) -> tuple[np.ndarray, Measurement]:
    """Call the estimator under ``limits`` (``scoring/isolation.py``: a time and memory limit, and a
    context it cannot change for the next user), validate its output; returns (influence
    [n_test, n_train], time and memory). Raises ``EstimatorError`` / ``EstimatorUnsupported``."""
    warm_up(ctx.device)  # the process's first torch.func call is not this estimator's cost (warmup.py)
    out, m = call(est, ctx, limits)
    return check_output(out, est.name, ctx.setting.id, (ctx.n_test, ctx.n_train), ctx.device).numpy(), m


def evaluate(estimator: str | Estimator, setting: Setting, device: str = "cpu",
             protocols: tuple[str, ...] | None = None, store: GroundTruthStore | None = None,
             limits: Limits | None = None) -> list[Case]:
    """All cases of one estimator on one setting. Never raises for estimator failures: they become
    ``error`` / ``skipped`` cases carrying the message (the other cases still run)."""
    with progress.phase("theta*"):  # loaded, or trained (minibatch training reports its steps)
        ctx = get_context(setting, device)
    return evaluate_context(estimator, ctx, protocols, store, limits=limits)


def evaluate_context(estimator: str | Estimator, ctx: Context, protocols: tuple[str, ...] | None = None,
                     store: GroundTruthStore | None = None, info: dict | None = None,
                     fresh: bool = True, limits: Limits | None = None) -> list[Case]:
    """``evaluate`` on a context built by the caller (e.g. ``loading.build_context`` on generated
    fixture data the setting's hash does not describe). ``info`` replaces the per-setting record of
    ``setting_info`` (curvature by Lanczos: hundreds of Hessian-vector products) when given.
    ``fresh=False`` hands the estimator ``ctx`` itself, gradients and curvature it holds included
    (the mutants share exact's; a fidelity case always gets a fresh copy). ``limits``: the call's
    time and memory limits and isolation (``scoring/isolation.py``)."""
    est = create(estimator) if isinstance(estimator, str) else estimator  # a name or a spec: lissa(depth=500)
    setting = ctx.setting
    protocols = tuple(protocols) if protocols else setting.protocol.default
    base = dict(estimator=estimator_label(est), setting=setting.id, setting_version=setting.version,
                spec_hash=setting.spec_hash, mode=setting.ground_truth.mode,
                hyperparameters=_jsonable(est.hyperparameters()), tags=sorted(est.tags),
                method=type(est).method or est.name,
                estimator_source=estimator_source(type(est)), setting_info=_shape(setting, ctx),
                device=str(ctx.device))
    if fresh and setting.model.family not in ("logreg", "linear"):
        # the cost model that budgeted estimators check (a FLOP count of one product, ~0.14 s on the Iris
        # MLPs) is the setting's, kept across fresh copies: counted once here, outside every timed call
        try:
            ctx.hvp_seconds()
        except Exception:  # noqa: BLE001 - not counted here: an estimator that needs it counts it in its own call,
            pass  # where a failure becomes that case's error
    try:
        # a fresh cache: the case pays for the gradients and curvature it uses (its time does not
        # depend on which estimator ran before) and cannot leave edited tensors to the next one
        with progress.phase("estimator"):
            influence, cost = run_estimator(est, ctx.fresh() if fresh else ctx, limits)
    except EstimatorUnsupported as exc:
        return [Case(protocol=p, metric=m, status="skipped", message=f"{est.name} on {setting.id}: {exc}", **base)
                for p in protocols for m in metrics.METRICS]
    except EstimatorError as exc:
        return [Case(protocol=p, metric=m, status="error", message=str(exc), **base)
                for p in protocols for m in metrics.METRICS]
    with progress.phase("ground truth"):  # cached, shipped or retrained (the builder reports its models)
        compared = {p: compare(influence, ctx, p, store) for p in protocols}
    info = setting_info(ctx) if info is None else info  # after ground truth, which has formed the Hessian where it can
    cases = []
    for p in protocols:
        # the ground truth's noise_ceiling is the replicates' split-half reliability (metrics.split_half_ceiling,
        # stored under that name); the ceiling on a correlation is its square root
        c = compared[p]
        reliability = c.noise_ceiling
        ceiling = metrics.attainable_correlation(reliability)
        for m, fn in metrics.METRICS.items():
            agg = metrics.aggregate(per_test(fn, c))
            cases.append(Case(protocol=p, metric=m, value=agg.mean, ci_low=agg.ci_low, ci_high=agg.ci_high,
                              median=agg.median, min=agg.min, n_test=agg.n, n_undefined=agg.n_undefined,
                              per_test=agg.per_test, test_idx=[int(i) for i in ctx.test_idx],
                              at_highest_loss=_at(agg.per_test, 0), at_median_loss=_at(agg.per_test, 1),
                              noise_ceiling=ceiling, noise_reliability=float(reliability),
                              n_unconverged_excluded=c.n_unconverged_excluded,
                              wall_time_s=cost.seconds, peak_memory_mb=cost.peak_memory_mb,
                              extra_memory_mb=cost.extra_memory_mb,
                              diagnostics=safe_diagnostics({**est.diagnostics, "setting_info": info}), **base))
    return cases


def _shape(setting: Setting, ctx: Context) -> dict:
    """``setting_shape`` plus ``lossy`` where the data came from a known lossy copy (the offline
    CIFAR-10: ``jpeg-q75``), so every table and report can say so."""
    note = lossy_note(getattr(ctx.data, "source", ""))
    return {**setting_shape(setting), **({"lossy": note} if note else {})}


def _at(values: list, k: int) -> float | None:
    """``values[k]`` when defined (select_test_points puts the highest-loss point first, then the
    median-loss one)."""
    v = values[k] if len(values) > k else None
    return float(v) if v is not None and np.isfinite(v) else None


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


def removals(ctx, estimators: list, log=print) -> np.ndarray:
    """loo-fixed plus every listed estimator's (a name or an ``Estimator``) loo-topk removals;
    estimators that fail are skipped."""
    from influence_bench.api.registry import REGISTRY
    from influence_bench.errors import EstimatorError, EstimatorUnsupported

    ids = [fixed_removals(ctx)]
    if "loo-topk" not in ctx.setting.protocol.default:  # the suites score loo-fixed alone here
        return ids[0]
    for name in estimators:
        try:
            influence, _ = run_estimator(REGISTRY.create(name) if isinstance(name, str) else name, ctx.fresh())
        except (EstimatorUnsupported, EstimatorError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            who = name if isinstance(name, str) else name.name
            log(f"{ctx.setting.id}: skipping estimator {who!r} ({type(exc).__name__}: {first})")
            continue
        ids.append(np.unique(topk_removals(influence, ctx.setting.protocol.topk)))
    return np.unique(np.concatenate(ids))
