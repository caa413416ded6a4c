"""Faults of the regression gate: a gate must never pass vacuously. A misspelt gate, a baseline or
run file that is empty, unreadable or holds values no metric can take is a clear error naming the
spec, the file and the case; a gate that compared nothing fails; `baseline update` does not let a
failed run replace good values, keeps the file's mode and never leaves half a file; a case judged on
too few test points is no pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from faults.support import ResultsLost, SilentWrong, assert_clear_error, cli
from influence_bench.reporting.schema import Case, Run

ROOT = Path(__file__).parents[2]
LABEL = "exact / iris-a / loo-fixed / warm / spearman"
KNOWN = "spearman, pearson, topk-overlap, time, memory"


def case(setting="iris-a", value=0.9, estimator="exact", **kw) -> Case:
    """A case at ``value`` with ten per-test values around it (spread 0.02) and a CI."""
    per = kw.pop("per_test") if "per_test" in kw else [value - 0.02, value + 0.02, value] * 3 + [value]
    d = {"estimator": estimator, "setting": setting, "setting_version": 1, "spec_hash": "h", "protocol": "loo-fixed",
         "mode": "warm", "metric": "spearman", "value": value, "n_test": 10, "per_test": per,
         "test_idx": list(range(len(per))), "wall_time_s": 1.0, "peak_memory_mb": 100.0, "device": "cpu"}
    if value is not None:
        d.update(ci_low=value - 0.02, ci_high=value + 0.02)
    d.update(kw)
    return Case(**d)


def run_doc(*cases: Case, **raw) -> dict:
    """A run file's JSON; ``raw`` sets fields of the first case as written (a NaN stays NaN, which
    ``Case.to_json`` would write as null)."""
    doc = Run(None, 3, "2026-12-02T00:00:00", "smoke", {"torch": "x", "cuda": None, "device_name": "cpu",
                                                        "cpu_count": 2}, {"sha": None, "dirty": None},
              list(cases)).to_json()
    if raw:
        doc["cases"][0].update(raw)
    return doc


def write(path: Path, doc) -> str:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


@pytest.fixture
def files(tmp_path):
    """A good baseline (exact at 0.9 on two settings) and a run that really regresses (0.5 on iris-a)."""
    base = write(tmp_path / "baseline.json", run_doc(case(), case("iris-b")))
    worse = write(tmp_path / "run.json", run_doc(case(value=0.5), case("iris-b")))
    return tmp_path, base, worse


def assert_gate_failed(res, *names: str) -> None:
    """A failed verdict (exit 1, GATE FAILED), not a pass and not a traceback."""
    if res.rc == 0 or "gate passed" in res.out:
        raise SilentWrong(f"the gate passed (exit {res.rc}):\n{res.out[-1500:]}\n{res.err[-1500:]}")
    assert res.rc == 1 and "GATE FAILED" in res.out, res.text[-2000:]
    for n in names:
        assert n in res.out, (n, res.out[-2000:])


# ------------------------------------------------------------------ the gate's SPEC

@pytest.mark.fault("gate", "clear-error")
def test_misspelt_gate_metric_is_a_usage_error_naming_the_known_metrics(files):
    _, base, worse = files
    assert_clear_error(cli("compare", worse, "--baseline", base, "--gate", "spearmen:-0.05"),
                       "spearmen:-0.05", KNOWN, rc=2)


@pytest.mark.fault("gate", "clear-error")
def test_gate_tolerance_that_is_not_a_number_is_a_usage_error(files):
    _, base, worse = files
    assert_clear_error(cli("compare", worse, "--baseline", base, "--gate", "spearman:abc"), "spearman:abc", rc=2)


@pytest.mark.fault("gate", "clear-error")
def test_gate_tolerance_with_a_bad_unit_is_a_usage_error(files):
    _, base, worse = files
    assert_clear_error(cli("compare", worse, "--baseline", base, "--gate", "time:+25x"), "time:+25x", rc=2)


@pytest.mark.fault("gate", "clear-error")
def test_misspelt_gate_metric_in_pytest_is_a_usage_error(files):
    tmp, base, _ = files
    (tmp / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "test_nothing.py", "-q", "-p", "no:cacheprovider",
                           "--results-dir", str(tmp / "results"), "--baseline", base, "--gate", "spearmen:-0.05"],
                          cwd=tmp, capture_output=True, text=True, env=env, timeout=300, check=False)
    if proc.returncode == 0:
        raise SilentWrong(f"pytest passed with --gate spearmen:-0.05:\n{proc.stdout[-1500:]}")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "unknown metric 'spearmen'" in proc.stderr and KNOWN in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp / "results").exists()  # nothing ran


# ------------------------------------------------------------------ baselines a gate cannot use

class _Config:
    """The two options ``_gate_options`` reads, as pytest's config would give them."""

    def __init__(self, baseline: str, gates=()):
        self.opts = {"--gate": list(gates), "--baseline": baseline, "dist": "no", "numprocesses": None}

    def getoption(self, name, default=None):
        return self.opts.get(name, default)


