"""Noise-aware regression gates: compare a run against a baseline run.

A gate SPEC is ``METRIC:TOLERANCE``:

* ``spearman:-0.05`` — a fidelity metric (any metric in ``metrics.METRICS``: spearman, pearson,
  topk-overlap; higher is better) may drop by at most 0.05 (absolute); ``pearson:-10%`` — at most
  10% of the baseline value (relative). An unknown metric is a ``GateSpecError``.
* ``time:+25%`` — the estimator's wall time may grow by at most 25% (``memory:+25%``: peak
  memory); ``time:+0.5`` — by at most 0.5 s (MiB for memory).

A fidelity case is compared with its baseline **paired, test point by test point**: the per-test
values (``Case.per_test``) are aligned by ``Case.test_idx`` and only test points defined in both are
kept. The case **regresses** when the mean paired drop exceeds the tolerance *and* a one-sided paired
t-test (H1: the baseline is higher; ``scipy.stats.ttest_rel(..., alternative="greater")``) gives
p < 0.05, so a drop the test points' own spread explains never fails the gate. When every paired
difference is the same the test is degenerate: a drop beyond the tolerance is then significant.
Where the per-test values are missing (or fewer than two test points are defined in both), the case
is judged on the tolerance alone, and the finding says so. Time and memory carry no per-test values;
they regress when the increase exceeds the tolerance and also ``COST_FLOOR`` (0.1 s / 10 MiB), below
which the timer and allocator noise dominate. Improvements are the mirror image.

Cases are matched on (estimator, setting, protocol, ground-truth mode, metric); time and memory on
(estimator, setting, mode). A case whose setting version or spec hash differs from the baseline's, or
whose baseline has no value (not ok, undefined or NaN), is *not comparable*. A case that had a value
in the baseline **regresses** when the run

* errors, or skips it (the finding quotes the first line of the case's message),
* has no value for it (undefined at every test point),
* selected its (estimator, setting) and produced no case for it: "selected but no result". Run files
  record their selection (``selected``, written by the pytest plugin and ``influence-bench score``);
  baseline cases the run did not select (a ``-k cifar`` slice) are merely *vanished*, as are all
  missing cases when the run file records no selection (older files).

A gate that compared no case at all (nothing matched, or nothing had values on both sides) fails the
comparison and says so: a gate that checked nothing must not pass.

**Inputs a gate refuses** (``GateInputError``, a ``RunFileError``: the command line exits 2, pytest
stops with a usage error): a run or baseline with no cases; a value no metric or measurement can
take: infinite, a correlation outside [-1, 1], a top-k overlap outside [0, 1], a negative time or
memory. ``compare_runs`` checks that on its two runs; ``load_gate_file`` also refuses NaN, which a
run file never holds (``Case.to_json`` writes an undefined value as null), so a NaN read from a file
is a hand edit or corruption, not an undefined metric. The message names the file and the case.

``merge_baseline`` and ``write_baseline`` are ``influence-bench baseline update``: later run files
win per case, but a good value (an ok case with a value, in the existing baseline or an earlier run
file) is not replaced by an error or a skip unless asked (``--allow-errors``), and the file is
replaced atomically, keeping its mode.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from influence_bench.metrics import METRICS
from influence_bench.reporting.schema import Case, Run, RunFileError, load_run

COSTS = {"time": ("wall_time_s", "s", 0.1), "memory": ("peak_memory_mb", "MiB", 10.0)}
DEFAULT_GATES = ("spearman:-0.05",)
ALPHA = 0.05  # one-sided level of the paired t-test
_SPEC = re.compile(r"^([A-Za-z_][\w-]*):([+-]?)(\d+(?:\.\d*)?|\.\d+)(%?)$")


class GateSpecError(ValueError):
    pass


class GateInputError(RunFileError):
    """A run or baseline a gate cannot use (no cases, a value no metric can take); the message names
    the file and the case."""


# the values each metric can take (a value outside is corruption, not a measurement); others: any finite
RANGES = {"spearman": (-1.0, 1.0), "pearson": (-1.0, 1.0), "topk-overlap": (0.0, 1.0)}
_SLACK = 1e-6  # floating-point rounding: a Pearson of 1 + 2e-16 is 1
_SCORES = ("value", "median", "min", "at_highest_loss", "at_median_loss")  # in the metric's range
_BOUNDS = ("ci_low", "ci_high")  # finite only: a t-interval may reach past [-1, 1]


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
    if not cost and metric not in METRICS:
        raise GateSpecError(f"gate {spec!r}: unknown metric {metric!r}; known: "
                            f"{', '.join(list(METRICS) + list(COSTS))}")
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
    compared: dict = field(default_factory=dict)  # str(gate) -> cases it reached a verdict on
    run_estimators: tuple = ()  # who is in each file (says why a gate compared nothing)
    baseline_estimators: tuple = ()

    @property
    def empty_gates(self) -> list[str]:
        """Gates that compared no case."""
        return [str(g) for g in self.gates if not self.compared.get(str(g))]

    @property
    def failed(self) -> bool:
        return bool(self.regressions or self.empty_gates)

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
    """The case's value for ``g``; None when missing or not finite (a NaN never compares)."""
    v = getattr(c, COSTS[g.metric][0]) if g.is_cost else c.value
    return None if v is None or not math.isfinite(v) else float(v)


