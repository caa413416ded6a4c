"""Which cases run is a function of the code, the setting and the device class: the smoke census
(which budgeted estimator each setting admits or refuses) is identical with both cores saturated
by busy loops and on an idle machine, and it agrees with the baseline's record of what ran."""

import dataclasses
import json
import subprocess
import sys
from unittest import mock

import pytest

from influence_bench import paths
from influence_bench.api.context import Context
from influence_bench.api.estimator import EstimatorUnsupported
from influence_bench.api.loading import get_context
from influence_bench.api.registry import REGISTRY, builtin_estimators
from influence_bench.spec import catalog


class _Admitted(Exception):
    pass


def _budgeted() -> list[str]:
    return [n for n in builtin_estimators() if "max_seconds" in REGISTRY.create(n).hyperparameters()]


def decision(name: str, ctx: Context) -> str:
    """'runs' or 'refused: ...' for estimator ``name``, stopping right after its budget check."""
    real = Context.check_hvp_budget

    def check(self, *a, **k):
        real(self, *a, **k)
        raise _Admitted

    with mock.patch.object(Context, "check_hvp_budget", check):
        try:
            REGISTRY.create(name).influence(ctx)
        except _Admitted:
            return "runs"
        except EstimatorUnsupported as exc:
            return f"refused: {str(exc).splitlines()[0]}"
    return "runs (no budget check)"


def census(contexts: dict) -> dict:
    out = {}
    for sid, ctx in contexts.items():
        fresh = dataclasses.replace(ctx, _cache={})  # nothing counted or modelled yet:
        fresh.hvp_seconds()  # the cost model runs under whatever load there is now
        out.update({(n, sid): decision(n, fresh) for n in _budgeted()})
    return out


@pytest.fixture(scope="module")
def contexts():
    return {s.id: get_context(s) for s in catalog.select(tier="smoke")}


def test_smoke_census_is_the_same_under_load_and_idle(contexts):
    idle = census(contexts)
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        loaded = census(contexts)
    finally:
        for p in spin:
            p.kill()
            p.wait()
    assert loaded == idle
    decisions = {v.split(":")[0] for v in idle.values()}
    assert decisions == {"runs", "refused"}, decisions  # the census discriminates (CNNs refuse exact on CPU)


def test_census_agrees_with_what_the_baseline_ran(contexts):
    path = paths.repo_root() / "results" / "baseline.json"
    if not path.is_file():
        pytest.skip("no results/baseline.json in this checkout")
    ran = {}
    for c in json.loads(path.read_text())["cases"]:
        ran.setdefault((c["estimator"], c["setting"]), c["status"])
    now = census(contexts)
    differ = {k: (ran[k], v) for k, v in now.items() if k in ran and (ran[k] == "skipped") != v.startswith("refused")}
    assert not differ, f"baseline status vs census now: {differ}"
