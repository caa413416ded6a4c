"""One method, several implementations: the rows of a method (``exact``, ``cg``, ``lissa``, ``arnoldi``,
``ekfac``, ``tracin``, ``trak``...) that more than one estimator implements in the runs, ours and the
peer libraries' adapters (``plugins/peers``) side by side on each setting and protocol: fidelity with
its CI and the setting's noise ceiling, time and peak memory. ``report`` writes it as a section of the
Markdown and HTML pages; ``influence-bench bench methods`` measures the times it compares.
"""

from __future__ import annotations

import math

from influence_bench.api.arguments import base_name


def method_of(case) -> str:
    """The case's method: recorded since run files carry it, else the estimator's registered name (the
    built-ins' method is their name)."""
    return getattr(case, "method", "") or base_name(case.estimator)


def library_of(estimator: str) -> str:
    """``dattri:cg`` -> ``dattri``; a name without a namespace is influence-bench's own (or a user's)."""
    name = base_name(estimator)
    return name.split(":", 1)[0] if ":" in name else "influence-bench"


def method_rows(cases, verdicts: dict | None = None) -> list[dict]:
    """One row per (method, setting, protocol, estimator) of the Spearman cases, for the methods with at
    least two implementations in ``cases``; sorted by method, setting, protocol, then fastest first
    (failed cases last). Each row: method, setting, protocol, estimator, library, status, verdict,
    spearman, ci_low, ci_high, ceiling, time_s, peak_mb, message."""
    verdicts = verdicts or {}
    spearman = [c for c in cases if c.metric == "spearman"]
    impls: dict[str, set[str]] = {}
    for c in spearman:
        impls.setdefault(method_of(c), set()).add(c.estimator)
    rows = []
    for c in spearman:
        method = method_of(c)
        if len(impls[method]) < 2:
            continue
        ok = c.status == "ok"
        rows.append({"method": method, "setting": c.setting, "protocol": c.protocol, "estimator": c.estimator,
                     "library": library_of(c.estimator), "status": c.status,
                     "verdict": verdicts.get((c.setting, c.estimator, c.protocol), c.status),
                     "spearman": c.value if ok else None, "ci_low": c.ci_low if ok else None,
                     "ci_high": c.ci_high if ok else None, "ceiling": c.noise_ceiling if ok else None,
                     "time_s": c.wall_time_s if ok else None, "peak_mb": c.peak_memory_mb if ok else None,
                     "message": "" if ok else (c.message.splitlines() or [""])[0]})

    def key(r):
        t = r["time_s"]
        return (r["method"], r["setting"], r["protocol"], r["status"] != "ok",
                t if t is not None and math.isfinite(t) else math.inf, r["estimator"])

    return sorted(rows, key=key)


def _f(v, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def markdown(cases, verdicts: dict | None = None) -> list[str]:
    """The report's section body: a table, or a line saying no method has two implementations here."""
    rows = method_rows(cases, verdicts)
    if not rows:
        return ["_No method has more than one implementation in these runs (score a peer library's adapters, "
                "e.g. `influence-bench score 'dattri:*'`, beside the built-ins)._"]
    out = ["| method | setting | protocol | estimator | library | verdict | Spearman [95% CI] | ceiling | "
           "time s | peak MiB |", "|" + "---|" * 10]
    for r in rows:
        if r["status"] != "ok":
            score = f"{r['status']}: {r['message'][:100]}"
        else:
            score = f"{_f(r['spearman'], '.3f')} [{_f(r['ci_low'], '.3f')}, {_f(r['ci_high'], '.3f')}]"
        out.append(f"| {r['method']} | {r['setting']} | {r['protocol']} | {r['estimator']} | {r['library']} | "
                   f"{r['verdict']} | {score} | {_f(r['ceiling'], '.2f')} | {_f(r['time_s'], '.3g')} | "
                   f"{_f(r['peak_mb'], '.0f')} |")
    return out