def _first_line(c: Case) -> str:
    lines = c.message.strip().splitlines()
    return lines[0][:120] if lines else "(no message)"


def paired_values(base: Case, run: Case) -> tuple[np.ndarray, np.ndarray] | None:
    """(baseline, run) per-test values at the test points defined in both, aligned by ``test_idx``;
    None when either case lacks per-test values or test indices."""
    def table(c: Case) -> dict | None:
        if not c.per_test or len(c.test_idx) != len(c.per_test):
            return None
        return {int(i): float(v) for i, v in zip(c.test_idx, c.per_test) if v is not None and math.isfinite(v)}

    a, b = table(base), table(run)
    if a is None or b is None:
        return None
    common = sorted(set(a) & set(b))
    return np.array([a[i] for i in common]), np.array([b[i] for i in common])


def one_sided_p(x: np.ndarray, y: np.ndarray) -> float:
    """p-value of the one-sided paired t-test of H1 ``mean(x - y) > 0`` (``ttest_rel(x, y,
    alternative="greater")``). Identical differences (zero variance) make the test degenerate: p is 0
    when they are positive, else 1. NaN with fewer than two pairs. Computed as ttest_rel does (the t
    statistic of the differences, its survival function ``stdtr(n - 1, -t)``) without importing
    ``scipy.stats``, which costs every gated session 0.8 s (a test compares it with ttest_rel)."""
    from scipy.special import stdtr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return float("nan")
    d = x - y
    if np.ptp(d) == 0:
        return 0.0 if d[0] > 0 else 1.0
    with np.errstate(divide="ignore", invalid="ignore"):  # differences so alike that their variance underflows
        t = d.mean() / np.sqrt(d.var(ddof=1) / d.size)
    return float(stdtr(d.size - 1, -t))


