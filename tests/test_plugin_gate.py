"""The pytest options --baseline/--gate: a session whose run regresses against the baseline fails."""

import json
import os
import subprocess
import sys
from pathlib import Path

from influence_bench.reporting.runfiles import write_run
from influence_bench.reporting.schema import Case

SUITE = '''
from influence_bench.reporting.schema import Case

def test_case(influence_bench):
    influence_bench.scoring.cases.append(Case(estimator="est", setting="iris-a", setting_version=1, spec_hash="h",
                                      protocol="loo-fixed", mode="warm", metric="spearman",
                                      value={value}, ci_low={value} - 0.02, ci_high={value} + 0.02, n_test=10))
'''


def _pytest(tmp_path: Path, value: float, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_suite.py").write_text(SUITE.format(value=value))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "test_suite.py", "-p", "no:cacheprovider",
                           "--results-dir", str(tmp_path / "results"), *args],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)


def _baseline(tmp_path: Path, value: float) -> str:
    case = Case("est", "iris-a", 1, "h", "loo-fixed", "warm", "spearman", value=value, ci_low=value - 0.02,
                ci_high=value + 0.02, n_test=10)
    return str(write_run(tmp_path / "baseline.json", [case]))


def test_regression_fails_the_session_with_a_gate_section(tmp_path):
    base = _baseline(tmp_path, 0.80)
    res = _pytest(tmp_path, 0.60, "--baseline", base, "--gate", "spearman:-0.05")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "influence-bench regression gate" in res.stdout
    assert "REGRESSIONS: 1" in res.stdout and "GATE FAILED: 1 regression(s)" in res.stdout
    assert "1 passed" in res.stdout  # the tests themselves passed; the gate failed the session


def test_unchanged_run_passes_the_gate_and_bad_options_are_usage_errors(tmp_path):
    base = _baseline(tmp_path, 0.80)
    res = _pytest(tmp_path, 0.79, "--baseline", base)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "gate passed" in res.stdout
    run = sorted((tmp_path / "results" / "runs").glob("run-*.json"))[-1]
    assert json.loads(run.read_text())["cases"][0]["value"] == 0.79
    res = _pytest(tmp_path, 0.79, "--baseline", base, "--gate", "spearman:+0.05")
    assert res.returncode == 4 and "tolerates a drop" in res.stderr
    res = _pytest(tmp_path, 0.79, "--baseline", str(tmp_path / "nope.json"))
    assert res.returncode == 4 and "influence-bench baseline update" in res.stderr


FIDELITY_SUITE = '''
import os

from influence_bench.reporting.schema import Case


def test_fidelity(fidelity_case, influence_bench):
    fc = fidelity_case
    what = os.environ.get("IB_" + fc.setting.id.replace("-", "_"), "ok")  # ok | skipped | missing
    if what == "missing":  # selected, but the session records no case for it
        return
    influence_bench.scoring.cases.append(Case(
        estimator=fc.estimator, setting=fc.setting.id, setting_version=fc.setting.version,
        spec_hash=fc.setting.spec_hash, protocol="loo-fixed", mode=fc.setting.ground_truth.mode, metric="spearman",
        status=what, value=0.9 if what == "ok" else None, n_test=10,
        message="" if what == "ok" else f"{fc.id}: pretend it is unsupported\\ntrace"))
'''


def _fidelity(tmp_path: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_fid.py").write_text(FIDELITY_SUITE)
    full = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                                os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "test_fid.py", "-q", "-p", "no:cacheprovider",
                           "--estimator", "exact", "-k", "iris-mlp-d1 or iris-mlp-d2-w16",
                           "--results-dir", str(tmp_path / "results"), *args],
                          cwd=tmp_path, capture_output=True, text=True, env=full, timeout=300)


def test_gate_fails_a_baseline_case_skipped_or_missing_now_and_passes_a_slice(tmp_path):
    first = _fidelity(tmp_path, {})
    assert first.returncode == 0, first.stdout + first.stderr
    (run,) = (tmp_path / "results" / "runs").glob("run-*.json")
    doc = json.loads(run.read_text())
    assert {(e["estimator"], e["setting"]) for e in doc["selected"]} == {
        ("exact", "iris-mlp-d1-w16-wd1e-3"), ("exact", "iris-mlp-d2-w16-wd1e-3")}
    base = str(run)
    skipped = _fidelity(tmp_path, {"IB_iris_mlp_d2_w16_wd1e_3": "skipped"}, "--baseline", base)
    assert skipped.returncode == 1, skipped.stdout + skipped.stderr
    assert "REGRESSIONS: 1" in skipped.stdout and "GATE FAILED: 1 regression(s)" in skipped.stdout
    assert ("exact / iris-mlp-d2-w16-wd1e-3 / loo-fixed / warm / spearman: did not run: skipped now (baseline 0.9): "
            "exact-iris-mlp-d2-w16-wd1e-3: pretend it is unsupported") in skipped.stdout
    missing = _fidelity(tmp_path, {"IB_iris_mlp_d2_w16_wd1e_3": "missing"}, "--baseline", base)
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert "iris-mlp-d2-w16-wd1e-3 / loo-fixed / warm / spearman: selected but no result (baseline 0.9)" \
        in missing.stdout
    # a -k slice that leaves d2 out: vanished, not a failure
    sliced = _fidelity(tmp_path, {}, "--baseline", base, "-k", "iris-mlp-d1")
    assert sliced.returncode == 0, sliced.stdout + sliced.stderr
    assert "gate passed" in sliced.stdout and "vanished cases (in baseline, not in run): 1" in sliced.stdout


