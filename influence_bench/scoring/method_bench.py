"""``influence-bench bench methods``: for each method (``exact``, ``cg``, ``lissa``, ``arnoldi``, ``ekfac``,
``kfac``, ``tracin``, ``trak``...), our built-in against the fastest peer-library implementation of it
(``plugins/peers``), on the same settings, the same θ* and the same ground truth, from one process:
time (the fastest of ``repeats`` calls, each on a fresh context, so a call pays for the gradients and
curvature it uses and the library's import is not charged), peak memory and fidelity (mean Spearman
on ``loo-fixed``). The ratio is ours / fastest peer: <= 1 means ours is at least as fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from influence_bench.reporting.methods import library_of

DEFAULT_SETTINGS = ("iris-mlp-d2-w16-wd1e-3", "mnist5k-logreg-wd1e-3")


@dataclass
class Timed:
    setting: str
    estimator: str
    method: str
    status: str
    spearman: float | None = None
    times_s: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    message: str = ""

    @property
    def library(self) -> str:
        return library_of(self.estimator)

    @property
    def time_s(self) -> float | None:
        return min(self.times_s) if self.times_s else None


def default_estimators(registry=None) -> list[str]:
    """Every registered estimator whose method has at least one peer implementation, and those peers."""
    if registry is None:
        from influence_bench.api.registry import REGISTRY as registry
    by_method: dict[str, list[str]] = {}
    for name in registry.names():
        cls = registry.get(name)
        by_method.setdefault(cls.method or name, []).append(name)
    return sorted(n for names in by_method.values() if any(":" in n for n in names) and len(names) > 1
                  for n in names)


def time_estimators(settings, estimators: list[str], repeats: int = 3, device: str = "cpu", limits=None,
                    log=lambda line: None) -> list[Timed]:
    """Score each estimator on each setting (``loo-fixed``) and time ``repeats`` calls of it (each under
    ``limits``, ``scoring.isolation.Limits``)."""
    from influence_bench.api.arguments import create
    from influence_bench.api.loading import get_context
    from influence_bench.scoring.runner import evaluate_context, run_estimator

    out = []
    for setting in settings:
        ctx = get_context(setting, device)
        for name in estimators:
            est = create(name)
            method = type(est).method or est.name
            case = next(c for c in evaluate_context(est, ctx, protocols=("loo-fixed",), limits=limits)
                        if c.metric == "spearman")
            t = Timed(setting.id, name, method, case.status, message=(case.message.splitlines() or [""])[0])
            if case.status == "ok":
                t.spearman, t.peak_mb = case.value, case.peak_memory_mb
                t.times_s.append(float(case.wall_time_s))
                for _ in range(max(0, repeats - 1)):
                    _, m = run_estimator(create(name), ctx.fresh(), limits)
                    t.times_s.append(m.seconds)
            log(f"{setting.id} {name}: {t.status}" + (f" {t.time_s:.3g} s, Spearman {t.spearman:.3f}"
                                                      if t.status == "ok" and t.spearman is not None else ""))
            out.append(t)
    return out


def per_method(timed: list[Timed]) -> list[dict]:
    """One row per (setting, method) with our built-in and at least one peer: ours, the fastest peer
    that ran, the ratio ours/peer and each one's fidelity; peers that failed are listed by name."""
    groups: dict[tuple[str, str], list[Timed]] = {}
    for t in timed:
        groups.setdefault((t.setting, t.method), []).append(t)
    rows = []
    for (setting, method), ts in groups.items():
        ours = [t for t in ts if t.library == "influence-bench"]
        peers = [t for t in ts if t.library != "influence-bench"]
        if not ours or not peers:
            continue
        mine = min(ours, key=lambda t: (t.status != "ok", t.time_s or math.inf))
        ran = [t for t in peers if t.status == "ok" and t.time_s is not None]
        best = min(ran, key=lambda t: t.time_s) if ran else None
        ratio = (mine.time_s / best.time_s if best is not None and mine.time_s is not None and best.time_s > 0
                 else None)
        rows.append({"setting": setting, "method": method, "ours": mine.estimator, "ours_time_s": mine.time_s,
                     "ours_spearman": mine.spearman, "ours_status": mine.status, "peer": best.estimator if best else "",
                     "peer_time_s": best.time_s if best else None, "peer_spearman": best.spearman if best else None,
                     "ratio": ratio, "failed_peers": sorted(t.estimator for t in peers if t.status != "ok")})
    return sorted(rows, key=lambda r: (r["setting"], r["method"]))