def _judge(g: Gate, key: tuple, base: Case, run: Case, res: Comparison) -> None:
    b, r = _value(g, base), _value(g, run)
    if base.setting_version != run.setting_version or base.spec_hash != run.spec_hash:
        res.not_comparable.append(Finding(key, f"setting changed: baseline v{base.setting_version} "
                                               f"{base.spec_hash}, run v{run.setting_version} {run.spec_hash}"))
        return
    if base.status != "ok" or b is None:
        if base.status == "error" and run.status == "ok" and r is not None:
            res.improvements.append(Finding(key, f"errored in baseline, now {r:.4g}"))
            res.compared[str(g)] = res.compared.get(str(g), 0) + 1
        else:
            res.not_comparable.append(Finding(key, f"no baseline value to compare (baseline {base.status}, value "
                                                   f"{_show(b)}; run {run.status}, value {_show(r)})"))
        return
    res.compared[str(g)] = res.compared.get(str(g), 0) + 1
    if run.status == "error":
        res.regressions.append(Finding(key, f"errors now (baseline {b:.4g}): {_first_line(run)}"))
        return
    if run.status == "skipped":
        res.regressions.append(Finding(key, f"did not run: skipped now (baseline {b:.4g}): {_first_line(run)}"))
        return
    if r is None:
        what = (f"undefined at all {run.n_test + run.n_undefined} test points" if not g.is_cost
                else f"no {COSTS[g.metric][0]} recorded")
        res.regressions.append(Finding(key, f"no value now (baseline {b:.4g}): {what}"))
        return
    if g.is_cost:
        allowed = g.allowed(b)
        unit, floor = COSTS[g.metric][1:]
        delta = r - b
        worse, better = delta > max(allowed, floor), -delta > max(allowed, floor)
        text = f"{b:.3g} -> {r:.3g} {unit} ({delta:+.3g} {unit}, {100 * delta / b if b else float('inf'):+.0f}%; " \
               f"allowed +{allowed:.3g} {unit})"
    else:
        pair = paired_values(base, run)
        if pair is not None and pair[0].size >= 2:
            bv, rv = pair
            change = float(np.mean(rv - bv))
            allowed = g.allowed(float(bv.mean()))
            p_drop, p_gain = one_sided_p(bv, rv), one_sided_p(rv, bv)
            worse = -change > allowed and p_drop < ALPHA
            better = change > allowed and p_gain < ALPHA
            p, side = (p_drop, "drop") if change < 0 else (p_gain, "gain")
            text = (f"{b:.4f} -> {r:.4f} (paired over {bv.size} test points: mean change {change:+.4f}, "
                    f"allowed -{allowed:.4f}; one-sided paired t-test of the {side}: p = {p:.3g})")
        else:
            delta = r - b
            allowed = g.allowed(b)
            worse, better = -delta > allowed, delta > allowed
            why = ("no per-test values" if pair is None
                   else f"{pair[0].size} test point(s) defined in both")
            text = f"{b:.4f} -> {r:.4f} ({delta:+.4f}; allowed -{allowed:.4f}; {why}: judged on the tolerance alone)"
    if worse:
        res.regressions.append(Finding(key, text))
    elif better:
        res.improvements.append(Finding(key, text))
    else:
        res.unchanged += 1


