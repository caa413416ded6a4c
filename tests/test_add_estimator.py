"""The README's "Add your estimator" walkthrough, executed as written: the estimator file copied
out of README.md, README.md's `influence-bench score` command (with its opt-in for ./estimators) from
the folder holding it, and registration of a separately pip-installed package through the entry-point
group."""

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]


def _readme_estimator_file() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(# estimators/my_estimator\.py\n.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "README.md must hold exactly one `# estimators/my_estimator.py` block"
    return blocks[0]


def _readme_score_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("influence-bench score my-estimator ")]
    assert len(lines) == 1, "README.md must show exactly one `influence-bench score my-estimator ...` command"
    return shlex.split(lines[0])[1:]


def _cli(*args: str, cwd: Path, extra_path: str = "") -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (extra_path, str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if k != "INFLUENCE_BENCH_TRUST_CWD"}
    env = {**env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "influence_bench.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_readme_walkthrough_scores_the_new_estimator_next_to_the_builtins(tmp_path):
    (tmp_path / "estimators").mkdir()
    (tmp_path / "estimators" / "my_estimator.py").write_text(_readme_estimator_file())
    untrusted = _cli("list", "estimators", cwd=tmp_path)  # ./estimators runs only on an opt-in
    assert untrusted.returncode == 0 and "my-estimator" not in untrusted.stdout, untrusted.stdout
    assert "--trust-cwd-estimators" in untrusted.stderr, untrusted.stderr
    listed = _cli("list", "estimators", "--trust-cwd-estimators", cwd=tmp_path)
    assert listed.returncode == 0 and "my-estimator" in listed.stdout, listed.stdout + listed.stderr

    res = _cli(*_readme_score_command(), "--results-dir", str(tmp_path / "results"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [line.split() for line in res.stdout.splitlines()]
    mine = [r for r in rows if r[1:3] in (["my-estimator", "loo-fixed"], ["my-estimator", "loo-topk"])]
    assert len(mine) == 2 and all(r[0] == "pass" for r in mine), res.stdout
    # ranked among the built-ins, whose values come from the committed baseline for the same setting
    text = " ".join(res.stdout.split())
    assert "my-estimator ranks loo-fixed" in text and " of 14 (best other: " in text, res.stdout
    assert "in the baseline" in text and not any(r[1:2] == ["exact"] for r in rows), res.stdout
    assert list((tmp_path / "results" / "runs").glob("run-*.json"))
    # --show-baseline: the built-ins' rows too, marked as not recomputed
    res = _cli(*_readme_score_command(), "--show-baseline", "--results-dir", str(tmp_path / "results"), cwd=tmp_path)
    rows = [line.split() for line in res.stdout.splitlines()]
    assert any(r[1:3] == ["exact", "\u2020"] for r in rows) and "\u2020 from the baseline" in res.stdout, res.stdout


def test_estimator_from_a_pip_installed_package_is_listed(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "ib_example_plugin").mkdir(parents=True)
    (pkg / "ib_example_plugin" / "__init__.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from influence_bench import Estimator


        @dataclass
        class ScaledGradientDot(Estimator):
            name = "example-entry-point"
            tags = frozenset({"gradient-only"})

            def influence(self, ctx):
                return ctx.test_grads() @ ctx.train_grads().T / ctx.n_train
    '''))
    (pkg / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "ib-example-plugin"
        version = "0.0.1"

        [project.entry-points."influence_bench.estimators"]
        example-entry-point = "ib_example_plugin:ScaledGradientDot"
    '''))
    site = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), str(pkg)], capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    res = _cli("list", "estimators", cwd=tmp_path, extra_path=str(site))
    assert res.returncode == 0 and "example-entry-point" in res.stdout, res.stdout + res.stderr
    without = _cli("list", "estimators", cwd=tmp_path)  # not installed: not listed
    assert "example-entry-point" not in without.stdout


BROKEN = """
from dataclasses import dataclass
from influence_bench import Estimator, register

@register
@dataclass
class Transposed(Estimator):
    \"\"\"Returns [n_train, n_test]: the wrong way round. Hyperparameters: none.\"\"\"

    name = "transposed"

    def influence(self, ctx):
        return ctx.train_grads() @ ctx.test_grads().T
"""


def _checks(plugins: Path, estimator: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "INFLUENCE_BENCH_ESTIMATORS": str(plugins), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "suites/test_estimator_checks.py", "--estimator", estimator,
                           "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def test_generated_checks_run_on_a_new_plugin_and_catch_a_broken_one(tmp_path):
    (tmp_path / "my_estimator.py").write_text(_readme_estimator_file())
    (tmp_path / "transposed.py").write_text(BROKEN)
    good = _checks(tmp_path, "my-estimator")
    assert good.returncode == 0 and "4 passed" in good.stdout, good.stdout[-3000:]
    bad = _checks(tmp_path, "transposed")
    assert bad.returncode == 1, bad.stdout[-3000:]
    assert "FAILED suites/test_estimator_checks.py::test_estimator_check[check-output-transposed]" in bad.stdout
    assert "returned shape" in bad.stdout
