"""Run-file schema: validation names file and field, v1 files upgrade, writes round-trip."""

import json
import math
from pathlib import Path

import pytest

from influence_bench.reporting.runfiles import write_run
from influence_bench.reporting.schema import SCHEMA_VERSION, Case, RunFileError, load_run

V1 = Path(__file__).parent / "data" / "run-v1-iris-smoke.json"


def test_v1_fixture_is_really_v1_and_upgrades_on_load():
    raw = json.loads(V1.read_text())
    assert raw["schema_version"] == 1 and "device" not in raw["cases"][0]
    run = load_run(V1)
    assert run.schema_version == SCHEMA_VERSION == 3
    assert run.tier == "smoke" and run.machine["cpu_count"] == 2 and run.commit == {"sha": None, "dirty": False}
    assert len(run.cases) == len(raw["cases"]) == 28
    c = run.cases[0]
    assert isinstance(c, Case) and c.device == "cpu" and c.setting_info == {}
    assert (c.estimator, c.setting, c.protocol, c.metric) == ("exact", "iris-logreg-wd1e-3", "loo-fixed", "spearman")
    assert c.value == raw["cases"][0]["value"] and c.per_test == raw["cases"][0]["per_test"]
    assert c.hyperparameters == {"damping": 0.0, "max_params": 12000}


def test_v2_noise_ceiling_was_the_reliability_and_becomes_its_square_root(tmp_path):
    doc = json.loads(V1.read_text())
    doc["schema_version"] = 2
    doc["cases"] = doc["cases"][:3]
    doc["cases"][0]["noise_ceiling"], doc["cases"][1]["noise_ceiling"] = 0.64, None
    for c in doc["cases"]:
        c.update(device="cpu", setting_info={})
    (tmp_path / "v2.json").write_text(json.dumps(doc))
    run = load_run(tmp_path / "v2.json")
    assert (run.cases[0].noise_reliability, run.cases[0].noise_ceiling) == (0.64, pytest.approx(0.8))
    assert all(map(math.isnan, (run.cases[1].noise_reliability, run.cases[1].noise_ceiling)))
    assert (run.cases[2].noise_reliability, run.cases[2].noise_ceiling) == (1.0, 1.0)
    assert run.to_json()["cases"][0]["noise_reliability"] == 0.64  # written back as v3, not converted twice
    assert load_run(write_run(tmp_path / "v3.json", run.cases)).cases[0].noise_ceiling == pytest.approx(0.8)


def _case(**kw):
    d = dict(estimator="e", setting="s", setting_version=1, spec_hash="h", protocol="loo-fixed", mode="warm",
             metric="spearman", value=0.5, ci_low=0.4, ci_high=0.6, per_test=[0.5, None], device="cpu")
    d.update(kw)
    return Case(**d)


def test_write_then_load_round_trips(tmp_path):
    cases = [_case(), _case(metric="pearson", value=float("nan"), ci_low=None, ci_high=None)]
    path = write_run(tmp_path / "run.json", cases, extra={"tier": "smoke", "note": "kept"})
    run = load_run(path)
    assert run.cases[0] == cases[0]
    assert run.cases[1].value is None  # NaN is written as null
    assert run.extra == {"note": "kept"} and run.tier == "smoke"
    assert {"torch", "cuda", "device_name", "cpu_count"} <= set(run.machine)
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["cases"][3].pop("metric"), r"cases\[3\]: missing field 'metric'"),
    (lambda d: d["cases"][0].update(value="0.9"), r"cases\[0\]\.value: expected float or None, got str"),
    (lambda d: d["cases"][1].update(n_test=True), r"cases\[1\]\.n_test: expected int, got bool"),
    (lambda d: d["cases"][2].update(status="fine"), r"cases\[2\]\.status: 'fine' is not one of"),
    (lambda d: d["cases"][0]["per_test"].__setitem__(2, "x"), r"cases\[0\]\.per_test\[2\]: expected float"),
    (lambda d: d["cases"][0].update(ci_low=0.9, ci_high=0.1), r"cases\[0\]: ci_low 0.9 > ci_high 0.1"),
    (lambda d: d["machine"].pop("torch"), r"machine: missing field 'torch'"),
    (lambda d: d.update(cases={}), r"cases: expected list, got dict"),
    (lambda d: d.update(selected={}), r"selected: expected list, got dict"),
    (lambda d: d.update(selected=[{"estimator": "e", "setting": "s", "mode": "warm"}]),
     r"selected\[0\]: missing field 'protocols'"),
    (lambda d: d.update(selected=[{"estimator": "e", "setting": "s", "mode": "warm", "protocols": [], "not_run": 1}]),
     r"selected\[0\]\.not_run: expected str, got int"),
    (lambda d: d.update(schema_version=4), r"schema_version 4 is newer than this influence-bench"),
    (lambda d: d.update(schema_version="2"), r"schema_version '2' is not a positive integer"),
])
def test_bad_files_name_the_file_and_the_field(tmp_path, mutate, message):
    doc = json.loads(V1.read_text())
    mutate(doc)
    path = tmp_path / "broken-run.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(RunFileError, match=message) as err:
        load_run(path)
    assert str(path) in str(err.value)


def test_truncated_and_foreign_files(tmp_path):
    (tmp_path / "t.json").write_text(V1.read_text()[:500])
    with pytest.raises(RunFileError, match="t.json: cannot be read as JSON"):
        load_run(tmp_path / "t.json")
    (tmp_path / "f.json").write_text('{"hello": 1}')
    with pytest.raises(RunFileError, match="f.json: not an influence-bench run"):
        load_run(tmp_path / "f.json")
    with pytest.raises(RunFileError, match="missing.json: cannot be read"):
        load_run(tmp_path / "missing.json")