def _show(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _selection(run: Run) -> list[dict] | None:
    sel = run.extra.get("selected")
    return sel if isinstance(sel, list) else None


def _selected_entry(selection: list[dict], key: tuple, g: Gate) -> dict | None:
    """The run's selection entry covering baseline case ``key`` of gate ``g``, if any."""
    if g.is_cost:
        est, setting, mode, _ = key
        proto = None
    else:
        est, setting, proto, mode, _ = key
    for e in selection:
        if (e.get("estimator"), e.get("setting"), e.get("mode")) == (est, setting, mode) and \
                (proto is None or proto in e.get("protocols", ())):
            return e
    return None


def _label(c: Case) -> str:
    return f"{c.estimator} / {c.setting} / {c.protocol} / {c.mode} / {c.metric}"


def value_problems(c: Case, nan: bool = False) -> list[str]:
    """What in ``c`` no metric or measurement can produce: an infinite value, a score outside its
    metric's range (``RANGES``), a negative time or memory; with ``nan``, also a NaN (in a run file
    an undefined value is null, never NaN)."""
    lo, hi = RANGES.get(c.metric, (-math.inf, math.inf))
    found = []

    def check(name: str, v, lo: float = -math.inf, hi: float = math.inf, unit: str = "") -> None:
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            return
        if math.isnan(v):
            if nan:
                found.append(f"{name} is NaN (an undefined value is null)")
        elif math.isinf(v):
            found.append(f"{name} is {v}")
        elif v < lo - _SLACK or v > hi + _SLACK:
            found.append(f"{name} {v:g}{unit} is negative" if lo == 0 and hi == math.inf and v < 0
                         else f"{name} {v:g} is outside [{lo:g}, {hi:g}], the range of {c.metric}")

    for name in _SCORES:
        check(name, getattr(c, name), lo, hi)
    for name in _BOUNDS:
        check(name, getattr(c, name))
    for i, v in enumerate(c.per_test):
        check(f"per_test[{i}]", v, lo, hi)
    for g in COSTS.values():
        check(g[0], getattr(c, g[0]), 0.0, math.inf, f" {g[1]}")
    for name in ("n_test", "n_undefined"):
        if getattr(c, name) < 0:
            found.append(f"{name} {getattr(c, name)} is negative")
    return found


def _where(run: Run, role: str) -> str:
    return f"{role} {run.path}" if run.path is not None else role


def check_gate_input(run: Run, role: str = "run", nan: bool = False) -> None:
    """Raise ``GateInputError`` when ``run`` holds no cases or a value no metric can take
    (``value_problems``); the message names ``role`` and the file, the first offending case and
    how many more there are."""
    where = _where(run, role)
    if not run.cases:
        hint = (": a gate against it would compare nothing; write one with "
                "`influence-bench baseline update RUN.json`" if role == "baseline" else ": nothing to compare")
        raise GateInputError(f"{where} holds no cases{hint}")
    bad = [(c, p) for c in run.cases for p in value_problems(c, nan)]
    if bad:
        c, problem = bad[0]
        more = f" (and {len(bad) - 1} more such value(s))" if len(bad) > 1 else ""
        raise GateInputError(f"{where}: case {_label(c)}: {problem}{more}; no gate can use this file: "
                             "fix it or write it again")


def load_gate_file(path: Path | str, role: str = "run file") -> Run:
    """``load_run`` plus ``check_gate_input`` with NaN refused: a file a gate can use, or a
    ``RunFileError`` naming it."""
    run = load_run(path)
    check_gate_input(run, role, nan=True)
    return run


def compare_runs(run: Run, baseline: Run, gates: tuple[Gate, ...] | list[Gate] = ()) -> Comparison:
    """Compare ``run`` with ``baseline`` under ``gates`` (default ``DEFAULT_GATES``). Raises
    ``GateInputError`` when either has no cases or a value no metric can take (``check_gate_input``;
    NaN is "undefined" in memory and is merely not comparable)."""
    gates = tuple(gates) or tuple(parse_gate(s) for s in DEFAULT_GATES)
    check_gate_input(baseline, "baseline")
    check_gate_input(run, "run")
    res = Comparison(gates, run_estimators=tuple(sorted({c.estimator for c in run.cases})),
                     baseline_estimators=tuple(sorted({c.estimator for c in baseline.cases})))
    now, before = _index(run, gates), _index(baseline, gates)
    selection = _selection(run)
    for key in sorted(set(now) | set(before)):
        if key not in before:
            res.new.append(Finding(key, f"{now[key][1].status}, value {_show(_value(*now[key]))}"))
        elif key not in now:
            g, base = before[key]
            b = _value(g, base)
            entry = _selected_entry(selection, key, g) if selection is not None else None
            if entry is not None and base.status == "ok" and b is not None:
                why = f": {entry['not_run']}" if entry.get("not_run") else ""
                res.regressions.append(Finding(key, f"selected but no result (baseline {b:.4g}){why}"))
                res.compared[str(g)] = res.compared.get(str(g), 0) + 1
            else:
                res.vanished.append(Finding(key, f"baseline value {_show(b)}"))
        else:
            _judge(now[key][0], key, before[key][1], now[key][1], res)
    return res


def _key(c: Case) -> tuple:
    return (c.estimator, c.setting, c.protocol, c.mode, c.metric)


def _good(c: Case) -> bool:
    return c.status == "ok" and c.value is not None and math.isfinite(c.value)


def merge_baseline(runs: list[Run], existing: Run | None = None) -> tuple[Run, list[str]]:
    """``influence-bench baseline update``: the baseline of ``runs`` (the last run's header; later
    files win per (estimator, setting, protocol, mode, metric)), and one line per good value (an ok
    case with a value) that an error or a skipped case replaces, whether the good value was in
    ``existing`` (the baseline file being replaced) or in an earlier run file. The caller refuses
    to write when there are any, unless told to allow them."""
    last_good: dict[tuple, tuple[float, str]] = {}
    for c in existing.cases if existing is not None else ():
        if _good(c):
            last_good[_key(c)] = (c.value, str(existing.path or "the baseline"))
    merged: dict[tuple, tuple[Case, str]] = {}
    for r in runs:
        for c in r.cases:
            merged[_key(c)] = (c, str(r.path or "a run"))
            if _good(c):
                last_good[_key(c)] = (c.value, str(r.path or "a run"))
    replaced = []
    for k, (c, src) in merged.items():
        if c.status in ("error", "skipped") and k in last_good:
            value, where = last_good[k]
            what = "errors" if c.status == "error" else "is skipped"
            replaced.append(f"{_label(c)} {what} in {src} ({_first_line(c)}), was {value:.4g} in {where}")
    base = runs[-1]
    out = Run(base.path, base.schema_version, base.created, base.tier, base.machine, base.commit,
              [c for c, _ in merged.values()], dict(base.extra))
    return out, replaced


def write_baseline(path: Path | str, run: Run) -> Path:
    """Write ``run`` to ``path`` atomically (a temporary file beside it, then ``os.replace``: a crash
    never leaves half a baseline), keeping the mode of the file it replaces (a new file gets
    0666 less the umask, like any file the user creates)."""
    from influence_bench.paths import atomic_path

    path = Path(path)
    text = json.dumps(run.to_json(), indent=2, allow_nan=False) + "\n"  # fails before anything is touched
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    with atomic_path(path) as tmp:
        tmp.write_text(text)
        os.chmod(tmp, mode)
    return path


def format_comparison(res: Comparison, run_name: str = "run", baseline_name: str = "baseline",
                      max_listed: int | None = None) -> str:
    """Text report: one section per category (regressions first); ``max_listed`` caps the new and
    vanished lists (a ``-k`` slice of the suite leaves most of the baseline vanished)."""
    lines = [f"compare {run_name} against {baseline_name}; gates: {', '.join(map(str, res.gates))}"]
    titles = {"regressions": "REGRESSIONS", "improvements": "improvements", "new": "new cases (not in baseline)",
              "vanished": "vanished cases (in baseline, not in run)",
              "not_comparable": "not comparable (different setting version/spec, or no baseline value)"}
    for name in Comparison.SECTIONS:
        items = getattr(res, name)
        lines.append(f"{titles[name]}: {len(items)}")
        cap = max_listed if name in ("new", "vanished") and max_listed is not None else len(items)
        lines += [f"  {f.label}: {f.detail}" for f in items[:cap]]
        if len(items) > cap:
            lines.append(f"  ... and {len(items) - cap} more")
    for g in res.empty_gates:
        lines.append(f"gate {g} compared no case: no case of its metric has a value in both the run and the baseline")
    if res.empty_gates and res.run_estimators and not set(res.run_estimators) & set(res.baseline_estimators):
        lines.append(f"the baseline has no case of the run's estimators ({', '.join(res.run_estimators)}); it has "
                     f"{', '.join(res.baseline_estimators)}")
    if res.failed:
        why = [f"{len(res.regressions)} regression(s)"] if res.regressions or not res.empty_gates else []
        why += [f"gate {g} compared nothing" for g in res.empty_gates]
        verdict = f"GATE FAILED: {'; '.join(why)}"
    else:
        verdict = f"gate passed ({res.unchanged} within tolerance or noise)"
    lines.append(verdict)
    return "\n".join(lines)
