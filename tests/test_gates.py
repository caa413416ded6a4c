"""Regression gates over synthetic run files: the noise-aware rule and every output category."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from influence_bench.cli.main import main
from influence_bench.reporting.gates import GateSpecError, compare_runs, format_comparison, parse_gate
from influence_bench.reporting.schema import Case, Run, load_run

V1 = Path(__file__).parent / "data" / "run-v1-iris-smoke.json"


def case(setting="iris-a", value=0.80, ci=(0.78, 0.82), **kw):
    d = dict(estimator="est", setting=setting, setting_version=1, spec_hash="h1", protocol="loo-fixed",
             mode="warm", metric="spearman", value=value, ci_low=ci[0] if ci else None,
             ci_high=ci[1] if ci else None, n_test=10, wall_time_s=1.0, peak_memory_mb=100.0, device="cpu")
    d.update(kw)
    return Case(**d)


def run(*cases):
    return Run(None, 2, "2026-01-01T00:00:00", "smoke", {"torch": "x", "cuda": None, "device_name": "cpu",
                                                         "cpu_count": 2}, {"sha": None, "dirty": None}, list(cases))


SPEARMAN = (parse_gate("spearman:-0.05"),)


def test_parse_gate():
    g = parse_gate("spearman:-0.05")
    assert (g.metric, g.tolerance, g.relative, g.is_cost) == ("spearman", 0.05, False, False)
    g = parse_gate("time:+25%")
    assert (g.metric, g.tolerance, g.relative, g.is_cost) == ("time", 0.25, True, True)
    assert str(g) == "time:+25%" and str(parse_gate("pearson:-10%")) == "pearson:-10%"
    assert parse_gate("memory:+50").allowed(1000) == 50 and parse_gate("memory:+5%").allowed(1000) == 50
    for bad, msg in [("spearman", "expected METRIC:TOLERANCE"), ("spearman:+0.05", "tolerates a drop"),
                     ("time:-10%", "tolerates an increase"), ("spearman:-x", "expected METRIC")]:
        with pytest.raises(GateSpecError, match=msg):
            parse_gate(bad)


def test_drop_beyond_tolerance_with_baseline_outside_ci_regresses():
    res = compare_runs(run(case(value=0.70, ci=(0.66, 0.74))), run(case(value=0.80)), SPEARMAN)
    assert res.failed and [f.key for f in res.regressions] == [("est", "iris-a", "loo-fixed", "warm", "spearman")]
    assert "0.8000 -> 0.7000" in res.regressions[0].detail


def test_noise_aware_big_drop_inside_run_ci_does_not_regress():
    # drop of 0.10 > 0.05, but the run's own CI [0.55, 0.85] contains the baseline 0.80: noise
    res = compare_runs(run(case(value=0.70, ci=(0.55, 0.85))), run(case(value=0.80)), SPEARMAN)
    assert not res.failed and res.unchanged == 1


def test_small_drop_outside_ci_is_within_tolerance():
    res = compare_runs(run(case(value=0.77, ci=(0.76, 0.78))), run(case(value=0.80)), SPEARMAN)
    assert not res.failed and res.unchanged == 1 and not res.improvements


def test_relative_tolerance_and_missing_ci():
    gate = (parse_gate("spearman:-10%"),)
    assert not compare_runs(run(case(value=0.73, ci=None)), run(case(value=0.80)), gate).failed  # 0.07 < 0.08
    assert compare_runs(run(case(value=0.71, ci=None)), run(case(value=0.80)), gate).failed


def test_improvement_new_vanished_not_comparable_are_separate_and_never_fail():
    baseline = run(case("s-up"), case("s-gone"), case("s-ver"), case("s-hash"), case("s-undef"), case("s-skip"))
    now = run(case("s-up", value=0.95, ci=(0.93, 0.97)), case("s-new"), case("s-ver", setting_version=2, value=0.1),
              case("s-hash", spec_hash="h2", value=0.1), case("s-undef", value=None, ci=None),
              case("s-skip", status="skipped", value=None, ci=None))
    res = compare_runs(now, baseline, SPEARMAN)
    assert not res.failed
    assert [f.key[1] for f in res.improvements] == ["s-up"]
    assert [f.key[1] for f in res.new] == ["s-new"]
    assert [f.key[1] for f in res.vanished] == ["s-gone"]
    assert [f.key[1] for f in res.not_comparable] == ["s-hash", "s-skip", "s-undef", "s-ver"]
    assert "baseline v1 h1, run v2 h1" in {f.key[1]: f.detail for f in res.not_comparable}["s-ver"]
    text = format_comparison(res, "now.json", "base.json")
    for title in ["REGRESSIONS: 0", "improvements: 1", "new cases (not in baseline): 1",
                  "vanished cases (in baseline, not in run): 1", "not comparable", "gate passed"]:
        assert title in text


def test_error_now_is_a_regression_and_error_before_an_improvement():
    res = compare_runs(run(case("a", status="error", value=None, ci=None, message="boom\ntrace"), case("b")),
                       run(case("a"), case("b", status="error", value=None, ci=None)), SPEARMAN)
    assert [f.key[1] for f in res.regressions] == ["a"] and "errors now" in res.regressions[0].detail
    assert [f.key[1] for f in res.improvements] == ["b"]


def test_time_gate_relative_with_noise_floor():
    gate = (parse_gate("time:+25%"),)
    # the two protocol/metric cases of one (estimator, setting) share one wall time: judged once
    slow = run(case(wall_time_s=2.0), case(metric="pearson", wall_time_s=2.0))
    res = compare_runs(slow, run(case(wall_time_s=1.0)), gate)
    assert res.failed and [f.key for f in res.regressions] == [("est", "iris-a", "warm", "time")]
    assert not compare_runs(run(case(wall_time_s=1.2)), run(case(wall_time_s=1.0)), gate).failed
    # 0.01 s -> 0.05 s is +400% but below the timer-noise floor
    assert not compare_runs(run(case(wall_time_s=0.05)), run(case(wall_time_s=0.01)), gate).failed
    assert compare_runs(run(case(wall_time_s=0.5)), run(case(wall_time_s=1.0)), gate).improvements


def test_unchanged_real_run_passes_and_noised_copy_fails():
    base = load_run(V1)
    assert not compare_runs(base, base, SPEARMAN).failed
    worse = [replace(c, value=c.value - 0.2, ci_low=c.ci_low - 0.2, ci_high=c.ci_high - 0.2)
             if c.estimator == "exact" and c.metric == "spearman" else c for c in base.cases]
    res = compare_runs(replace(base, cases=worse), base, SPEARMAN)
    assert len(res.regressions) == 7 and {f.key[0] for f in res.regressions} == {"exact"}


def _write(path, r):
    path.write_text(json.dumps(r.to_json()))
    return str(path)


def test_cli_compare_and_baseline_update(tmp_path, capsys):
    base = _write(tmp_path / "run-base.json", run(case("a"), case("b")))
    good = _write(tmp_path / "run-good.json", run(case("a"), case("b", value=0.9, ci=(0.88, 0.92))))
    bad = _write(tmp_path / "run-bad.json", run(case("a", value=0.5, ci=(0.45, 0.55)), case("b")))
    out = tmp_path / "results" / "baseline.json"
    assert main(["baseline", "update", base, "--out", str(out)]) == 0
    assert load_run(out).cases == load_run(base).cases
    assert main(["compare", good, "--baseline", str(out), "--gate", "spearman:-0.05"]) == 0
    assert "improvements: 1" in capsys.readouterr().out
    assert main(["compare", bad, "--baseline", str(out), "--gate", "spearman:-0.05", "--gate", "time:+25%"]) == 1
    text = capsys.readouterr().out
    assert text.count("GATE FAILED") == 1 and "est / a / loo-fixed / warm / spearman" in text


def test_cli_compare_bad_input_names_the_file(tmp_path, capsys):
    base = _write(tmp_path / "b.json", run(case("a")))
    (tmp_path / "partial.json").write_text(V1.read_text()[:2000])
    assert main(["compare", str(tmp_path / "partial.json"), "--baseline", base]) == 2
    assert "partial.json: cannot be read as JSON" in capsys.readouterr().err
    assert main(["compare", base, "--baseline", base, "--gate", "spearman:+1"]) == 2
    assert "tolerates a drop" in capsys.readouterr().err
