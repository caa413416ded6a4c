"""Regression gates over synthetic run files: the noise-aware rule and every output category."""

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from influence_bench.cli.main import main
from influence_bench.reporting.gates import GateSpecError, compare_runs, format_comparison, one_sided_p, parse_gate
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


def pcase(setting="iris-a", per=(), idx=None, **kw):
    """A case with per-test values (None: undefined) at test indices ``idx`` (default 0..n-1)."""
    per = [None if v is None else float(v) for v in per]
    ok = [v for v in per if v is not None]
    return case(setting, value=sum(ok) / len(ok) if ok else None, per_test=per,
                test_idx=list(range(len(per))) if idx is None else list(idx), **kw)


BASE = [0.62, 0.81, 0.45, 0.93, 0.70, 0.55, 0.88, 0.39, 0.76, 0.67]


def test_drop_beyond_tolerance_without_per_test_values_regresses_on_the_tolerance_alone():
    res = compare_runs(run(case(value=0.70, ci=(0.66, 0.74))), run(case(value=0.80)), SPEARMAN)
    assert res.failed and [f.key for f in res.regressions] == [("est", "iris-a", "loo-fixed", "warm", "spearman")]
    assert "0.8000 -> 0.7000" in res.regressions[0].detail
    assert "no per-test values: judged on the tolerance alone" in res.regressions[0].detail
    # the run's CI no longer matters: the same drop inside a wide CI regresses too
    assert compare_runs(run(case(value=0.70, ci=(0.55, 0.85))), run(case(value=0.80)), SPEARMAN).failed


def test_consistent_paired_drop_regresses_with_the_p_value_of_scipy_ttest_rel():
    noise = [0.02, -0.01, 0.015, -0.02, 0.0, 0.01, -0.015, 0.005, 0.02, -0.025]  # sums to 0
    now = [b - 0.08 + e for b, e in zip(BASE, noise)]
    res = compare_runs(run(pcase(per=now)), run(pcase(per=BASE)), SPEARMAN)
    assert res.failed and len(res.regressions) == 1
    p = scipy.stats.ttest_rel(BASE, now, alternative="greater").pvalue
    assert p < 1e-6 and f"p = {p:.3g}" in res.regressions[0].detail
    assert "paired over 10 test points: mean change -0.0800" in res.regressions[0].detail
    # the unpaired view would not have seen it: the run's own t-interval contains the baseline mean
    lo, hi = scipy.stats.t.interval(0.95, 9, loc=sum(now) / 10, scale=scipy.stats.sem(now))
    assert lo <= sum(BASE) / 10 <= hi


def test_big_mean_drop_the_spread_explains_is_noise_not_a_regression():
    swing = [0.5, -0.4, 0.45, -0.3, 0.4, -0.35, 0.3, -0.2, 0.25, -0.15]  # mean drop 0.05 + noise
    now = [min(1.0, max(-1.0, b - s - 0.05)) for b, s in zip(BASE, swing)]
    bv, rv = np.array(BASE), np.array(now)
    assert (bv - rv).mean() > 0.05 and scipy.stats.ttest_rel(bv, rv, alternative="greater").pvalue > 0.05
    res = compare_runs(run(pcase(per=now)), run(pcase(per=BASE)), SPEARMAN)
    assert not res.failed and res.unchanged == 1
    # the mirror image: a big noisy gain is no improvement either
    res = compare_runs(run(pcase(per=BASE)), run(pcase(per=now)), SPEARMAN)
    assert not res.improvements and res.unchanged == 1


@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")
@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.integers(2, 12), elements=st.floats(-1, 1, allow_nan=False)),
       arrays(np.float64, 12, elements=st.floats(-1, 1, allow_nan=False)))
