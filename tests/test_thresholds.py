"""The floors: the chance floor by confidence interval, floors by claim whatever the name, strict
known failures with a floor of their own, and measured floors generated from a run."""

from dataclasses import replace
from pathlib import Path

import pytest

from influence_bench.reporting.schema import Case
from influence_bench.spec import measured
from influence_bench.spec.thresholds import Thresholds, ThresholdsError, judge

IRIS = "iris-logreg-wd1e-3"


def case(est="e", setting=IRIS, proto="loo-fixed", metric="spearman", value=0.5, lo=0.2, hi=0.8, tags=()):
    return Case(estimator=est, setting=setting, setting_version=1, spec_hash="h", protocol=proto, mode="warm",
                metric=metric, value=value, ci_low=lo, ci_high=hi, min=lo, n_test=10, tags=list(tags))


def load(tmp_path, text, measured_text=None):
    (tmp_path / "t.toml").write_text(text)
    if measured_text is None:
        return Thresholds.load(tmp_path / "t.toml")
    (tmp_path / "m.toml").write_text(measured_text)
    return Thresholds.load(tmp_path / "t.toml", measured=tmp_path / "m.toml")


def verdict(cases, th):
    v, failures = judge(cases, th)
    return next(iter(v.values())), failures


def test_chance_floor_is_the_ci_not_the_mean(tmp_path):
    th = load(tmp_path, "")
    assert verdict([case(value=0.3, lo=-0.05)], th)[0] == "FAIL"  # positive mean, CI spans 0
    assert verdict([case(value=0.3, lo=0.01)], th)[0] == "pass"
    v, failures = verdict([case(value=-0.2, lo=-0.4, hi=0.0)], th)
    assert v == "FAIL" and "lower 95% CI bound of mean spearman >= 0" in failures[0]


def test_claim_floors_apply_by_what_an_estimator_declares_not_its_name(tmp_path):
    th = load(tmp_path, '[[floor]]\nclaim = "second-order"\nsettings = "*-logreg-*"\nprotocol = "loo-fixed"\n'
                        'metric = "spearman"\nmin = 0.95\n')
    assert verdict([case("my-exact", value=0.9, tags={"second-order"})], th)[0] == "FAIL"
    assert verdict([case("exact", value=0.9)], th)[0] == "pass"  # the name alone claims nothing
    assert verdict([case("x", value=0.97, lo=0.9, tags={"second-order"})], th)[0] == "pass"
    assert verdict([case("x", setting="iris-mlp-d1-w16-wd1e-3", value=0.9, tags={"second-order"})], th)[0] == "pass"
    # a run file written before cases carried tags: the registry's tags are used
    v, _ = judge([case("exact", value=0.9)], th, tags_of=lambda n: {"second-order"})
    assert set(v.values()) == {"FAIL"}


KNOWN = ('[[floor]]\nestimator = "e"\nmetric = "pearson"\nmin = 0.95\nknown_failure = "documented"\n'
         'known_min = 0.7\n')


def test_known_failures_are_strict_and_keep_a_floor_of_their_own(tmp_path):
    th = load(tmp_path, KNOWN)
    sp = case(value=0.9, lo=0.8)
    known: list = []
    v, failures = judge([sp, case(metric="pearson", value=0.8)], th, known)
    assert set(v.values()) == {"xfail"} and failures == [] and "known failure: documented" in known[0]
    v, failures = judge([sp, case(metric="pearson", value=0.6)], th)  # below its own floor
    assert set(v.values()) == {"FAIL"} and "below the known failure's own floor" in failures[0]
    v, failures = judge([sp, case(metric="pearson", value=0.98)], th)  # fixed: remove the rule
    assert set(v.values()) == {"FAIL"} and "known failure fixed: remove the rule" in failures[0]
    v, failures = judge([case(value=0.5, lo=0.4), case(metric="pearson", value=0.8)],
                        load(tmp_path, KNOWN + '[[floor]]\nmetric = "spearman"\nmin = 0.6\n'))
    assert set(v.values()) == {"FAIL"} and len(failures) == 1  # other floors still gate


