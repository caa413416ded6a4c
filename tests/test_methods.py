"""Estimators from other libraries beside ours: namespaced names, globs of names, opt-in estimators left
out of the default selection, the method a case records, the report's "by method" section and
``bench methods``' per-method comparison (ours vs the fastest peer)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from influence_bench import Estimator
from influence_bench.api.arguments import create, expand_specs, parse_spec
from influence_bench.api.registry import Registry, RegistryError
from influence_bench.reporting import methods
from influence_bench.reporting.schema import Case, Run
from influence_bench.scoring.method_bench import Timed, default_estimators, per_method


def _registry() -> Registry:
    reg = Registry()
    reg._discovered = True  # only the classes added here

    @dataclass
    class Ours(Estimator):
        name = "cg"
        iterations: int = 50

    @dataclass
    class TheirCG(Estimator):
        name = "peer:cg"
        method = "cg"
        opt_in = True
        maxiter: int = 100

    @dataclass
    class TheirExact(Estimator):
        name = "peer:explicit"
        method = "exact"
        opt_in = True

    @dataclass
    class Alone(Estimator):
        name = "gradient-dot"

    for cls in (Ours, TheirCG, TheirExact, Alone):
        reg.add(cls)
    return reg


def test_opt_in_estimators_run_only_when_named():
    reg = _registry()
    assert reg.names() == ["cg", "gradient-dot", "peer:cg", "peer:explicit"]
    assert reg.default_names() == ["cg", "gradient-dot"]  # what pytest suites / checks / benchmarks run unnamed


def test_a_glob_names_every_match_opt_in_included_in_order_without_duplicates():
    reg = _registry()
    assert expand_specs(["peer:*"], reg) == ["peer:cg", "peer:explicit"]
    assert expand_specs(["*cg", "cg(iterations=5)", "peer:cg"], reg) == ["cg", "peer:cg", "cg(iterations=5)"]
    assert expand_specs(["gradient-dot"], reg) == ["gradient-dot"]  # not a glob: unchanged, not looked up


def test_a_glob_matching_nothing_or_taking_arguments_is_a_clear_error():
    reg = _registry()
    with pytest.raises(RegistryError, match=r"no estimator matches 'dattri:\*'.*plugins/peers"):
        expand_specs(["dattri:*"], reg)
    with pytest.raises(RegistryError, match="a glob cannot take hyperparameters"):
        expand_specs(["peer:*(maxiter=3)"], reg)


def test_a_namespaced_name_takes_hyperparameters():
    assert parse_spec("peer:cg(maxiter=3)") == ("peer:cg", {"maxiter": 3})
    est = create("peer:cg(maxiter=3)", _registry())
    assert est.name == "peer:cg" and est.maxiter == 3


def test_bench_methods_defaults_to_the_methods_a_peer_implements():
    assert default_estimators(_registry()) == ["cg", "peer:cg"]  # exact has no built-in here, gradient-dot no peer


def _case(est, method, value, time_s, status="ok", setting="s1", protocol="loo-fixed") -> Case:
    return Case(estimator=est, setting=setting, setting_version=1, spec_hash="h", protocol=protocol, mode="m",
                metric="spearman", status=status, value=value if status == "ok" else None, ci_low=value and value - .1,
                ci_high=value and value + .1, n_test=10, wall_time_s=time_s, peak_memory_mb=100.0, method=method,
                message="" if status == "ok" else "peer 0.1 failed in X.attribute: RuntimeError: dtype mismatch")


def test_method_rows_put_the_implementations_of_one_method_side_by_side_fastest_first():
    cases = [_case("cg", "cg", 0.9, 2.0), _case("peer:cg", "cg", 0.8, 1.0), _case("peer:lissa", "lissa", 0.5, 1.0),
             _case("other:cg", "cg", None, None, status="error"),
             _case("gradient-dot", "", 0.3, 0.1)]  # an older run file: the method is the name
    rows = methods.method_rows(cases)
    assert [r["estimator"] for r in rows] == ["peer:cg", "cg", "other:cg"]  # lissa and gradient-dot: one each
    assert [r["library"] for r in rows] == ["peer", "influence-bench", "other"]
    assert rows[2]["spearman"] is None and "dtype mismatch" in rows[2]["message"]
    md = "\n".join(methods.markdown(cases))
    assert "| cg | s1 | loo-fixed | peer:cg | peer |" in md and "error: peer 0.1 failed" in md
    assert "No method has more than one" in "\n".join(methods.markdown(cases[2:3]))
    assert methods.method_of(cases[-1]) == "gradient-dot"


def test_the_report_pages_carry_the_by_method_section(tmp_path):
    from influence_bench.reporting.html import write_html
    from influence_bench.reporting.report import write_report

    cases = [_case("cg", "cg", 0.9, 2.0), _case("peer:cg", "cg", 0.8, 1.0)]
    run = Run(None, 3, "2026-01-01T00:00:00", "smoke", {}, {}, cases)
    md = write_report([run], tmp_path / "md").read_text()
    assert "## By method" in md and "| cg | s1 | loo-fixed | peer:cg | peer |" in md
    html = write_html([run], tmp_path / "html").read_text()
    assert '<table id="methods">' in html and "peer:cg" in html.split('<table id="methods">')[1]


def _timed(est, method, time_s, spearman=0.9, status="ok", setting="s1") -> Timed:
    return Timed(setting, est, method, status, spearman if status == "ok" else None,
                 [time_s, time_s * 1.5] if status == "ok" else [])


def test_per_method_compares_ours_with_the_fastest_peer_that_ran():
    rows = per_method([_timed("cg", "cg", 2.0), _timed("a:cg", "cg", 4.0), _timed("b:cg", "cg", 1.0, 0.7),
                       _timed("c:cg", "cg", 0, status="error"), _timed("exact", "exact", 1.0),
                       _timed("lissa", "lissa", 1.0, status="error"), _timed("a:lissa", "lissa", 3.0)])
    by = {r["method"]: r for r in rows}
    assert set(by) == {"cg", "lissa"}  # exact has no peer here
    cg = by["cg"]
    assert (cg["peer"], cg["peer_time_s"], cg["peer_spearman"]) == ("b:cg", 1.0, 0.7)
    assert math.isclose(cg["ratio"], 2.0) and cg["failed_peers"] == ["c:cg"]
    assert by["lissa"]["ours_status"] == "error" and by["lissa"]["ratio"] is None  # ours failed: no ratio


def test_a_case_records_the_method_of_its_estimator():
    from influence_bench.api.loading import get_context
    from influence_bench.scoring.runner import evaluate_context
    from influence_bench.spec import catalog

    ctx = get_context(catalog.get_setting("iris-logreg-wd1e-3"))

    @dataclass
    class Renamed(Estimator):
        name = "x:dot"
        method = "gradient-dot"

        def influence(self, ctx):
            return ctx.test_grads() @ ctx.train_grads().T / ctx.n_train

    cases = evaluate_context(Renamed(), ctx, protocols=("loo-fixed",))
    assert {c.method for c in cases} == {"gradient-dot"} and {c.estimator for c in cases} == {"x:dot"}
    assert {c.method for c in evaluate_context("exact", ctx, protocols=("loo-fixed",))} == {"exact"}
