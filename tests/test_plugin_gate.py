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
