"""The floors that turn a fidelity case into a verdict (data in ``thresholds.toml`` and
``measured_floors.toml``, this module reads and applies them).

A case is one estimator on one setting under one protocol. Three kinds of floor apply to it:

* **the chance floor** (``[chance]``, every case): the lower bound of the 95% confidence interval
  of the mean Spearman over test points must be >= 0, so a case passes only when it is
  distinguishable from random scores, not when its mean happens to be positive;
* **claim and setting floors** (``[[floor]]``): attached to settings (globs) and to what an
  estimator *declares* (``claim``: one of its tags, e.g. ``second-order`` for an estimator that
  claims the inverse-Hessian influence function), or to an estimator by name;
* **measured floors** (``measured_floors.toml``, written by ``influence-bench baseline floors``):
  every built-in estimator on every setting where it ran in the baseline, at its measured value
  minus a stated margin.

A floor with ``known_failure`` is a documented, open failure, and strict: the case is ``xfail``
while it fails that floor but stays at or above the rule's own ``known_min`` (on the mean); it
FAILs below ``known_min``, and it FAILs when it *passes* the floor by ``FIXED_MARGIN`` ("known
failure fixed: remove the rule"), so a fix cannot go unnoticed and a known failure can still
regress; within the margin of its floor it stays ``xfail`` (a rounding difference between machines
must not flip a verdict).

**A verdict needs evidence** (``[test_points]``, ``TestPoints``): a metric is undefined at a test point
whose predicted or retrained row is constant, and a mean over the few test points left says little.
A case whose floors' metric is defined at fewer than ``min_defined`` test points, or at fewer than
``min_fraction`` of the test points it was evaluated on (``n_test`` defined + ``n_undefined``), is
``FAIL`` with a line saying so ("judged on 1 of 10 test points"), whatever its floors say and even
where a known failure would make it ``xfail``: a verdict on nothing is never a pass.
"""

from __future__ import annotations

import fnmatch
import math
import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

STATS = ("mean", "ci_low")  # what a floor bounds: the mean over test points, or its CI's lower bound
FIXED_MARGIN = 0.02  # a known failure counts as fixed once it clears its floor by this much
FILES = ("thresholds.toml", "measured_floors.toml")


class ThresholdsError(ValueError):
    """A thresholds file that cannot be used; the message names the file, the rule and the field."""


@dataclass(frozen=True)
class Floor:
    metric: str
    min: float
    estimator: str = "*"  # glob on the estimator's name
    claim: str = "*"  # a tag the estimator must declare for the floor to apply ("*": any)
    settings: str = "*"
    protocol: str = "*"
    stat: str = "mean"  # "mean" | "ci_low"
    known_failure: str = ""  # non-empty: documented, open failure of this floor (strict xfail)
    known_min: float | None = None  # a known failure still FAILs below this mean
    measured: float | None = None  # the measurement the floor was set from (documentation)
    note: str = ""
    source: str = "thresholds.toml"

    def matches(self, estimator: str, tags, setting: str, protocol: str) -> bool:
        return (fnmatch.fnmatchcase(estimator, self.estimator) and fnmatch.fnmatchcase(setting, self.settings)
                and fnmatch.fnmatchcase(protocol, self.protocol) and (self.claim == "*" or self.claim in tags))

    def describe(self) -> str:
        who = [f"claim {self.claim!r}"] if self.claim != "*" else []
        who += [] if self.estimator == "*" else [f"estimator {self.estimator!r}"]
        stat = "lower 95% CI bound of mean" if self.stat == "ci_low" else "mean"
        return f"{stat} {self.metric} >= {self.min:g} ({', '.join(who + [self.source])})"


_FIELDS = {f.name for f in fields(Floor)} - {"source"}


def _floor(raw: dict, where: str) -> Floor:
    unknown = set(raw) - _FIELDS
    if unknown:
        raise ThresholdsError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
    for need in ("metric", "min"):
        if need not in raw:
            raise ThresholdsError(f"{where}: missing {need!r}")
    try:
        f = Floor(**{**raw, "min": float(raw["min"]), "source": where})
    except (TypeError, ValueError) as exc:
        raise ThresholdsError(f"{where}: {exc}") from None
    if f.stat not in STATS:
        raise ThresholdsError(f"{where}: stat must be one of {STATS}, got {f.stat!r}")
    if not math.isfinite(f.min):
        raise ThresholdsError(f"{where}: min must be a finite number, got {f.min}")
    if f.known_failure and f.known_min is None:
        raise ThresholdsError(f"{where}: a known failure needs known_min, the floor it must still hold "
                              "(measured value minus a margin): without one it could never fail")
    if f.known_min is not None and not f.known_failure:
        raise ThresholdsError(f"{where}: known_min without known_failure")
    return f