@pytest.mark.fault("gate", "clear-error")
def test_nan_baseline_value_in_pytest_is_a_usage_error_before_anything_runs(tmp_path):
    from influence_bench.pytest_plugin import _gate_options

    doc = run_doc(case(), case("iris-b"))
    doc["cases"][1]["value"] = float("nan")
    base = write(tmp_path / "baseline.json", doc)
    with pytest.raises(pytest.UsageError, match=r"baseline\.json: case exact / iris-b / loo-fixed / warm / "
                                                r"spearman: value is NaN"):
        _gate_options(_Config(base, ["spearman:-0.05"]))


@pytest.mark.fault("gate", "clear-error")
def test_empty_baseline_is_an_error_not_a_pass(files):
    tmp, _, worse = files
    base = write(tmp / "empty.json", run_doc())
    assert_clear_error(cli("compare", worse, "--baseline", base), "empty.json", "no cases", rc=2)


@pytest.mark.fault("gate", "handled")
def test_baseline_without_the_runs_estimators_fails_the_gate(files):
    tmp, _, worse = files
    base = write(tmp / "other.json", run_doc(case(estimator="cg"), case("iris-b", estimator="cg")))
    assert_gate_failed(cli("compare", worse, "--baseline", base), "compared nothing",
                       "the baseline has no case of the run's estimators (exact); it has cg")


def _bad_baseline(tmp: Path, field: str, value, setting="iris-b") -> str:
    """The good baseline with one field of the ``setting`` case replaced (``per_test[3]`` etc.)."""
    doc = run_doc(case(), case("iris-b"))
    c = next(c for c in doc["cases"] if c["setting"] == setting)
    if field.startswith("per_test"):
        c["per_test"][int(field[9:-1])] = value
    else:
        c[field] = value
    return write(tmp / "bad-baseline.json", json.dumps(doc))  # json writes NaN / Infinity as bare tokens


@pytest.mark.fault("gate", "clear-error")
def test_nan_baseline_value_is_an_error_naming_the_file_and_case(files):
    """A NaN beside good cases used to be "not comparable" while the others passed the gate."""
    tmp, _, worse = files
    base = _bad_baseline(tmp, "value", float("nan"), setting="iris-a")
    assert_clear_error(cli("compare", worse, "--baseline", base), "bad-baseline.json", LABEL, "NaN", rc=2)


@pytest.mark.fault("gate", "clear-error")
def test_infinite_baseline_value_is_an_error(files):
    tmp, _, worse = files
    base = _bad_baseline(tmp, "per_test[3]", float("inf"))
    assert_clear_error(cli("compare", worse, "--baseline", base), "bad-baseline.json",
                       "exact / iris-b / loo-fixed / warm / spearman", "per_test[3] is inf", rc=2)


@pytest.mark.fault("gate", "clear-error")
def test_out_of_range_baseline_correlation_is_an_error(files):
    tmp, _, worse = files
    base = _bad_baseline(tmp, "value", 1.7, setting="iris-a")
    assert_clear_error(cli("compare", worse, "--baseline", base), "bad-baseline.json", LABEL,
                       "1.7 is outside [-1, 1]", rc=2)


