"""The fidelity table printed at the end of a pytest session and by ``influence-bench score``."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable


def _fmt(v, spec=".3f") -> str:
    return "  n/a" if v is None else format(v, spec)


def _excluded(case) -> str:
    n = getattr(case, "n_unconverged_excluded", 0)
    return f" ~{n}" if n else ""


def fidelity_table(cases: Iterable, verdicts: dict | None = None) -> str:
    """One row per (setting, estimator, protocol): Spearman and Pearson mean [95% CI], min, time.

    ``verdicts`` maps (estimator, setting, protocol) -> "pass"/"FAIL"/"xfail"; shown when given.
    A ``~K`` after ``n`` says that K removals were left out because their retraining did not converge.
    """
    rows = defaultdict(dict)
    info = {}
    for c in cases:
        key = (c.setting, c.estimator, c.protocol)
        rows[key][c.metric] = c
        info[key] = c
    if not rows:
        return "(no fidelity cases)"
    header = f"{'setting':<26} {'estimator':<16} {'protocol':<10} {'spearman [95% CI]':<24} {'min':>6} " \
             f"{'pearson [95% CI]':<24} {'n':>3}{'':<5} {'ceil':>5} {'time s':>7}  verdict"
    lines = [header, "-" * len(header)]
    last_setting = None
    lossy = {c.setting: c.setting_info.get("lossy") for c in info.values()
             if isinstance(c.setting_info, dict) and c.setting_info.get("lossy")}
    for key in sorted(rows):
        setting, est, proto = key
        c0 = info[key]
        shown = f"{setting}*" if setting in lossy else setting
        if c0.status != "ok":
            cells = f"{c0.status.upper()}: {c0.message.splitlines()[0][:90]}"
            lines.append(f"{shown if setting != last_setting else '':<26} {est:<16} {proto:<10} {cells}")
            last_setting = setting
            continue
        s, p = rows[key].get("spearman"), rows[key].get("pearson")

        def cell(c):
            if c is None or c.value is None or not math.isfinite(c.value):
                return f"{'n/a':<24}"
            if c.ci_low is None or c.ci_high is None or not (math.isfinite(c.ci_low) and math.isfinite(c.ci_high)):
                return f"{c.value:6.3f} [no CI]".ljust(24)  # fewer than two defined test points
            return f"{c.value:6.3f} [{c.ci_low:6.3f},{c.ci_high:6.3f}]".ljust(24)

        verdict = (verdicts or {}).get(key, "")
        lines.append(f"{shown if setting != last_setting else '':<26} {est:<16} {proto:<10} {cell(s)} "
                     f"{_fmt(s.min if s else None, '6.3f'):>6} {cell(p)} {c0.n_test:>3}"
                     f"{_excluded(c0):<5} {c0.noise_ceiling:5.2f} {_fmt(c0.wall_time_s, '7.2f'):>7}  {verdict}")
        last_setting = setting
    for note in sorted(set(lossy.values())):
        names = ", ".join(sorted(s for s, v in lossy.items() if v == note))
        lines.append(f"* lossy: {note} (images from a lossy re-encoding, not the original data): {names}")
    return "\n".join(lines)


def test_point_table(cases: Iterable) -> str:
    """The paper's Table 1 view: per (setting, estimator, protocol), Pearson / Spearman at the
    highest-loss and at the median-loss test point alone, and the Spearman range over all test points."""
    rows = defaultdict(dict)
    for c in cases:
        if c.status == "ok" and c.metric in ("spearman", "pearson"):
            rows[(c.setting, c.estimator, c.protocol)][c.metric] = c
    if not rows:
        return "(no fidelity cases)"
    header = (f"{'setting':<30} {'estimator':<15} {'protocol':<9} {'highest P/S':>11} {'median P/S':>11} "
              f"{'S range':>11}")
    lines = [header, "-" * len(header)]
    for (setting, est, proto), m in sorted(rows.items()):
        p, s = m.get("pearson"), m.get("spearman")

        def pair(attr):
            return f"{_fmt(getattr(p, attr, None), '.2f').strip()}/{_fmt(getattr(s, attr, None), '.2f').strip()}"

        vals = [v for v in (s.per_test if s else []) if v is not None and math.isfinite(v)]
        spread = f"{min(vals):.2f}..{max(vals):.2f}" if vals else "n/a"
        lines.append(f"{setting:<30} {est:<15} {proto:<9} {pair('at_highest_loss'):>11} "
                     f"{pair('at_median_loss'):>11} {spread:>11}")
    return "\n".join(lines)