def test_a_known_failure_of_the_chance_floor_replaces_it(tmp_path):
    th = load(tmp_path, '[[floor]]\nestimator = "e"\nmetric = "spearman"\nstat = "ci_low"\nmin = 0\n'
                        'known_failure = "at chance"\nknown_min = -0.2\n')
    assert verdict([case(value=-0.05, lo=-0.3)], th)[0] == "xfail"
    assert verdict([case(value=-0.25, lo=-0.4)], th)[0] == "FAIL"
    assert verdict([case(est="other", value=-0.05, lo=-0.3)], th)[0] == "FAIL"


@pytest.mark.parametrize("text,match", [
    ('[[floor]]\nmetric = "spearman"\nmin = 0.5\nknown_failure = "x"\n', "needs known_min"),
    ('[[floor]]\nmetric = "spearman"\nmin = 0.5\nminimum = 1\n', "unknown field.*minimum"),
    ('[[floor]]\nmetric = "spearman"\nmin = 0.5\nstat = "median"\n', "stat must be one of"),
    ('[[floor]]\nmetric = "spearman"\n', "missing 'min'"),
    ('[[xfail]]\nestimator = "e"\nreason = "r"\n', r"\[\[xfail\]\] is gone"),
    ('[[floor]\n', "not valid TOML"),
    ('[test_points]\nmin_defined = 0\n', "min_defined must be an integer >= 1"),
    ('[test_points]\nmin_fraction = 1.5\n', r"min_fraction must be a number in \[0, 1\]"),
    ('[test_points]\nmin_points = 3\n', "unknown field.*min_points"),
    ('test_points = 3\n', r"\[test_points\] must be a table"),
])
def test_bad_thresholds_files_say_what_is_wrong(tmp_path, text, match):
    with pytest.raises(ThresholdsError, match=match):
        load(tmp_path, text)


def test_measured_floors_protect_each_case_at_its_measurement(tmp_path):
    general = load(tmp_path, "")
    run = [case("a", value=0.8, lo=0.7), case("a", proto="loo-topk", value=0.6, lo=0.5),
           case("b", value=0.1, lo=-0.1), case("not-builtin", value=0.9, lo=0.8)]
    floors = measured.measured_floors(run, {"a", "b"}, general, margin=0.1)
    plain = {(f.estimator, f.protocol): f.min for f in floors if not f.known_failure}
    assert plain == {("a", "loo-fixed"): 0.7, ("a", "loo-topk"): 0.5, ("b", "loo-fixed"): 0.0}
    kf = [f for f in floors if f.known_failure]
    assert len(kf) == 1 and kf[0].estimator == "b" and kf[0].stat == "ci_low" and kf[0].known_min == 0.0
    th = load(tmp_path, "", measured.to_toml(floors, "run.json", 0.1))
    v, failures = judge(run[:3], th)
    assert failures == [] and sorted(v.values()) == ["pass", "pass", "xfail"]
    v, failures = judge([case("a", value=0.65, lo=0.5)], th)  # a drop beyond the margin
    assert set(v.values()) == {"FAIL"} and "m.toml floor #1" in failures[0]


def test_the_packaged_tables_load():
    th = Thresholds.load()
    assert th.chance.stat == "ci_low" and th.chance.min == 0.0
    assert any(f.claim == "second-order" for f in th.floors)
    assert all(f.known_min is not None for f in th.floors if f.known_failure)


def test_a_missing_thresholds_file_is_an_error_not_no_floors(tmp_path):
    (tmp_path / "t.toml").write_text("")
    with pytest.raises(ThresholdsError, match="no such thresholds file"):
        Thresholds.load(tmp_path / "t.toml", measured=tmp_path / "missing.toml")


