"""Benchmark plumbing: pytest-benchmark options work on the suites, and the JSON carries peak memory
and torch/device machine info."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # a user's own session, also when this test runs in a pytest-xdist worker: pytest-benchmark takes
    # an inherited PYTEST_XDIST_WORKER for xdist and disables benchmarks
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider", "-q",
                           "--results-dir", str(cwd / "results"), "--rootdir", str(ROOT)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_benchmark_json_has_memory_and_machine_info(tmp_path):
    out = tmp_path / "bench.json"
    res = _pytest("suites/test_benchmarks.py", "-k", "bench-gradient-dot-iris-logreg", "--estimator",
                  "gradient-dot", f"--benchmark-json={out}", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(out.read_text())
    assert {"torch", "cuda", "device_name", "cpu_count"} <= set(doc["machine_info"]["influence_bench"])
    (bench,) = doc["benchmarks"]
    info = bench["extra_info"]
    assert info["estimator"] == "gradient-dot" and info["setting"] == "iris-logreg-wd1e-3"
    assert info["device"] == "cpu" and info["memory_kind"].startswith("rss") and info["peak_memory_mb"] > 10
    assert 0 <= info["extra_memory_mb"] <= info["peak_memory_mb"]
    assert bench["stats"]["rounds"] == 3 and bench["stats"]["min"] > 0


def test_benchmark_only_and_skip_select_as_pytest_benchmark_users_expect(tmp_path):
    sel = ["-k", "gradient-dot and iris-logreg", "--estimator", "gradient-dot"]
    res = _pytest("suites/test_benchmarks.py", *sel, "--benchmark-skip", cwd=tmp_path)
    assert res.returncode == 0 and "1 skipped" in res.stdout and "passed" not in res.stdout, res.stdout + res.stderr
    res = _pytest("suites/test_benchmarks.py", "suites/test_fidelity.py", *sel, "--benchmark-only", cwd=tmp_path)
    assert res.returncode == 0 and "1 passed, 1 skipped" in res.stdout, res.stdout + res.stderr
