"""The runs behind ``influence-bench paper``: the Iris grid under both protocols, the retraining
horizon as an axis, and the MNIST part; each returns result cases (``reporting.schema.Case``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from influence_bench import metrics
from influence_bench.api.loading import get_context
from influence_bench.api.registry import REGISTRY
from influence_bench.groundtruth.builder import build
from influence_bench.groundtruth.recipes import STATIONARY_MAX
from influence_bench.groundtruth.store import GroundTruthStore
from influence_bench.paper.plan import (  # noqa: F401  (the defaults, torch-free for --help)
    HORIZON_ESTIMATORS,
    HORIZON_SETTINGS,
    HORIZONS,
    IRIS_ESTIMATORS,
    MNIST_SETTINGS,
)
from influence_bench.reporting.schema import Case
from influence_bench.scoring.protocols import fixed_removals
from influence_bench.scoring.runner import evaluate_context
from influence_bench.spec import catalog
from influence_bench.spec.catalog_iris_paper import DEPTHS, PAPER_SUFFIX, WEIGHT_DECAYS, WIDTHS, with_horizon
from influence_bench.spec.settings import Setting, format_wd

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def iris_family(family: str, depths: Iterable[int] = DEPTHS, widths: Iterable[int] = WIDTHS,
                weight_decays: Iterable[float] = WEIGHT_DECAYS) -> list[Setting]:
    """The Iris depth sweep (width 16) and width sweep (depth 2) of ``family`` (``converged`` or
    ``paper``) at the given weight decays."""
    if family not in ("converged", "paper"):
        raise ValueError(f"unknown protocol family {family!r}; known: converged, paper")
    suffix = PAPER_SUFFIX if family == "paper" else ""
    shapes = dict.fromkeys([(d, 16) for d in depths] + [(2, w) for w in widths])  # d2-w16 is in both sweeps
    return [catalog.get_setting(f"iris-mlp-d{d}-w{w}-wd{format_wd(wd)}{suffix}")
            for wd in weight_decays for d, w in shapes]


def undefined_leave_one_out(setting: Setting, ctx=None) -> str | None:
    """Why a full-batch setting's converged leave-one-out is undefined (None: it is defined). Warm
    Newton retraining converges to a leave-one-out optimum only from a minimiser: without weight
    decay separable Iris has none, and a theta* above the stationarity bar of the warm-Newton recipe
    is none (every removal would run its 100 steps and be left out unconverged)."""
    if setting.train.minibatch or setting.ground_truth.minibatch or setting.ground_truth.mode != "warm":
        return None
    if setting.weight_decay == 0 and setting.data.name == "iris":
        return "no weight decay: separable Iris has no minimiser, so leave-one-out has no optimum"
    g = ctx.train_grad_norm if ctx is not None else None
    if g is not None and not g <= STATIONARY_MAX:
        return f"theta* is no minimiser (||grad|| {g:.1e} > {STATIONARY_MAX:g}): no leave-one-out optimum near it"
    return None


@dataclass(frozen=True)
class NotRun:
    setting: str
    mode: str
    reason: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def score(settings: Iterable[Setting], estimators: Iterable, device: str = "cpu",
          store: GroundTruthStore | None = None, protocols: tuple[str, ...] | None = None,
          progress: Progress = _quiet, on_cases: Callable[[list[Case]], None] | None = None,
          not_run: list[NotRun] | None = None) -> list[Case]:
    """Every estimator (a name, or ``(name, hyperparameters)``) on every setting whose ground truth
    is defined (the others go to ``not_run`` with the reason, and produce no case)."""
    settings = list(settings)
    out: list[Case] = []
    for i, s in enumerate(settings, 1):
        ctx = None
        for stage in ("spec", "theta"):
            why = undefined_leave_one_out(s, ctx)
            if why is not None:
                break
            if stage == "spec":
                progress(f"[{i}/{len(settings)}] {s.id} ({s.ground_truth.mode}): training / loading theta*")
                ctx = get_context(s, device)
        if why is not None:
            progress(f"[{i}/{len(settings)}] {s.id}: not scored: {why}")
            if not_run is not None:
                not_run.append(NotRun(s.id, s.ground_truth.mode, why))
            continue
        for e in estimators:
            name, hp = (e, {}) if isinstance(e, str) else e
            progress(f"[{i}/{len(settings)}] {s.id} ({s.ground_truth.mode}): {name} and its ground truth")
            cases = evaluate_context(REGISTRY.create(name, **hp), ctx, protocols, store)
            out += cases
            if on_cases is not None:
                on_cases(cases)
    return out


@dataclass(frozen=True)
class Target:
    """One question asked of the estimators in the horizon study: a leave-one-out retrained for
    ``epochs`` epochs of Adam (``horizon``), to convergence (``converged``), or the PBRF (``pbrf``)."""

    label: str
    setting: Setting

    @property
    def mode(self) -> str:
        return self.setting.ground_truth.mode


def horizon_targets(base_id: str, horizons: Iterable[int] = HORIZONS) -> list[Target]:
    base = catalog.get_setting(base_id)
    if base.train.minibatch:
        raise ValueError(f"setting {base_id!r}: the horizon study needs a converged-family setting (full-batch "
                         "theta*), not a minibatch-trained one")
    return ([Target(f"{h} ep", with_horizon(base, h)) for h in horizons]
            + [Target("converged", base), Target("PBRF", base.with_mode("pbrf"))])


@dataclass(frozen=True)
class Agreement:
    """How close a target is to the converged leave-one-out, estimator-free: per test point the
    Spearman correlation of the two ground truths over the loo-fixed removals converged in both."""

    setting: str
    target: str
    mode: str
    spearman: float | None
    ci_low: float | None
    ci_high: float | None
    noise_ceiling: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def horizon(base_id: str, horizons: Iterable[int] = HORIZONS, estimators=HORIZON_ESTIMATORS, device: str = "cpu",
            store: GroundTruthStore | None = None, progress: Progress = _quiet,
            on_cases: Callable[[list[Case]], None] | None = None) -> tuple[list[Case], list[Agreement]]:
    """Every estimator against every target of ``base_id`` on loo-fixed, and each target's agreement
    with the converged leave-one-out."""
    store = store or GroundTruthStore()
    targets = horizon_targets(base_id, horizons)
    cases = score([t.setting for t in targets], estimators, device, store, ("loo-fixed",), progress, on_cases)
    ref = _ground_truth(catalog.get_setting(base_id), device, store)
    agreements = []
    for t in targets:
        delta, ok, reliability = _ground_truth(t.setting, device, store)
        both = ok & ref[1]
        per = metrics.spearman(delta[both].T, ref[0][both].T) if both.sum() > 1 else np.full(delta.shape[1], np.nan)
        agg = metrics.aggregate(per)
        agreements.append(Agreement(base_id, t.label, t.mode, agg.mean, agg.ci_low, agg.ci_high,
                                    metrics.attainable_correlation(reliability)))
    return cases, agreements


def _ground_truth(setting: Setting, device: str, store: GroundTruthStore) -> tuple[np.ndarray, np.ndarray, float]:
    """(delta [m, n_test], converged [m], reliability) of the loo-fixed removals of ``setting``."""
    ctx = get_context(setting, device)
    gt = build(ctx, "loo", fixed_removals(ctx), store, cols=ctx.test_idx)
    return gt.delta, ~gt.unconverged, gt.noise_ceiling


def mnist(device: str = "cpu", store: GroundTruthStore | None = None, progress: Progress = _quiet,
          on_cases: Callable[[list[Case]], None] | None = None) -> list[Case]:
    """The MNIST part: the convex baseline and the small CNN of the paper's Table 1 (on CPU the
    CNN's `exact` Hessian is out of budget; `exact-ggn` is the explicit Gauss-Newton influence)."""
    out: list[Case] = []
    for sid, ests in MNIST_SETTINGS:
        out += score([catalog.get_setting(sid)], ests, device, store, None, progress, on_cases)
    return out