def test_one_sided_p_is_scipy_ttest_rel_greater(x, y):
    y = y[:x.size]
    p = one_sided_p(x, y)
    d = x - y
    if np.ptp(d) == 0:  # zero variance: scipy says NaN; the gate decides by the sign of the difference
        assert p == (0.0 if d[0] > 0 else 1.0)
    else:
        ref = scipy.stats.ttest_rel(x, y, alternative="greater").pvalue
        if np.isfinite(ref):
            assert p == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_pairs_are_aligned_by_test_idx_and_only_points_defined_in_both_count():
    now = [b - 0.1 for b in BASE]
    now[3] = None  # undefined in the run: left out
    base = list(BASE)
    base[7] = None  # undefined in the baseline: left out
    # the run lists its test points in reverse order; by position the pairs would be noise
    res = compare_runs(run(pcase(per=now[::-1], idx=range(9, -1, -1))), run(pcase(per=base)), SPEARMAN)
    assert len(res.regressions) == 1
    detail = res.regressions[0].detail
    assert "paired over 8 test points: mean change -0.1000" in detail
    # identical differences (zero variance: t is infinite or 0/0): a drop beyond the tolerance is significant
    dyadic = [0.5, 0.75, 0.25, 0.875, 0.625]
    lower = [v - 0.125 for v in dyadic]
    assert one_sided_p(dyadic, lower) == 0.0 and one_sided_p(lower, dyadic) == 1.0
    assert one_sided_p(dyadic, dyadic) == 1.0  # no difference at all is no drop
    res = compare_runs(run(pcase(per=lower)), run(pcase(per=dyadic)), SPEARMAN)
    assert res.failed and res.regressions[0].detail.endswith("p = 0)")
    # identical differences within the tolerance: unchanged (zero variance is no regression by itself)
    assert compare_runs(run(pcase(per=[b - 0.03 for b in BASE])), run(pcase(per=BASE)), SPEARMAN).unchanged == 1
    # one test point in common: the paired test cannot run; tolerance alone, and the finding says so
    res = compare_runs(run(pcase(per=[0.1, None])), run(pcase(per=[0.9, 0.9])), SPEARMAN)
    assert res.failed and "1 test point(s) defined in both: judged on the tolerance alone" in res.regressions[0].detail


def test_small_drop_is_within_tolerance():
    res = compare_runs(run(case(value=0.77, ci=(0.76, 0.78))), run(case(value=0.80)), SPEARMAN)
    assert not res.failed and res.unchanged == 1 and not res.improvements
    res = compare_runs(run(pcase(per=[b - 0.03 for b in BASE])), run(pcase(per=BASE)), SPEARMAN)
    assert not res.failed and res.unchanged == 1


def test_relative_tolerance_and_missing_ci():
    gate = (parse_gate("spearman:-10%"),)
    assert not compare_runs(run(case(value=0.73, ci=None)), run(case(value=0.80)), gate).failed  # 0.07 < 0.08
    assert compare_runs(run(case(value=0.71, ci=None)), run(case(value=0.80)), gate).failed


def test_improvement_new_vanished_not_comparable_are_separate_and_never_fail():
    baseline = run(case("s-up"), case("s-gone"), case("s-ver"), case("s-hash"), case("s-nan", value=float("nan")),
                   case("s-skip", status="skipped", value=None, ci=None))
    now = run(case("s-up", value=0.95, ci=(0.93, 0.97)), case("s-new"), case("s-ver", setting_version=2, value=0.1),
              case("s-hash", spec_hash="h2", value=0.1), case("s-nan", value=0.1),
              case("s-skip", status="skipped", value=None, ci=None))
    res = compare_runs(now, baseline, SPEARMAN)
    assert not res.failed
    assert [f.key[1] for f in res.improvements] == ["s-up"]
    assert [f.key[1] for f in res.new] == ["s-new"]
    assert [f.key[1] for f in res.vanished] == ["s-gone"]
    assert [f.key[1] for f in res.not_comparable] == ["s-hash", "s-nan", "s-skip", "s-ver"]
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


def test_a_baseline_ok_case_that_is_skipped_or_undefined_now_regresses_with_the_reason():
    res = compare_runs(run(case("a", status="skipped", value=None, ci=None,
                                message="est on iris-a: 15 parameters exceed max_params=10\nmore"),
                           case("b", value=None, ci=None, n_test=0, n_undefined=10), case("c")),
                       run(case("a"), case("b"), case("c")), SPEARMAN)
    assert res.failed and [f.key[1] for f in res.regressions] == ["a", "b"]
    a, b = (f.detail for f in res.regressions)
    assert a == "did not run: skipped now (baseline 0.8): est on iris-a: 15 parameters exceed max_params=10"
    assert b == "no value now (baseline 0.8): undefined at all 10 test points"
    text = format_comparison(res)
    assert "est / a / loo-fixed / warm / spearman: did not run: skipped now" in text and "GATE FAILED: 2" in text
    # a NaN run value is no value either
    assert compare_runs(run(case("c", value=float("nan"))), run(case("c")), SPEARMAN).failed