def test_a_known_failure_does_not_cover_a_stricter_measured_floor(tmp_path):
    th = load(tmp_path, '[[floor]]\nestimator = "e"\nmetric = "spearman"\nmin = 0.95\nknown_failure = "k"\n'
                        'known_min = 0.57\n',
              '[[floor]]\nestimator = "e"\nmetric = "spearman"\nmin = 0.8\nmeasured = 0.9\n')
    assert verdict([case(value=0.85, lo=0.8)], th)[0] == "xfail"
    v, failures = verdict([case(value=0.6, lo=0.5)], th)  # above known_min, below its measured floor
    assert v == "FAIL" and "m.toml" in failures[0]


def test_a_known_failure_at_the_edge_of_its_floor_is_not_yet_fixed(tmp_path):
    th = load(tmp_path, '[[floor]]\nestimator = "e"\nmetric = "spearman"\nstat = "ci_low"\nmin = 0\n'
                        'known_failure = "at chance"\nknown_min = -0.2\n')
    assert verdict([case(value=0.1, lo=0.01)], th)[0] == "xfail"  # within FIXED_MARGIN: rounding, not a fix
    assert verdict([case(value=0.2, lo=0.05)], th)[0] == "FAIL"


def test_a_verdict_needs_enough_defined_test_points(tmp_path):
    """Fewer than [test_points] min_defined (3) defined test points, or fewer than min_fraction (half)
    of those evaluated: FAIL, saying so, whatever the floors (or a known failure) say."""
    th = load(tmp_path, "")
    assert (th.test_points.min_defined, th.test_points.min_fraction) == (3, 0.5)  # a file without the table
    packaged = Thresholds.load().test_points
    assert (packaged.min_defined, packaged.min_fraction) == (3, 0.5)

    def thin(n, undefined, **kw):
        return replace(case(value=0.9, lo=0.85, hi=0.95, **kw), n_test=n, n_undefined=undefined)

    assert verdict([thin(5, 5)], th)[0] == "pass"  # half of ten: enough
    v, failures = verdict([thin(4, 6)], th)
    assert v == "FAIL" and failures == [(
        "e on iris-logreg-wd1e-3 (loo-fixed): spearman judged on 4 of 10 test points (6 undefined) < 5 required "
        "(at least 3 and 50% of those evaluated: thresholds.toml [test_points]): too few to judge")]
    assert verdict([thin(3, 0)], th)[0] == "pass" and verdict([thin(2, 0)], th)[0] == "FAIL"  # at least 3
    # the floor's metric is what counts: a thin pearson does not fail a case whose floors are all spearman
    assert verdict([thin(10, 0), thin(1, 9, metric="pearson")], th)[0] == "pass"
    th = load(tmp_path, '[[floor]]\nmetric = "pearson"\nmin = 0.5\n')
    v, failures = verdict([thin(10, 0), thin(1, 9, metric="pearson")], th)
    assert v == "FAIL" and len(failures) == 1 and "pearson judged on 1 of 10" in failures[0]
    # a known failure does not make a verdict on too few points an xfail
    th = load(tmp_path, '[[floor]]\nestimator = "e"\nmetric = "spearman"\nstat = "ci_low"\nmin = 0\n'
                        'known_failure = "at chance"\nknown_min = -0.2\n')
    assert verdict([replace(case(value=-0.05, lo=-0.3), n_test=10)], th)[0] == "xfail"
    assert verdict([replace(case(value=-0.05, lo=-0.3), n_test=2, n_undefined=8)], th)[0] == "FAIL"
    # configurable
    th = load(tmp_path, "[test_points]\nmin_defined = 1\nmin_fraction = 0.0\n")
    assert verdict([thin(1, 9)], th)[0] == "pass"


def test_no_committed_verdict_rests_on_too_few_test_points():
    """Every ok case of the committed baseline is defined at enough test points (all 10 of 10 when
    [test_points] was introduced), so the rule changes none of its verdicts."""
    from influence_bench.reporting.schema import load_run

    baseline = Path(__file__).parents[1] / "results" / "baseline.json"
    tp = Thresholds.load().test_points
    ok = [c for c in load_run(baseline).cases if c.status == "ok"]
    assert ok and [c for c in ok if tp.shortfall(c)] == []
