"""End to end: a deliberately noised estimator (a temp plug-in) fails the pytest gate against the
baseline of its clean runs; re-running the unchanged estimator passes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from influence_bench.cli.main import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
PLUGIN = '''
import os
from dataclasses import dataclass

import torch

from influence_bench import Estimator, register
from influence_bench import REGISTRY


@register
@dataclass
class NoisedExact(Estimator):
    """`exact` plus seeded Gaussian noise of IB_TEST_NOISE times the matrix's std (test only)."""

    name = "noised-exact"

    def influence(self, ctx):
        clean = REGISTRY.create("exact").influence(ctx)
        noise = float(os.environ.get("IB_TEST_NOISE", "0"))
        g = torch.Generator().manual_seed(0)
        return clean + noise * clean.std() * torch.randn(clean.shape, generator=g, dtype=clean.dtype)
'''


def _suite(tmp_path: Path, noise: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "INFLUENCE_BENCH_ESTIMATORS": str(tmp_path / "plugins"), "IB_TEST_NOISE": noise, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "suites/test_fidelity.py", "-q", "-p", "no:cacheprovider",
                           "--estimator", "noised-exact", "-k", "iris-logreg", "--rootdir", str(ROOT),
                           "--results-dir", str(tmp_path / "results"), *args],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_noised_estimator_fails_the_gate_unchanged_reruns_pass(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "noised_exact.py").write_text(PLUGIN)
    first = _suite(tmp_path, "0")
    assert first.returncode == 0, first.stdout + first.stderr
    (run,) = (tmp_path / "results" / "runs").glob("run-*.json")
    baseline = tmp_path / "baseline.json"
    assert main(["baseline", "update", str(run), "--out", str(baseline)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert baseline.stat().st_mode & 0o777 == 0o666 & ~umask  # a new file's usual mode, not a temp file's 0600
    gate = ["--baseline", str(baseline), "--gate", "spearman:-0.05", "--gate", "pearson:-0.05"]
    for _ in range(2):
        again = _suite(tmp_path, "0", *gate)
        assert again.returncode == 0 and "gate passed" in again.stdout, again.stdout + again.stderr
    # 5% of the matrix's std: Spearman 0.998 -> 0.376 [0.127, 0.625], still distinguishable from
    # chance (noise of 0.3 std is not: 0.161 [-0.055, 0.377] fails the chance floor by itself)
    noised = _suite(tmp_path, "0.05", *gate)
    assert noised.returncode == 1, noised.stdout + noised.stderr
    assert "1 passed" in noised.stdout  # still better than chance: only the gate catches the drop
    assert "REGRESSIONS: 4" in noised.stdout  # spearman and pearson x loo-fixed and loo-topk
    assert "noised-exact / iris-logreg-wd1e-3 / loo-fixed / warm / spearman" in noised.stdout


def test_a_gated_session_in_which_no_case_ran_fails(tmp_path):
    """`-k` that selects nothing (or data missing everywhere) with --baseline: nothing was compared,
    so the session fails instead of passing a gate that checked nothing."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "pytest", "suites/test_fidelity.py", "-q", "-p", "no:cacheprovider",
                          "-k", "no-such-setting", "--rootdir", str(ROOT), "--results-dir", str(tmp_path),
                          "--baseline", str(ROOT / "results" / "baseline.json")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "GATE FAILED: no fidelity case produced a result" in out.stdout
