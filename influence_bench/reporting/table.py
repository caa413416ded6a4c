"""The fidelity table printed at the end of a pytest session and by ``influence-bench score``, and the
per-test-point table of ``score --test-points``: built as ``render.Table`` models, so the same rows
print as text that fits 100 columns, Markdown, CSV or JSON (``render.py``)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

from influence_bench.reporting.render import DEFAULT_WIDTH, Column, Table, render


def _num(spec: str):
    def fmt(v) -> str:
        if v is None:
            return ""
        return "n/a" if (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)
    return fmt


def _ci(v) -> str:
    if not v:
        return ""
    mean, lo, hi = v
    if mean is None or not math.isfinite(mean):
        return "n/a"
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{mean:.3f} [no CI]"  # fewer than two defined test points
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


FIDELITY_COLUMNS = [
    Column("verdict", "verdict"),
    Column("shown", "estimator", flex=True),
    Column("protocol", "protocol"),
    Column("spearman_ci", "Spearman mean [95% CI]", fmt=_ci),
    Column("pearson", "Pearson", "right", _num(".3f")),
    Column("n", "n", "right"),
    Column("time_s", "time s", "right", _num(".2f")),
    Column("spearman_min", "Spearman min", "right", _num(".3f"), wide=True),
    Column("ceiling", "ceiling", "right", _num(".2f"), wide=True),
    Column("pearson_ci", "Pearson mean [95% CI]", fmt=_ci, wide=True),
    Column("peak_mib", "peak MiB", "right", _num(".0f"), wide=True),
]

# csv / json: raw values, one field each
FIDELITY_FIELDS = ["setting", "estimator", "protocol", "verdict", "status", "source", "spearman", "spearman_ci_low",
                   "spearman_ci_high", "spearman_min", "pearson", "pearson_ci_low", "pearson_ci_high", "n_test",
                   "n_unconverged_excluded", "ceiling", "time_s", "peak_mib"]


def fidelity_rows(cases: Iterable, verdicts: dict | None = None, reference: Iterable = (),
                  reasons: dict | None = None) -> Table:
    """One row per (setting, estimator, protocol), grouped by setting. ``verdicts`` maps (estimator,
    setting, protocol) -> "pass"/"FAIL"/"xfail". ``reference`` cases (a baseline's, not recomputed)
    are marked with a dagger after the estimator's name. ``reasons`` maps a key to the lines that
    explain its FAIL or xfail verdict (``judge(..., reasons=)``), printed whole under the row."""
    ref_keys = {(c.setting, c.estimator, c.protocol) for c in reference}
    rows, info = defaultdict(dict), {}
    for c in list(cases) + list(reference):
        key = (c.setting, c.estimator, c.protocol)
        rows[key][c.metric] = c
        info[key] = c
    table = Table(FIDELITY_COLUMNS, group_key="setting", empty="(no fidelity cases)", fields=FIDELITY_FIELDS)
    lossy = {c.setting: c.setting_info.get("lossy") for c in info.values()
             if isinstance(c.setting_info, dict) and c.setting_info.get("lossy")}
    by_setting = defaultdict(list)
    for key in sorted(rows):
        setting, est, proto = key
        c0 = info[key]
        s, p = rows[key].get("spearman"), rows[key].get("pearson")
        row = {"setting": setting, "shown": est + (" \u2020" if key in ref_keys else ""), "protocol": proto,
               "verdict": (verdicts or {}).get(key, ""), "estimator": est, "status": c0.status,
               "source": "baseline" if key in ref_keys else "run"}
        if c0.status != "ok":
            row["verdict"] = row["verdict"] or {"skipped": "skip"}.get(c0.status, c0.status)
            row["_note"] = _reason(c0)
        else:
            if (reasons or {}).get(key):
                row["_note"] = " / ".join(_strip_key(line, est, setting, proto) for line in reasons[key])
            n = f"{c0.n_test}" + (f" ~{c0.n_unconverged_excluded}" if c0.n_unconverged_excluded else "")
            row.update(spearman_ci=(s.value, s.ci_low, s.ci_high) if s else None, pearson=p.value if p else None,
                       pearson_ci=(p.value, p.ci_low, p.ci_high) if p else None, spearman_min=s.min if s else None,
                       n=n, ceiling=c0.noise_ceiling, time_s=c0.wall_time_s, peak_mib=c0.peak_memory_mb,
                       n_test=c0.n_test, n_unconverged_excluded=c0.n_unconverged_excluded)
            for m, c in (("spearman", s), ("pearson", p)):
                row.update({m: c.value if c else None, f"{m}_ci_low": c.ci_low if c else None,
                            f"{m}_ci_high": c.ci_high if c else None})
        table.rows.append(row)
        by_setting[setting].append(c0)
    for setting, cs in by_setting.items():
        ceilings = sorted({round(c.noise_ceiling, 2) for c in cs if c.status == "ok" and c.noise_ceiling is not None
                           and math.isfinite(c.noise_ceiling)})
        tests = sorted({c.n_test for c in cs if c.status == "ok"})
        facts = []
        if ceilings:
            facts.append(f"noise ceiling {ceilings[0]:.2f}" + (f"-{ceilings[-1]:.2f}" if len(ceilings) > 1 else ""))
        if tests:
            facts.append(f"{tests[-1]} test points")
        if setting in lossy:
            facts.append(f"lossy data: {lossy[setting]}")
        name = f"{setting}*" if setting in lossy else setting
        table.group_titles[setting] = name + (f"  ({', '.join(facts)})" if facts else "")
    if any(c.n_unconverged_excluded for c in info.values() if c.status == "ok"):
        table.notes.append("n ~K: K removals left out of the scores, their retraining did not converge")
    if ref_keys:
        table.notes.append("\u2020 from the baseline, not recomputed")
    for note in sorted(set(lossy.values())):
        names = ", ".join(sorted(s for s, v in lossy.items() if v == note))
        table.notes.append(f"* lossy: {note} (images from a lossy re-encoding, not the original data): {names}")
    return table


def _strip_key(line: str, est: str, setting: str, proto: str) -> str:
    """A verdict line without the ``est on setting (proto): `` its row already says."""
    prefix = f"{est} on {setting} ({proto}): "
    return line[len(prefix):] if line.startswith(prefix) else line


def _reason(case) -> str:
    """An error's or a skip's message, whole, without a doubled ``est on setting:`` prefix."""
    text = " ".join((case.message or case.status).split())
    prefix = f"{case.estimator} on {case.setting}: "
    if text.startswith(prefix) and case.setting in text[len(prefix):]:
        text = text[len(prefix):]
    return text


def fidelity_table(cases: Iterable, verdicts: dict | None = None, reference: Iterable = (),
                   fmt: str = "table", width: int = DEFAULT_WIDTH, footers: dict | None = None,
                   reasons: dict | None = None) -> str:
    """The fidelity table as text (``width`` columns at most), markdown, csv or json; ``footers``:
    lines printed under a setting's rows (e.g. ``rank_footers``)."""
    table = fidelity_rows(cases, verdicts, reference, reasons)
    table.group_footers.update(footers or {})
    return render(table, fmt, width)


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def rank_footers(cases: Iterable, reference: Iterable) -> dict:
    """Per setting, one line: where each scored estimator ranks by mean Spearman among the reference
    (baseline) estimators on each protocol, e.g. ``rank among 13 baseline estimators: loo-fixed 1st of 14``."""
    mine = defaultdict(dict)
    for c in cases:
        if c.metric == "spearman" and c.status == "ok" and c.value is not None and math.isfinite(c.value):
            mine[c.setting].setdefault(c.estimator, {})[c.protocol] = c.value
    theirs = defaultdict(lambda: defaultdict(dict))
    for c in reference:
        if c.metric == "spearman" and c.status == "ok" and c.value is not None and math.isfinite(c.value):
            theirs[c.setting][c.protocol][c.estimator] = c.value
    out = {}
    for setting, ests in mine.items():
        lines = []
        for est, by_proto in sorted(ests.items()):
            parts = []
            for proto, v in sorted(by_proto.items()):
                others = {e: x for e, x in theirs[setting][proto].items() if e != est}
                if not others:
                    continue
                rank = 1 + sum(x > v for x in others.values())
                best = max(others, key=others.get)
                parts.append(f"{proto} {_ordinal(rank)} of {len(others) + 1} (best other: {best} {others[best]:.3f})")
            if parts:
                lines.append(f"  {est} ranks " + "; ".join(parts))
        if lines:
            out[setting] = lines
    return out


TEST_POINT_COLUMNS = [
    Column("estimator", "estimator", flex=True),
    Column("protocol", "protocol"),
    Column("highest", "highest-loss P / S", "right"),
    Column("median", "median-loss P / S", "right"),
    Column("range", "Spearman range", "right"),
]


def test_point_table(cases: Iterable, fmt: str = "table", width: int = DEFAULT_WIDTH) -> str:
    """The paper's Table 1 view: per (setting, estimator, protocol), Pearson / Spearman at the
    highest-loss and at the median-loss test point alone, and the Spearman range over all test points."""
    rows = defaultdict(dict)
    for c in cases:
        if c.status == "ok" and c.metric in ("spearman", "pearson"):
            rows[(c.setting, c.estimator, c.protocol)][c.metric] = c
    table = Table(TEST_POINT_COLUMNS, group_key="setting", empty="(no fidelity cases)")
    f = _num(".2f")
    for (setting, est, proto), m in sorted(rows.items()):
        p, s = m.get("pearson"), m.get("spearman")

        def pair(attr):
            return f"{f(getattr(p, attr, None))} / {f(getattr(s, attr, None))}"

        vals = [v for v in (s.per_test if s else []) if v is not None and math.isfinite(v)]
        table.rows.append({"setting": setting, "estimator": est, "protocol": proto,
                           "highest": pair("at_highest_loss"), "median": pair("at_median_loss"),
                           "range": f"{min(vals):.2f} .. {max(vals):.2f}" if vals else "n/a"})
    return render(table, fmt, width)