def test_scoring_session_records_its_selection_and_why_a_selected_case_did_not_run(tmp_path):
    from influence_bench.reporting.gates import compare_runs, parse_gate
    from influence_bench.reporting.schema import load_run
    from influence_bench.scoring.session import ScoringSession
    from influence_bench.spec.catalog import get_setting

    iris, mnist = get_setting("iris-logreg-wd1e-3"), get_setting("mnist5k-logreg-wd1e-3")
    session = ScoringSession()
    session.select("exact", iris, ("loo-fixed",))
    session.select("exact", mnist)
    session.not_run("exact", mnist, "data unavailable: no MNIST under $INFLUENCE_BENCH_DATA\nmore")
    session.cases.append(Case("exact", iris.id, iris.version, iris.spec_hash, "loo-fixed", iris.ground_truth.mode,
                              "spearman", value=0.9, n_test=10))
    run = load_run(session.write_run(tmp_path))
    assert run.extra["selected"] == [
        {"estimator": "exact", "setting": iris.id, "mode": "warm", "protocols": ["loo-fixed"]},
        {"estimator": "exact", "setting": mnist.id, "mode": "warm", "protocols": list(mnist.protocol.default),
         "not_run": "data unavailable: no MNIST under $INFLUENCE_BENCH_DATA"}]
    baseline = load_run(write_run(tmp_path / "b.json", run.cases + [
        Case("exact", mnist.id, mnist.version, mnist.spec_hash, "loo-fixed", "warm", "spearman", value=0.8)]))
    res = compare_runs(run, baseline, [parse_gate("spearman:-0.05")])
    assert [f.detail for f in res.regressions] == [
        "selected but no result (baseline 0.8): data unavailable: no MNIST under $INFLUENCE_BENCH_DATA"]


def test_the_gate_under_pytest_xdist_merges_the_workers_into_one_run(tmp_path):
    """``-n 2 --baseline``: the controller merges both workers' cases and selections into one run file
    and gates it as a serial session would: a pass passes; a case skipped now and one selected with no
    result (whichever worker ran them) both fail the session."""
    import pytest

    from influence_bench.spec.catalog import get_setting

    pytest.importorskip("xdist")
    cases = []
    for sid in ("iris-mlp-d1-w16-wd1e-3", "iris-mlp-d2-w16-wd1e-3"):
        s = get_setting(sid)
        cases.append(Case("exact", sid, s.version, s.spec_hash, "loo-fixed", "warm", "spearman", value=0.9, n_test=10))
    base = str(write_run(tmp_path / "base.json", cases))
    ok = _fidelity(tmp_path, {}, "-n", "2", "--baseline", base)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "gate passed (2 within tolerance or noise)" in ok.stdout and "2 passed" in ok.stdout
    (run,) = (tmp_path / "results" / "runs").glob("run-*.*")  # one run file, no worker journals left
    doc = json.loads(run.read_text())
    assert sorted(c["setting"] for c in doc["cases"]) == ["iris-mlp-d1-w16-wd1e-3", "iris-mlp-d2-w16-wd1e-3"]
    assert sorted(e["setting"] for e in doc["selected"]) == ["iris-mlp-d1-w16-wd1e-3", "iris-mlp-d2-w16-wd1e-3"]
    bad = _fidelity(tmp_path, {"IB_iris_mlp_d1_w16_wd1e_3": "skipped", "IB_iris_mlp_d2_w16_wd1e_3": "missing"},
                    "-n", "2", "--baseline", base)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "GATE FAILED: 2 regression(s)" in bad.stdout
    assert "iris-mlp-d1-w16-wd1e-3 / loo-fixed / warm / spearman: did not run: skipped now (baseline 0.9)" in bad.stdout
    assert "iris-mlp-d2-w16-wd1e-3 / loo-fixed / warm / spearman: selected but no result (baseline 0.9)" in bad.stdout


def test_a_worker_part_is_merged_once_per_selection_and_keeps_why_it_did_not_run():
    from influence_bench.scoring.session import ScoringSession
    from influence_bench.spec.catalog import get_setting

    iris, mnist = get_setting("iris-logreg-wd1e-3"), get_setting("mnist5k-logreg-wd1e-3")
    workers = [ScoringSession(), ScoringSession()]
    for w in workers:  # every worker collects every test
        w.select("exact", iris)
        w.select("exact", mnist)
    workers[0].cases.append(Case("exact", iris.id, iris.version, iris.spec_hash, "loo-fixed", "warm", "spearman",
                                 value=0.9, n_test=10))
    workers[1].not_run("exact", mnist, "data unavailable: no MNIST")
    controller = ScoringSession()
    for i, w in enumerate(workers):
        controller.merge(w.export(), f"gw{i}")
    assert [c.setting for c in controller.cases] == [iris.id]
    assert [(e["setting"], e.get("not_run")) for e in controller.selected] == [
        (iris.id, None), (mnist.id, "data unavailable: no MNIST")]
    broken = json.loads(workers[0].export())
    broken["cases"][0]["value"] = "high"
    import pytest

    from influence_bench.reporting.schema import RunFileError

    with pytest.raises(RunFileError, match="gw7"):
        controller.merge(json.dumps(broken), "pytest-xdist worker gw7")
