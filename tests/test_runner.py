"""Bad input: broken estimators become clear error/skip cases and never corrupt stored state."""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from influence_bench import Estimator
from influence_bench.api.registry import REGISTRY
from influence_bench.groundtruth import GroundTruthStore
from influence_bench.paths import atomic_path, write_json
from influence_bench.reporting.runfiles import SCHEMA_VERSION, read_run, write_run
from influence_bench.scoring.runner import evaluate
from influence_bench.spec import catalog

IRIS = catalog.get_setting("iris-logreg-wd1e-3")


def _make(name, fn):
    @dataclass
    class E(Estimator):
        def influence(self, ctx):
            return fn(ctx)

    E.name = name
    return E()


BROKEN = {
    "wrong-shape": (lambda ctx: torch.zeros(ctx.n_test, ctx.n_train + 1, dtype=torch.float64),
                    r"returned shape \(10, 121\), expected \[n_test, n_train\] = \(10, 120\)"),
    "nan": (lambda ctx: torch.full((ctx.n_test, ctx.n_train), float("nan"), dtype=torch.float64),
            r"returned 1200 non-finite values \(NaN/Inf\)"),
    "int-dtype": (lambda ctx: torch.zeros(ctx.n_test, ctx.n_train, dtype=torch.long),
                  r"returned dtype torch.int64, expected a floating-point tensor"),
    "numpy": (lambda ctx: np.zeros((ctx.n_test, ctx.n_train)),
              r"returned ndarray, expected a torch.Tensor"),
    "raises": (lambda ctx: 1 / 0, r"raised ZeroDivisionError: division by zero"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_estimator_is_an_error_case_naming_estimator_and_setting(kind, tmp_path):
    fn, pattern = BROKEN[kind]
    store = GroundTruthStore(tmp_path)
    cases = evaluate(_make(f"broken-{kind}", fn), IRIS, store=store)
    assert {c.status for c in cases} == {"error"}
    assert {(c.protocol, c.metric) for c in cases} == {(p, m) for p in ("loo-fixed", "loo-topk")
                                                       for m in ("spearman", "pearson", "topk-overlap")}
    msg = cases[0].message
    assert f"'broken-{kind}'" in msg and "'iris-logreg-wd1e-3'" in msg
    assert __import__("re").search(pattern, msg), msg
    assert not any(tmp_path.rglob("*.npz"))  # no ground truth was touched


def test_other_estimators_still_run_after_a_failure(tmp_path):
    store = GroundTruthStore(tmp_path)
    evaluate(_make("broken-x", lambda ctx: 1 / 0), IRIS, store=store)
    cases = evaluate("exact", IRIS, store=store)
    assert all(c.status == "ok" for c in cases)


def test_unsupported_is_a_skipped_case_with_alternatives(tmp_path):
    cases = evaluate(REGISTRY.create("exact", max_params=10), IRIS, store=GroundTruthStore(tmp_path))
    assert {c.status for c in cases} == {"skipped"}
    assert "15 parameters exceed max_params=10" in cases[0].message and "`cg` or `lissa`" in cases[0].message


def test_exact_on_iris_logreg_cases_carry_everything(tmp_path):
    cases = evaluate("exact", IRIS, store=GroundTruthStore(tmp_path))
    sp = next(c for c in cases if c.protocol == "loo-fixed" and c.metric == "spearman")
    assert sp.value >= 0.95 and sp.ci_low <= sp.value <= sp.ci_high
    assert sp.n_test == len(sp.per_test) == 10 and sp.noise_ceiling == 1.0 and sp.noise_reliability == 1.0
    top = next(c for c in cases if c.protocol == "loo-fixed" and c.metric == "topk-overlap")
    assert top.status == "ok" and top.n_test == 10 and all(v in {k / 10 for k in range(11)} for v in top.per_test)
    assert top.value >= 0.7  # exact influence on a convex setting finds most of the 10 most helpful points
    assert sp.setting_version == IRIS.version and sp.spec_hash == IRIS.spec_hash
    assert sp.wall_time_s >= 0 and sp.hyperparameters == {"damping": 0.0, "max_params": 12000, "max_seconds": 120.0}


def test_atomic_write_never_leaves_a_half_written_file(tmp_path):
    target = tmp_path / "r.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"a": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_run_file_round_trip_and_refusals(tmp_path):
    cases = evaluate("gradient-dot", IRIS, store=GroundTruthStore(tmp_path))
    path = write_run(tmp_path / "run.json", cases)
    doc = read_run(path)
    assert doc["schema_version"] == SCHEMA_VERSION
    assert {"torch", "cuda", "device_name", "cpu_count"} <= set(doc["machine"])
    assert {"sha", "dirty"} <= set(doc["commit"]) <= {"sha", "dirty", "changed_files", "untracked_files"}
    assert len(doc["cases"]) == 2 * 3 and doc["cases"][0]["estimator"] == "gradient-dot"
    (tmp_path / "bad.json").write_text('{"schema_version": 1, "cas')
    with pytest.raises(ValueError, match="bad.json: cannot be read as JSON"):
        read_run(tmp_path / "bad.json")
    (tmp_path / "future.json").write_text('{"schema_version": 99, "cases": []}')
    with pytest.raises(ValueError, match="future.json: schema_version 99 is newer"):
        read_run(tmp_path / "future.json")


def test_known_failure_floor_is_xfail_and_other_floors_still_gate(tmp_path):
    from influence_bench.spec.thresholds import Thresholds, judge

    (tmp_path / "t.toml").write_text(
        '[[floor]]\nestimator = "exact"\nmetric = "pearson"\nmin = 0.999\nknown_failure = "documented"\n'
        'known_min = 0.9\n'
        '[[floor]]\nestimator = "exact"\nmetric = "spearman"\nmin = 0.5\n')
    th = Thresholds.load(tmp_path / "t.toml")
    cases = evaluate("exact", IRIS, store=GroundTruthStore(tmp_path))
    known = []
    verdicts, failures = judge(cases, th, known)
    assert failures == [] and len(known) == 2 and "known failure: documented" in known[0]
    assert set(verdicts.values()) == {"xfail"}
    (tmp_path / "t.toml").write_text((tmp_path / "t.toml").read_text().replace("min = 0.5", "min = 1.01"))
    verdicts, failures = judge(cases, Thresholds.load(tmp_path / "t.toml"), [])
    assert len(failures) == 2 and set(verdicts.values()) == {"FAIL"}
