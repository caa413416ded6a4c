"""Scores ready to draw and tabulate: one ``Point`` per (estimator, setting, protocol, metric)
case, with the setting's shape (depth, width, weight decay) and the order rows and panels take."""

from __future__ import annotations

from dataclasses import dataclass

from influence_bench.reporting.schema import Case, Run, setting_shape

FIDELITY = ("spearman", "pearson")


@dataclass(frozen=True)
class Point:
    """One (estimator, setting, protocol, metric) score ready to plot."""

    case: Case
    shape: dict | None

    def __getattr__(self, name):
        return getattr(self.case, name)

    @property
    def top_eigenvalue(self) -> float | None:
        # the runner's record: diagnostics.setting_info.hessian_eigenvalues.top (setting_info.py)
        info = self.case.diagnostics.get("setting_info") if isinstance(self.case.diagnostics, dict) else None
        ev = info.get("hessian_eigenvalues") if isinstance(info, dict) else None
        top = ev.get("top") if isinstance(ev, dict) else None
        if isinstance(top, list) and top and isinstance(top[0], (int, float)):
            return float(top[0])
        for src in (self.case.diagnostics, self.case.setting_info):  # older / hand-made run files
            curv = src.get("curvature") if isinstance(src, dict) else None
            if isinstance(curv, dict) and isinstance(curv.get("top_eigenvalue"), (int, float)):
                return float(curv["top_eigenvalue"])
        return None


def shape_of(case: Case) -> dict | None:
    if {"family", "depth", "width", "weight_decay"} <= set(case.setting_info):
        return case.setting_info
    try:
        from influence_bench.spec.catalog import UnknownSetting, get_setting

        s = get_setting(case.setting)
    except (ImportError, UnknownSetting):
        return None
    if s.version != case.setting_version:  # (a changed hash changes numbers, not the shape of an id)
        return None
    return setting_shape(s)


def merge_cases(runs: list[Run]) -> list[Case]:
    """All cases of all runs; a later run's case replaces an earlier one with the same key, except that a
    later ``skipped`` / ``error`` case never replaces an earlier ``ok`` one (a rerun that could not score a
    case says nothing about the score it had)."""
    out: dict[tuple, Case] = {}
    for r in runs:
        for c in r.cases:
            key = (c.estimator, c.setting, c.protocol, c.mode, c.metric)
            if c.status == "ok" or key not in out or out[key].status != "ok":
                out[key] = c
    return list(out.values())


def sort_key(p: Point) -> tuple:
    s = p.shape or {}
    return (s.get("dataset", p.setting), s.get("family", ""), s.get("depth", 0), s.get("width", 0),
            s.get("weight_decay", 0.0), p.setting, p.estimator, p.protocol)