def test_selected_but_no_result_regresses_a_slice_that_left_it_out_does_not():
    def selected(*settings, not_run=None):
        entries = [{"estimator": "est", "setting": s, "mode": "warm", "protocols": ["loo-fixed", "loo-topk"]}
                   for s in settings]
        if not_run:
            entries[-1]["not_run"] = not_run
        return {"selected": entries}

    baseline = run(case("a"), case("b"), case("cifar"))
    sliced = replace(run(case("a"), case("b")), extra=selected("a", "b"))  # `-k`: cifar not selected
    res = compare_runs(sliced, baseline, SPEARMAN)
    assert not res.failed and [f.key[1] for f in res.vanished] == ["cifar"]
    missing = replace(run(case("a")), extra=selected("a", "b", not_run="data unavailable: no such file"))
    res = compare_runs(missing, baseline, SPEARMAN)
    assert res.failed and [f.key[1] for f in res.regressions] == ["b"] and [f.key[1] for f in res.vanished] == ["cifar"]
    assert res.regressions[0].detail == "selected but no result (baseline 0.8): data unavailable: no such file"
    # a protocol or mode the run did not select is not "selected"
    other_mode = replace(run(case("a")), extra={"selected": [{"estimator": "est", "setting": "b", "mode": "scratch",
                                                              "protocols": ["loo-fixed"]}]})
    assert not compare_runs(other_mode, baseline, SPEARMAN).failed
    # the time gate: the (estimator, setting, mode) pair is what is selected
    res = compare_runs(replace(run(case("a")), extra=selected("a", "b")), baseline, (parse_gate("time:+25%"),))
    assert [f.key for f in res.regressions] == [("est", "b", "warm", "time")]
    # an old run file without a selection: vanished, as before
    assert not compare_runs(run(case("a")), baseline, SPEARMAN).failed


def test_unknown_gate_metric_and_a_gate_that_compared_nothing_fail():
    with pytest.raises(GateSpecError, match=r"unknown metric 'spearmen'; known: spearman, pearson, topk-overlap, "
                                            r"time, memory"):
        parse_gate("spearmen:-0.05")
    assert parse_gate("topk-overlap:-0.1").metric == "topk-overlap"
    # nothing in common (a run of other settings): the gate checked nothing
    res = compare_runs(run(case("x")), run(case("y")), SPEARMAN)
    assert res.failed and res.empty_gates == ["spearman:-0.05"] and not res.regressions
    text = format_comparison(res)
    assert "GATE FAILED: gate spearman:-0.05 compared nothing" in text and "gate passed" not in text
    # a NaN baseline value compares nothing: not a silent pass
    res = compare_runs(run(case("x", value=0.2)), run(case("x", value=float("nan"))), SPEARMAN)
    assert res.failed and [f.key[1] for f in res.not_comparable] == ["x"] and res.unchanged == 0
    # one gate with cases, one without: the empty one still fails the comparison
    res = compare_runs(run(case("x")), run(case("x")), (SPEARMAN[0], parse_gate("pearson:-0.05")))
    assert res.unchanged == 1 and res.empty_gates == ["pearson:-0.05"] and res.failed


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
    assert not compare_runs(base, base, SPEARMAN).empty_gates
    worse = [replace(c, value=c.value - 0.2, per_test=[None if v is None else v - 0.2 for v in c.per_test])
             if c.estimator == "exact" and c.metric == "spearman" else c for c in base.cases]
    res = compare_runs(replace(base, cases=worse), base, SPEARMAN)
    assert len(res.regressions) == 7 and {f.key[0] for f in res.regressions} == {"exact"}
    assert all("paired over" in f.detail for f in res.regressions)
    # the case means alone moved, not the test points: the paired comparison sees no change
    means_only = [replace(c, value=c.value - 0.2) if c.estimator == "exact" and c.metric == "spearman" else c
                  for c in base.cases]
    assert not compare_runs(replace(base, cases=means_only), base, SPEARMAN).failed


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


def test_values_no_metric_can_take_are_refused_naming_the_case():
    from influence_bench.reporting.gates import GateInputError, check_gate_input, value_problems

    assert value_problems(case()) == [] and value_problems(case(value=1.0 + 1e-12)) == []  # rounding is not range
    assert value_problems(case(value=float("nan"))) == []  # in memory, NaN is "undefined": not comparable
    assert value_problems(case(value=float("nan")), nan=True) == ["value is NaN (an undefined value is null)"]
    assert value_problems(case(value=-1.5)) == ["value -1.5 is outside [-1, 1], the range of spearman"]
    assert value_problems(case(metric="topk-overlap", value=-0.1)) == [
        "value -0.1 is outside [0, 1], the range of topk-overlap"]
    assert value_problems(case(ci=(0.5, 1.2))) == []  # a t-interval may reach past 1
    assert value_problems(case(ci=(0.5, float("inf")))) == ["ci_high is inf"]
    assert value_problems(replace(pcase(per=[0.5, 2.0]), value=0.5)) == [
        "per_test[1] 2 is outside [-1, 1], the range of spearman"]
    assert value_problems(case(wall_time_s=-0.5)) == ["wall_time_s -0.5 s is negative"]
    assert value_problems(case(peak_memory_mb=float("-inf"))) == ["peak_memory_mb is -inf"]
    # compare_runs refuses both sides, naming the side and the first case
    with pytest.raises(GateInputError, match=r"^baseline: case est / b / loo-fixed / warm / spearman: value 3 is "
                                             r"outside \[-1, 1\].* \(and 1 more such value\(s\)\)"):
        compare_runs(run(case("a")), run(case("a"), case("b", value=3.0, wall_time_s=-1.0)), SPEARMAN)
    with pytest.raises(GateInputError, match=r"^run: case est / a / .*wall_time_s -1 s is negative"):
        compare_runs(run(case("a", wall_time_s=-1.0)), run(case("a")), SPEARMAN)
    with pytest.raises(GateInputError, match="baseline holds no cases: a gate against it would compare nothing"):
        compare_runs(run(case("a")), run(), SPEARMAN)
    with pytest.raises(GateInputError, match="run holds no cases"):
        check_gate_input(run(), "run")


