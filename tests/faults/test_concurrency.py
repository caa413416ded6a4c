"""Concurrency: two runs one after the other give bitwise the same cases on CPU, and two `score`
processes started together on one empty cache and one results folder (both training the same theta*
and building the same ground truth) both finish with those same cases and a cache that loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from faults.support import ResultsLost, SilentWrong
from influence_bench.reporting.schema import load_run

SETTING = "iris-logreg-wd1e-3"


def _values(cases) -> dict:
    return {(c.estimator, c.setting, c.protocol, c.metric): (c.status, c.value, tuple(c.per_test)) for c in cases}


def _fresh_run(cache, monkeypatch):
    from influence_bench.api.loading import forget_contexts
    from influence_bench.scoring.runner import evaluate
    from influence_bench.spec import catalog

    monkeypatch.setenv("INFLUENCE_BENCH_CACHE", str(cache))
    monkeypatch.setenv("INFLUENCE_BENCH_SHIPPED_GT", "")
    forget_contexts()
    try:
        return _values(evaluate("exact", catalog.get_setting(SETTING)))
    finally:
        forget_contexts()


@pytest.mark.fault("concurrency", "handled")
def test_two_serial_runs_from_empty_caches_are_bitwise_identical(tmp_path, monkeypatch):
    a = _fresh_run(tmp_path / "a", monkeypatch)
    b = _fresh_run(tmp_path / "b", monkeypatch)
    if a != b:
        diff = [k for k in a if a[k] != b.get(k)]
        raise SilentWrong(f"two runs of the same checkout differ on CPU: {diff}")


@pytest.mark.fault("concurrency", "handled")
def test_two_concurrent_scorers_on_one_empty_cache_agree(tmp_path, monkeypatch):
    reference = _fresh_run(tmp_path / "ref", monkeypatch)
    env = {**{k: v for k, v in os.environ.items()}, "INFLUENCE_BENCH_CACHE": str(tmp_path / "shared"),
           "INFLUENCE_BENCH_SHIPPED_GT": ""}
    args = [sys.executable, "-m", "influence_bench.cli", "score", "exact", "--settings", SETTING, "--results-dir",
            str(tmp_path / "results"), "--no-baseline"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
    runs = sorted((tmp_path / "results" / "runs").glob("run-*.json"))
    if len(runs) != 2:
        raise ResultsLost(f"two concurrent runs left {len(runs)} run file(s) in one folder")
    for r in runs:
        if _values(load_run(r).cases) != reference:
            raise SilentWrong(f"{r.name}: a run made beside another differs from a run made alone")
    assert not list((tmp_path / "results" / "runs").glob("*.jsonl"))
    # and the cache they wrote together serves a third run the same numbers
    assert _fresh_run(tmp_path / "shared", monkeypatch) == reference


@pytest.mark.fault("concurrency", "handled")
def test_pytest_n_2_gives_the_serial_verdicts_and_cases(tmp_path):
    """The same fidelity slice under pytest-xdist (two workers, whose cases the controller merges into
    one run file) and serially: the same verdict for every test and bitwise the same cases."""
    pytest.importorskip("xdist")
    root = Path(__file__).resolve().parents[2]
    k = "exact-iris-logreg-wd1e-3 or tracin-iris-logreg-wd1e-3"  # one test per worker

    def session(name: str, *extra: str) -> tuple[dict, dict]:
        res = subprocess.run([sys.executable, "-m", "pytest", "suites/test_fidelity.py", "-k", k, "-q", "-rA",
                              "-p", "no:cacheprovider", "--results-dir", str(tmp_path / name), *extra],
                             cwd=root, capture_output=True, text=True, timeout=600,
                             env={k_: v for k_, v in os.environ.items() if k_ != "INFLUENCE_BENCH_SHIPPED_GT"})
        verdicts = {}
        for line in res.stdout.splitlines():
            word, _, rest = line.partition(" ")
            if word in ("PASSED", "FAILED", "SKIPPED", "XFAIL", "XPASS", "ERROR") and "::" in rest:
                verdicts[rest.split(" ")[0]] = word
        cases: dict = {}
        for run in (tmp_path / name / "runs").glob("run-*.json"):
            cases.update(_values(load_run(run).cases))
        return verdicts, cases

    serial = session("serial")
    parallel = session("xdist", "-n", "2")
    assert len(serial[0]) == 2, serial[0]
    if parallel[0] != serial[0]:
        raise SilentWrong(f"pytest -n 2 verdicts {parallel[0]} differ from serial {serial[0]}")
    if parallel[1] != serial[1]:
        diff = sorted(set(parallel[1]) ^ set(serial[1])) or [k for k in serial[1] if serial[1][k] != parallel[1][k]]
        raise SilentWrong(f"pytest -n 2 cases differ from the serial run's: {diff[:6]}")
