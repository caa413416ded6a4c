"""Noise-aware regression gates: compare a run against a baseline run.

A gate SPEC is ``METRIC:TOLERANCE``:

* ``spearman:-0.05`` — a fidelity metric (any case metric, higher is better) may drop by at most
  0.05 (absolute); ``pearson:-10%`` — at most 10% of the baseline value (relative).
* ``time:+25%`` — the estimator's wall time may grow by at most 25% (``memory:+25%``: peak
  memory); ``time:+0.5`` — by at most 0.5 s (MiB for memory).

A fidelity case **regresses** only when the drop exceeds the tolerance *and* the baseline value lies
outside the run's 95% CI (so a drop the run's own noise explains never fails the gate; a case
without a CI is judged on the tolerance alone). Time and memory carry no CI; they regress when the
increase exceeds the tolerance and also ``COST_FLOOR`` (0.1 s / 10 MiB), below which the timer and
allocator noise dominate. Improvements are the mirror image.

Cases are matched on (estimator, setting, protocol, ground-truth mode, metric); time and memory on
(estimator, setting, mode). A case whose setting version or spec hash differs from the baseline's,
whose value is undefined, or that was skipped is *not comparable* — never a regression. A case that
errors now but had a value in the baseline is a regression.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from influence_bench.reporting.schema import Case, Run

COSTS = {"time": ("wall_time_s", "s", 0.1), "memory": ("peak_memory_mb", "MiB", 10.0)}
DEFAULT_GATES = ("spearman:-0.05",)
_SPEC = re.compile(r"^([A-Za-z_][\w-]*):([+-]?)(\d+(?:\.\d*)?|\.\d+)(%?)$")


class GateSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Gate:
    metric: str
    tolerance: float  # >= 0; a fraction of the baseline when ``relative``
    relative: bool

    @property
    def is_cost(self) -> bool:
        return self.metric in COSTS

    def allowed(self, baseline: float) -> float:
        return self.tolerance * abs(baseline) if self.relative else self.tolerance

    def __str__(self) -> str:
        sign = "+" if self.is_cost else "-"
        tol = f"{self.tolerance * 100:g}%" if self.relative else f"{self.tolerance:g}"
        return f"{self.metric}:{sign}{tol}"


def parse_gate(spec: str) -> Gate:
    m = _SPEC.match(spec.strip())
    if not m:
        raise GateSpecError(f"gate {spec!r}: expected METRIC:TOLERANCE, e.g. spearman:-0.05 or time:+25%")
    metric, sign, number, pct = m.groups()
    cost = metric in COSTS
    if (cost and sign == "-") or (not cost and sign == "+"):
        want = "an increase (+)" if cost else "a drop (-)"
        raise GateSpecError(f"gate {spec!r}: {metric} tolerates {want}, e.g. "
                            f"{'time:+25%' if cost else metric + ':-0.05'}")
    tol = float(number) / (100.0 if pct else 1.0)
    return Gate(metric, tol, bool(pct))


@dataclass(frozen=True)
class Finding:
    key: tuple
    detail: str

    @property
    def label(self) -> str:
        return " / ".join(str(k) for k in self.key)


@dataclass
class Comparison:
    gates: tuple[Gate, ...]
    regressions: list[Finding] = field(default_factory=list)
    improvements: list[Finding] = field(default_factory=list)
    new: list[Finding] = field(default_factory=list)
    vanished: list[Finding] = field(default_factory=list)
    not_comparable: list[Finding] = field(default_factory=list)
    unchanged: int = 0

    @property
    def failed(self) -> bool:
        return bool(self.regressions)

    SECTIONS = ("regressions", "improvements", "new", "vanished", "not_comparable")


def _index(run: Run, gates: tuple[Gate, ...]) -> dict[tuple, tuple[Gate, Case]]:
    out: dict[tuple, tuple[Gate, Case]] = {}
    for g in gates:
        for c in run.cases:
            if g.is_cost:
                key = (c.estimator, c.setting, c.mode, g.metric)
                if key not in out or (out[key][1].status != "ok" and c.status == "ok"):
                    out[key] = (g, c)
            elif c.metric == g.metric:
                out[(c.estimator, c.setting, c.protocol, c.mode, c.metric)] = (g, c)
    return out


def _value(g: Gate, c: Case) -> float | None:
    return getattr(c, COSTS[g.metric][0]) if g.is_cost else c.value


def _judge(g: Gate, key: tuple, base: Case, run: Case, res: Comparison) -> None:
    b, r = _value(g, base), _value(g, run)
    if base.setting_version != run.setting_version or base.spec_hash != run.spec_hash:
        res.not_comparable.append(Finding(key, f"setting changed: baseline v{base.setting_version} "
                                               f"{base.spec_hash}, run v{run.setting_version} {run.spec_hash}"))
        return
    if run.status == "error" and base.status == "ok" and b is not None:
        res.regressions.append(Finding(key, f"errors now (baseline {b:.4g}): {run.message.splitlines()[0][:120]}"))
        return
    if b is None or r is None or base.status != "ok" or run.status != "ok":
        if base.status == "error" and run.status == "ok" and r is not None:
            res.improvements.append(Finding(key, f"errored in baseline, now {r:.4g}"))
        else:
            res.not_comparable.append(Finding(key, f"no value to compare (baseline {base.status} {b}, "
                                                   f"run {run.status} {r})"))
        return
    allowed = g.allowed(b)
    if g.is_cost:
        unit, floor = COSTS[g.metric][1:]
        delta = r - b
        worse, better = delta > max(allowed, floor), -delta > max(allowed, floor)
        text = f"{b:.3g} -> {r:.3g} {unit} ({delta:+.3g} {unit}, {100 * delta / b if b else float('inf'):+.0f}%; " \
               f"allowed +{allowed:.3g} {unit})"
    else:
        delta = r - b
        outside = run.ci_low is None or run.ci_high is None or not (run.ci_low <= b <= run.ci_high)
        worse, better = outside and -delta > allowed, outside and delta > allowed
        ci = "no CI" if run.ci_low is None else f"run 95% CI [{run.ci_low:.3f}, {run.ci_high:.3f}]"
        text = f"{b:.4f} -> {r:.4f} ({delta:+.4f}; allowed -{allowed:.4f}; {ci})"
    if worse:
        res.regressions.append(Finding(key, text))
    elif better:
        res.improvements.append(Finding(key, text))
    else:
        res.unchanged += 1


def _show(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def compare_runs(run: Run, baseline: Run, gates: tuple[Gate, ...] | list[Gate] = ()) -> Comparison:
    gates = tuple(gates) or tuple(parse_gate(s) for s in DEFAULT_GATES)
    res = Comparison(gates)
    now, before = _index(run, gates), _index(baseline, gates)
    for key in sorted(set(now) | set(before)):
        if key not in before:
            res.new.append(Finding(key, f"{now[key][1].status}, value {_show(_value(*now[key]))}"))
        elif key not in now:
            res.vanished.append(Finding(key, f"baseline value {_show(_value(*before[key]))}"))
        else:
            _judge(now[key][0], key, before[key][1], now[key][1], res)
    return res


def format_comparison(res: Comparison, run_name: str = "run", baseline_name: str = "baseline",
                      max_listed: int | None = None) -> str:
    """Text report: one section per category (regressions first); ``max_listed`` caps the new and
    vanished lists (a ``-k`` slice of the suite leaves most of the baseline vanished)."""
    lines = [f"compare {run_name} against {baseline_name}; gates: {', '.join(map(str, res.gates))}"]
    titles = {"regressions": "REGRESSIONS", "improvements": "improvements", "new": "new cases (not in baseline)",
              "vanished": "vanished cases (in baseline, not in run)",
              "not_comparable": "not comparable (different setting version/spec, or no value)"}
    for name in Comparison.SECTIONS:
        items = getattr(res, name)
        lines.append(f"{titles[name]}: {len(items)}")
        cap = max_listed if name in ("new", "vanished") and max_listed is not None else len(items)
        lines += [f"  {f.label}: {f.detail}" for f in items[:cap]]
        if len(items) > cap:
            lines.append(f"  ... and {len(items) - cap} more")
    verdict = (f"GATE FAILED: {len(res.regressions)} regression(s)" if res.failed
               else f"gate passed ({res.unchanged} within tolerance or noise)")
    lines.append(verdict)
    return "\n".join(lines)