@pytest.mark.fault("gate", "clear-error")
def test_negative_baseline_time_is_an_error(files):
    tmp, _, worse = files
    base = _bad_baseline(tmp, "wall_time_s", -2.0)
    assert_clear_error(cli("compare", worse, "--baseline", base, "--gate", "time:+25%"), "bad-baseline.json",
                       "exact / iris-b", "wall_time_s -2 s is negative", rc=2)


UNUSABLE = {  # file content -> what the message must say
    "not-json": ("this is not JSON\n", "cannot be read as JSON"),
    "truncated": (None, "cannot be read as JSON"),  # the good file cut in half
    "json-list": ("[1, 2, 3]\n", "expected a JSON object, got list"),
    "future-schema": ('{"schema_version": 99, "cases": []}\n', "schema_version 99 is newer"),
}


RUN_FAULTS = {**UNUSABLE,
              "empty": (json.dumps(run_doc()), "holds no cases"),
              "nan": (json.dumps(run_doc(case(), value=float("nan"))), "value is NaN"),
              "out-of-range": (json.dumps(run_doc(case(value=-3.0))), "-3 is outside [-1, 1]")}
UNUSABLE_FILES = [("baseline", k) for k in UNUSABLE] + [("run", k) for k in RUN_FAULTS]


@pytest.mark.fault("gate", "clear-error")
@pytest.mark.parametrize("side,kind", UNUSABLE_FILES, ids=[f"{s}-{k}" for s, k in UNUSABLE_FILES])
def test_an_unusable_baseline_or_run_file_is_an_error_naming_it(files, side, kind):
    """A baseline or run file that cannot be used, each named in the error (an impossible run value
    used to read as an improvement)."""
    tmp, base, worse = files
    text, says = (UNUSABLE if side == "baseline" else RUN_FAULTS)[kind]
    name = f"{kind}.json" if side == "baseline" else f"run-{kind}.json"
    bad = write(tmp / name, text if text is not None else Path(base).read_text()[:300])
    args = ("compare", worse, "--baseline", bad) if side == "baseline" else ("compare", bad, "--baseline", base)
    assert_clear_error(cli(*args), name, says, rc=2)


# ------------------------------------------------------------------ baseline update

def _error_run(tmp: Path, status="error") -> str:
    return write(tmp / "run-failed.json", run_doc(
        case(status=status, value=None, per_test=[], message="exact on iris-a: boom\nx"),
        case("iris-b")))


@pytest.mark.fault("gate", "clear-error")
def test_baseline_update_refuses_to_replace_a_good_value_with_an_error(files):
    tmp, base, _ = files
    before = Path(base).read_bytes()
    res = cli("baseline", "update", _error_run(tmp), "--out", base)
    assert_clear_error(res, LABEL, "run-failed.json", "--allow-errors", rc=1)
    if Path(base).read_bytes() != before:
        raise ResultsLost("the refused update changed the baseline")


@pytest.mark.fault("gate", "clear-error")
def test_baseline_update_refuses_a_skip_replacing_an_earlier_run_files_value(files):
    """`baseline update OLD NEW`: a later run file's skip must not silently win over a value."""
    tmp, base, _ = files
    res = cli("baseline", "update", base, _error_run(tmp, "skipped"), "--out", str(tmp / "new.json"))
    assert_clear_error(res, LABEL, "is skipped in", "run-failed.json", rc=1)
    assert not (tmp / "new.json").exists()


@pytest.mark.fault("gate", "handled")
def test_baseline_update_with_allow_errors_writes_the_error_and_says_so(files):
    from influence_bench.reporting.schema import load_run

    tmp, base, _ = files
    res = cli("baseline", "update", _error_run(tmp), "--out", base, "--allow-errors")
    assert res.rc == 0, res.text
    assert LABEL in res.err and "--allow-errors" in res.err
    statuses = {c.setting: c.status for c in load_run(base).cases}
    assert statuses == {"iris-a": "error", "iris-b": "ok"}


@pytest.mark.fault("gate", "handled")
def test_baseline_update_keeps_the_files_mode(files):
    _, base, worse = files
    os.chmod(base, 0o640)
    res = cli("baseline", "update", worse, "--out", base)
    assert res.rc == 0, res.text
    mode = os.stat(base).st_mode & 0o777
    if mode != 0o640:
        raise SilentWrong(f"baseline update left the baseline at mode {mode:o}, was 640")