def _read(path: Path | None, name: str) -> dict:
    try:
        text = Path(path).read_text() if path else resources.files("influence_bench.spec").joinpath(name).read_text()
    except FileNotFoundError:
        raise ThresholdsError(f"{path or name}: no such thresholds file" + (
            "" if path else " in the installed package (reinstall influence-bench)")) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ThresholdsError(f"{path or name}: not valid TOML: {exc}") from None


@dataclass(frozen=True)
class TestPoints:
    """``[test_points]``: how many test points a metric must be defined at for a verdict."""

    __test__ = False  # not a pytest test class
    min_defined: int = 3  # at least this many defined test points
    min_fraction: float = 0.5  # and at least this fraction of the test points evaluated

    def required(self, evaluated: int) -> int:
        return max(self.min_defined, math.ceil(self.min_fraction * evaluated - 1e-9))

    def shortfall(self, case) -> str | None:
        """Why ``case`` has too few defined test points for a verdict; None when it has enough."""
        defined, evaluated = case.n_test, case.n_test + case.n_undefined
        need = self.required(evaluated)
        if defined >= need:
            return None
        return (f"judged on {defined} of {evaluated} test points ({case.n_undefined} undefined) < {need} required "
                f"(at least {self.min_defined} and {self.min_fraction:.0%} of those evaluated: thresholds.toml "
                "[test_points]): too few to judge")


def _test_points(raw: dict, where: str) -> TestPoints:
    unknown = set(raw) - {"min_defined", "min_fraction"}
    if unknown:
        raise ThresholdsError(f"{where}: unknown field(s) {sorted(unknown)}; known: ['min_defined', 'min_fraction']")
    tp = TestPoints(**raw)
    if isinstance(tp.min_defined, bool) or not isinstance(tp.min_defined, int) or tp.min_defined < 1:
        raise ThresholdsError(f"{where}: min_defined must be an integer >= 1, got {tp.min_defined!r} (a verdict "
                              "on no test point would be a verdict on nothing)")
    if isinstance(tp.min_fraction, bool) or not isinstance(tp.min_fraction, (int, float)) \
            or not 0 <= tp.min_fraction <= 1:
        raise ThresholdsError(f"{where}: min_fraction must be a number in [0, 1], got {tp.min_fraction!r}")
    return tp


@dataclass(frozen=True)
class Thresholds:
    floors: tuple[Floor, ...]
    chance: Floor
    test_points: TestPoints = TestPoints()

    @classmethod
    def load(cls, path: Path | None = None, measured: Path | None | bool = None) -> Thresholds:
        """The packaged tables, or ``path`` (plus ``measured``: a measured-floors file, ``False``
        for none; by default the packaged one when ``path`` is not given, none otherwise)."""
        raw = _read(path, FILES[0])
        name = Path(path).name if path else FILES[0]
        floors = [_floor(f, f"{name} floor #{k + 1}") for k, f in enumerate(raw.get("floor", []))]
        if measured is None:
            measured = path is None
        if measured is not False:
            mpath = None if measured is True else Path(measured)
            mname = mpath.name if mpath else FILES[1]
            extra = _read(mpath, FILES[1]).get("floor", [])
            floors += [_floor(f, f"{mname} floor #{k + 1}") for k, f in enumerate(extra)]
        if "xfail" in raw:
            raise ThresholdsError(f"{name}: [[xfail]] is gone; a known failure is a [[floor]] with known_failure "
                                  "and known_min (strict: it fails when fixed and below known_min)")
        c = {"metric": "spearman", "min": 0.0, "stat": "ci_low", **raw.get("chance", {})}
        chance = _floor({k: v for k, v in c.items()}, f"{name} [chance]")
        tp = raw.get("test_points", {})
        if not isinstance(tp, dict):
            raise ThresholdsError(f"{name}: [test_points] must be a table")
        return cls(tuple(floors), chance, _test_points(tp, f"{name} [test_points]"))

    def floors_for(self, estimator: str, setting: str, protocol: str, tags=()) -> list[Floor]:
        """Every floor that applies: the chance floor and the matching rules, less those a matching
        known failure covers (same metric and statistic, and the very floor it documents or one no
        higher than its ``known_min``): a known failure of the chance floor or of a claim's floor
        replaces it for the cases it names, while a stricter measured floor still applies."""
        got = [self.chance] + [f for f in self.floors if f.matches(estimator, tags, setting, protocol)]
        known = [f for f in got if f.known_failure]

        def covered(f: Floor) -> bool:  # the floor the known failure documents, or one below its own floor
            return not f.known_failure and any(
                k.metric == f.metric and k.stat == f.stat and (k.min == f.min or f.min <= k.known_min)
                for k in known)

        return [f for f in got if not covered(f)]


