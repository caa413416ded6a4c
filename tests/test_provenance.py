"""Provenance: every case names the estimator's source file and its hash (and an entry point's
distribution); a run file's commit counts modified and untracked files."""

import hashlib
import json
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import ridge_context

from influence_bench import Estimator
from influence_bench.api import registry as registry_mod
from influence_bench.api.provenance import SHA_DIGITS, estimator_source
from influence_bench.api.registry import REGISTRY, Registry
from influence_bench.errors import EstimatorUnsupported
from influence_bench.groundtruth import GroundTruthStore
from influence_bench.reporting.runfiles import commit_info, write_run
from influence_bench.reporting.schema import RunFileError, load_run, run_from_json
from influence_bench.scoring.runner import evaluate_context

V1 = Path(__file__).parent / "data" / "run-v1-iris-smoke.json"


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:SHA_DIGITS]


def _plugin_src(name: str, body: str = "return ctx.test_grads() @ ctx.train_grads().T") -> str:
    return textwrap.dedent(f"""
        from dataclasses import dataclass
        from influence_bench import Estimator, register

        @register
        @dataclass
        class P(Estimator):
            name = {name!r}

            def influence(self, ctx):
                {body}
    """)


def test_a_builtin_names_its_file_in_the_checkout_and_its_hash():
    cls = REGISTRY.get("exact")
    src = estimator_source(cls)
    builtin = registry_mod.builtin_dir() / "exact.py"
    assert src["file"].endswith("estimators/exact.py") and not src["file"].startswith("/")
    assert src["sha256"] == _sha(builtin) and len(src["sha256"]) == 16
    assert src["class"] == "influence_bench.estimators.exact.Exact"
    assert src["package"] is None and src["version"] is None


def test_a_plugin_file_outside_the_checkout_is_named_by_file_name_and_a_change_changes_the_hash(tmp_path):
    """Two copies of one plug-in file, the second edited: same name shown, different hashes."""
    paths = []
    for folder, scale in (("a", "1.0"), ("b", "2.0")):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "mine.py"
        path.write_text(_plugin_src(f"prov-{folder}", f"return {scale} * ctx.test_grads() @ ctx.train_grads().T"))
        paths.append(path)
    reg = Registry()
    for p in paths:
        reg.load_file(p)
    a, b = (estimator_source(reg._classes[n], reg) for n in ("prov-a", "prov-b"))
    assert a["file"] == b["file"] == "mine.py"  # no directory of this machine in a result
    assert a["sha256"] == _sha(paths[0]) and b["sha256"] == _sha(paths[1]) and a["sha256"] != b["sha256"]
    assert a["package"] is None


def test_a_class_without_a_source_file_has_none():
    cls = type("Dynamic", (Estimator,), {"name": "dyn", "__module__": "no_such_module_for_provenance"})
    src = estimator_source(cls)
    assert src["file"] is None and src["sha256"] is None and src["class"] == "no_such_module_for_provenance.Dynamic"


def _site(tmp_path: Path, dist: str, version: str, entry_points: dict, modules: dict) -> Path:
    site = tmp_path / "site"
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        "[influence_bench.estimators]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for mod, src in modules.items():
        (site / f"{mod}.py").write_text(src)
    return site


def test_an_entry_point_records_its_distribution(tmp_path, monkeypatch):
    """A class entry point and a module entry point (whose import registers the class) alike."""
    monkeypatch.delenv("INFLUENCE_BENCH_ESTIMATORS", raising=False)
    site = _site(tmp_path, "ib-prov-plugin", "2.3.1",
                 {"prov-ep-class": "ib_prov_cls:P", "prov-ep-module": "ib_prov_mod"},
                 {"ib_prov_cls": _plugin_src("prov-ep-class"), "ib_prov_mod": _plugin_src("prov-ep-module")})
    monkeypatch.syspath_prepend(str(site))
    reg = Registry()
    assert {"prov-ep-class", "prov-ep-module"} <= set(reg.names()), reg.failures
    for name, mod in (("prov-ep-class", "ib_prov_cls"), ("prov-ep-module", "ib_prov_mod")):
        src = estimator_source(reg.get(name), reg)
        assert (src["package"], src["version"]) == ("ib-prov-plugin", "2.3.1")
        assert src["file"] == f"{mod}.py" and src["sha256"] == _sha(site / f"{mod}.py")