@pytest.mark.fault("gate", "handled")
def test_baseline_update_gives_a_new_file_the_umasks_mode(files):
    tmp, _, worse = files
    old = os.umask(0o022)
    try:
        res = cli("baseline", "update", worse, "--out", str(tmp / "fresh" / "baseline.json"))
    finally:
        os.umask(old)
    assert res.rc == 0, res.text
    mode = os.stat(tmp / "fresh" / "baseline.json").st_mode & 0o777
    if mode != 0o644:
        raise SilentWrong(f"a new baseline got mode {mode:o}, not 644 (0666 less the umask 022)")


@pytest.mark.fault("gate", "clear-error")
def test_baseline_update_that_dies_mid_write_leaves_the_old_file_whole(files, monkeypatch):
    tmp, base, worse = files
    before = Path(base).read_bytes()
    real = Path.write_text

    def half_then_die(self, text, *a, **kw):  # the disk fills after half the file
        real(self, text[: len(text) // 2], *a, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_die)
    res = cli("baseline", "update", worse, "--out", base)
    monkeypatch.undo()
    assert_clear_error(res, "baseline.json", "No space left on device", rc=2)
    if Path(base).read_bytes() != before:
        raise ResultsLost("a failed write left a changed (half-written) baseline")
    leftovers = [p.name for p in tmp.iterdir() if p.name.startswith(".baseline.json")]
    assert not leftovers, leftovers


@pytest.mark.fault("gate", "clear-error")
def test_baseline_update_refuses_a_run_with_impossible_values(files):
    tmp, _, _ = files
    bad = write(tmp / "run-nan.json", json.dumps(run_doc(case(), value=float("nan"))))
    res = cli("baseline", "update", bad, "--out", str(tmp / "new.json"))
    assert_clear_error(res, "run-nan.json", LABEL, "NaN", rc=2)
    assert not (tmp / "new.json").exists()


# ------------------------------------------------------------------ verdicts on nothing

WD0 = "iris-mlp-d1-w16-wd0"  # no minimiser without weight decay: most test points are undefined there


@pytest.mark.fault("gate", "handled")
def test_a_case_defined_at_3_of_10_test_points_is_no_pass():
    """Three close values of ten: a t-interval above 0, so the chance floor alone passed it."""
    from influence_bench.spec.thresholds import Thresholds, judge

    three = case(WD0, value=0.9, ci_low=0.85, ci_high=0.95, n_test=3, n_undefined=7,
                 per_test=[0.88, 0.9, 0.92] + [None] * 7)
    verdicts, failures = judge([three], Thresholds.load())
    if set(verdicts.values()) != {"FAIL"}:
        raise SilentWrong(f"a case defined at 3 of 10 test points judged {verdicts}")
    assert len(failures) == 1 and "spearman judged on 3 of 10 test points (7 undefined) < 5 required" in failures[0]


@pytest.mark.fault("gate", "handled")
def test_a_case_defined_at_1_of_10_test_points_is_no_xfail_either(tmp_path):
    """One test point of ten, under a documented known failure of the chance floor: xfail needed no
    CI and read as an expected result; a verdict on one test point is a FAIL."""
    from influence_bench.spec.thresholds import Thresholds, judge

    (tmp_path / "t.toml").write_text(f'[[floor]]\nestimator = "exact"\nsettings = "{WD0}"\nmetric = "spearman"\n'
                                     'stat = "ci_low"\nmin = 0.0\nknown_failure = "no minimiser"\nknown_min = -0.5\n')
    one = case(WD0, value=0.9, ci_low=None, ci_high=None, n_test=1, n_undefined=9, per_test=[0.9] + [None] * 9)
    verdicts, failures = judge([one], Thresholds.load(tmp_path / "t.toml"), [])
    if set(verdicts.values()) != {"FAIL"}:
        raise SilentWrong(f"a case defined at 1 of 10 test points judged {verdicts}")
    assert failures == [(f"exact on {WD0} (loo-fixed): spearman judged on 1 of 10 test points (9 undefined) < 5 "
                         "required (at least 3 and 50% of those evaluated: thresholds.toml [test_points]): too few "
                         "to judge")]