def stat_of(case, stat: str) -> float | None:
    """The value a floor bounds (``"mean"`` or ``"ci_low"``) of a case; None when missing or not finite."""
    v = None if case is None else (case.value if stat == "mean" else case.ci_low)
    return None if v is None or not math.isfinite(v) else float(v)


def _line(est: str, setting: str, proto: str, f: Floor, c) -> str:
    mean, low = stat_of(c, "mean"), stat_of(c, "ci_low")
    ci = "n/a" if c is None or low is None or c.ci_high is None else f"[{low:.3f}, {c.ci_high:.3f}]"
    worst = "n/a" if c is None or c.min is None else f"{c.min:.3f}"
    got = stat_of(c, f.stat)
    return (f"{est} on {setting} ({proto}): {f.stat.replace('_', ' ')} {f.metric} = "
            f"{'n/a' if got is None else format(got, '.4f')} < floor {f.min:g} (mean "
            f"{'n/a' if mean is None else format(mean, '.4f')}, 95% CI {ci}, min over test points {worst}, "
            f"n_test {c.n_test if c else 0}; rule: {f.describe()})")


def judge(cases, thresholds: Thresholds, known: list[str] | None = None, tags_of=None,
          reasons: dict | None = None) -> tuple[dict, list[str]]:
    """Verdict per (setting, estimator, protocol) and one self-explaining line per failed floor.

    Verdicts: ``pass``, ``FAIL``, ``xfail`` (only known failures failed, each above its
    ``known_min``), or the case's status (``skipped`` / ``error``). A metric a floor bounds that is
    defined at too few test points (``Thresholds.test_points``) is a ``FAIL`` of its own, and that
    metric's floors are not consulted. Known failures' lines go to ``known`` (if given). An
    estimator's tags come from its cases (``Case.tags``), else from ``tags_of(name)``. ``reasons`` (if
    given) receives each key's failed and known-failure lines, for the tables to show under its row.
    """
    verdicts: dict = {}
    failures: list[str] = []
    known = known if known is not None else []
    by_key: dict = {}
    for c in cases:
        by_key.setdefault((c.estimator, c.setting, c.protocol), {})[c.metric] = c
    for (est, setting, proto), ms in by_key.items():
        any_case = next(iter(ms.values()))
        if any_case.status != "ok":
            verdicts[(setting, est, proto)] = any_case.status
            continue
        tags = getattr(any_case, "tags", None) or (tags_of(est) if tags_of else ())
        bad, expected, thin = [], [], set()
        for f in thresholds.floors_for(est, setting, proto, tags):
            c = ms.get(f.metric)
            short = None if c is None else thresholds.test_points.shortfall(c)
            if short is not None or f.metric in thin:  # a verdict on nothing is no pass (nor an xfail)
                if f.metric not in thin:
                    thin.add(f.metric)
                    bad.append(f"{est} on {setting} ({proto}): {f.metric} {short}")
                continue
            got = stat_of(c, f.stat)
            held = got is not None and got >= f.min
            if f.known_failure and held and got < f.min + FIXED_MARGIN:
                held = False  # at the edge: rounding on another machine must not flip the verdict
            if not f.known_failure:
                if not held:
                    bad.append(_line(est, setting, proto, f, c))
                continue
            mean = stat_of(c, "mean")
            if held:
                bad.append(f"{est} on {setting} ({proto}): known failure fixed: remove the rule ({f.describe()}: "
                           f"{f.stat.replace('_', ' ')} {f.metric} = {got:.4f} now holds; it was "
                           f"{f.known_failure!r})")
            elif mean is None or mean < f.known_min:
                bad.append(f"{_line(est, setting, proto, f, c)} -- below the known failure's own floor: mean "
                           f"{f.metric} {'n/a' if mean is None else format(mean, '.4f')} < known_min "
                           f"{f.known_min:g} (known failure: {f.known_failure})")
            else:
                expected.append(f"{_line(est, setting, proto, f, c)} -- known failure: {f.known_failure} "
                                f"(still >= known_min {f.known_min:g})")
        verdicts[(setting, est, proto)] = "FAIL" if bad else ("xfail" if expected else "pass")
        if reasons is not None and (bad or expected):
            reasons[(setting, est, proto)] = bad + expected
        failures += bad
        known += expected
    return verdicts, failures