@dataclass
class _Refuses(Estimator):
    name = "prov-refuses"

    def influence(self, ctx):
        raise EstimatorUnsupported("not here")


@dataclass
class _GradDot(Estimator):
    name = "prov-graddot"

    def influence(self, ctx):
        return ctx.test_grads() @ ctx.train_grads().T / ctx.n_train


def test_every_case_carries_the_source_and_a_run_file_keeps_it(tmp_path):
    ctx = ridge_context(10, 2, 1e-2, n_test=3)
    here = {"file": "tests/test_provenance.py", "sha256": _sha(Path(__file__))}
    ok = evaluate_context(_GradDot(), ctx, protocols=("loo-fixed",), store=GroundTruthStore(tmp_path / "gt"),
                          info={})
    skipped = evaluate_context(_Refuses(), ctx, protocols=("loo-fixed",), info={})
    assert {c.status for c in ok} == {"ok"} and {c.status for c in skipped} == {"skipped"}
    for c in ok + skipped:
        assert {k: c.estimator_source[k] for k in here} == here, c.estimator_source
    assert ok[0].estimator_source["class"].endswith("test_provenance._GradDot")
    run = load_run(write_run(tmp_path / "run.json", ok))
    assert [c.estimator_source for c in run.cases] == [c.estimator_source for c in ok]
    assert "/work/" not in json.dumps([c.estimator_source for c in run.cases])


def test_older_run_files_load_without_the_source_and_a_bad_one_is_named():
    run = load_run(V1)
    assert all(c.estimator_source == {} for c in run.cases)
    doc = json.loads(V1.read_text())
    doc["cases"][0]["estimator_source"] = "estimators/exact.py"
    with pytest.raises(RunFileError, match=r"cases\[0\]\.estimator_source: expected dict"):
        run_from_json(doc, "x.json")


# ---- the commit: modified and untracked files make it dirty ---------------------------------------


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_commit_info_counts_modified_and_untracked_files_not_ignored_ones(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("*.log\n")
    _git(repo, "add", "a.py", ".gitignore")
    _git(repo, "commit", "-q", "-m", "one")
    clean = commit_info(repo)
    assert len(clean["sha"]) == 40
    assert (clean["dirty"], clean["changed_files"], clean["untracked_files"]) == (False, 0, 0)
    (repo / "run.log").write_text("ignored\n")
    assert commit_info(repo)["dirty"] is False  # ignored files do not count
    (repo / "sub").mkdir()
    (repo / "new.py").write_text("y = 2\n")
    (repo / "sub" / "also.py").write_text("z = 3\n")
    untracked = commit_info(repo)
    assert (untracked["dirty"], untracked["changed_files"], untracked["untracked_files"]) == (True, 0, 2)
    (repo / "a.py").write_text("x = 2\n")
    both = commit_info(repo)
    assert (both["dirty"], both["changed_files"], both["untracked_files"]) == (True, 1, 2)


def test_commit_info_outside_a_repository_says_unknown(tmp_path):
    assert commit_info(tmp_path) == {"sha": None, "dirty": None}


def test_a_commit_count_that_is_not_an_integer_is_refused():
    doc = json.loads(V1.read_text())
    doc["commit"]["untracked_files"] = "2"
    with pytest.raises(RunFileError, match=r"x\.json: commit\.untracked_files: expected int"):
        run_from_json(doc, "x.json")


def test_write_run_records_the_counts(tmp_path):
    doc = json.loads(write_run(tmp_path / "r.json", []).read_text())
    info = commit_info()
    if info["dirty"] is None:  # an installed copy outside a git checkout
        pytest.skip("not a git checkout")
    assert set(doc["commit"]) == {"sha", "dirty", "changed_files", "untracked_files"}
    assert doc["commit"]["dirty"] == (doc["commit"]["changed_files"] + doc["commit"]["untracked_files"] > 0)