def test_baseline_update_merges_and_refuses_errors_over_good_values(tmp_path):
    from influence_bench.reporting.gates import merge_baseline

    old = replace(run(case("a"), case("b"), case("c", status="skipped", value=None, ci=None)), path=Path("old.json"))
    new = replace(run(case("a", status="error", value=None, ci=None, message="boom\ntrace"),
                      case("c", status="skipped", value=None, ci=None, message="no data"), case("d")),
                  path=Path("new.json"))
    merged, replaced = merge_baseline([new], old)
    assert [c.setting for c in merged.cases] == ["a", "c", "d"]  # := the run files, not a union with old
    assert replaced == ["est / a / loo-fixed / warm / spearman errors in new.json (boom), was 0.8 in old.json"]
    # between run files: a later skip over an earlier value; a later value over an earlier error is fine
    merged, replaced = merge_baseline([old, new])
    assert [c.setting for c in merged.cases] == ["a", "b", "c", "d"] and len(replaced) == 1
    fixed = replace(run(case("a", value=0.7)), path=Path("fixed.json"))
    assert merge_baseline([new, fixed], old)[1] == []


def test_cli_baseline_update_refuses_keeps_mode_and_writes_atomically(tmp_path, capsys):
    base = _write(tmp_path / "base.json", run(case("a"), case("b")))
    failed = _write(tmp_path / "failed.json", run(case("a", status="error", value=None, ci=None, message="boom"),
                                                   case("b")))
    out = tmp_path / "baseline.json"
    assert main(["baseline", "update", base, "--out", str(out)]) == 0
    os.chmod(out, 0o664)
    before = out.read_bytes()
    assert main(["baseline", "update", failed, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "refused: est / a / loo-fixed / warm / spearman errors in" in err and "failed.json" in err
    assert out.read_bytes() == before
    assert main(["baseline", "update", failed, "--out", str(out), "--allow-errors"]) == 0
    assert [c.status for c in load_run(out).cases] == ["error", "ok"] and os.stat(out).st_mode & 0o777 == 0o664
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    # a run file the gate would refuse makes no baseline
    (tmp_path / "nan.json").write_text(Path(base).read_text().replace('"value": 0.8', '"value": NaN', 1))
    assert main(["baseline", "update", str(tmp_path / "nan.json"), "--out", str(tmp_path / "b2.json")]) == 2
    assert "nan.json: case est / a / loo-fixed / warm / spearman: value is NaN" in capsys.readouterr().err
    assert not (tmp_path / "b2.json").exists()


def test_cli_compare_refuses_empty_and_impossible_files(tmp_path, capsys):
    good = _write(tmp_path / "good.json", run(case("a"), case("b")))
    empty = _write(tmp_path / "empty.json", run())
    assert main(["compare", good, "--baseline", empty]) == 2
    assert "baseline " + empty + " holds no cases" in capsys.readouterr().err
    (tmp_path / "inf.json").write_text(Path(good).read_text().replace('"wall_time_s": 1.0', '"wall_time_s": Infinity'))
    assert main(["compare", str(tmp_path / "inf.json"), "--baseline", good, "--gate", "time:+25%"]) == 2
    assert "run file " + str(tmp_path / "inf.json") + ": case est / a / " in capsys.readouterr().err
    # a baseline of other estimators: the gate fails and says whose cases each side has
    other = _write(tmp_path / "other.json", run(case("a", estimator="cg")))
    assert main(["compare", good, "--baseline", other]) == 1
    assert "the baseline has no case of the run's estimators (est); it has cg" in capsys.readouterr().out
