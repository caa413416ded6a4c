import textwrap

import pytest

from influence_bench import Estimator
from influence_bench.api import registry as registry_mod
from influence_bench.api.registry import REGISTRY, Registry, RegistryError


def _plugin(tmp_path, fname, name, body="return ctx.test_grads() @ ctx.train_grads().T"):
    (tmp_path / fname).write_text(textwrap.dedent(f"""
        from dataclasses import dataclass
        from influence_bench import Estimator, register

        @register
        @dataclass
        class P(Estimator):
            name = {name!r}

            def influence(self, ctx):
                {body}
    """))
    return tmp_path / fname


def test_builtins_are_discovered():
    assert {"exact", "gradient-dot"} <= set(REGISTRY.names())


def test_duplicate_name_is_rejected_with_both_locations(tmp_path):
    reg = Registry()

    class A(Estimator):
        name = "dup"

    class B(Estimator):
        name = "dup"

    reg.add(A)
    with pytest.raises(RegistryError) as e:
        reg.add(B)
    msg = str(e.value)
    assert "duplicate estimator name 'dup'" in msg
    assert msg.count("test_registry.py:") == 2  # file:line of both definitions


def test_duplicate_of_a_builtin_from_a_plugin_file(tmp_path, monkeypatch):
    path = _plugin(tmp_path, "clash.py", "exact")
    REGISTRY.discover()
    with pytest.raises(RegistryError, match=r"duplicate estimator name 'exact'.*exact.py:\d+.*clash.py:\d+"):
        REGISTRY.load_file(path)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(RegistryError, match=r"unknown estimator 'exakt'.*Did you mean: exact"):
        REGISTRY.get("exakt")
    with pytest.raises(RegistryError, match=r"Did you mean: gradient-dot"):
        REGISTRY.get("gradient_dot")


def test_plugin_directory_from_environment_is_discovered(tmp_path, monkeypatch):
    _plugin(tmp_path, "mine.py", "my-test-estimator")
    monkeypatch.setenv("INFLUENCE_BENCH_ESTIMATORS", str(tmp_path))
    reg = Registry()
    assert "my-test-estimator" in reg.names()
    assert "exact" in reg.names()


def test_broken_plugin_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("raise ImportError('nope')\n")
    with pytest.raises(RegistryError, match=r"could not import estimator file .*broken.py: ImportError: nope"):
        Registry().load_file(bad)


def test_non_estimator_and_nameless_classes_are_rejected():
    reg = Registry()
    with pytest.raises(RegistryError, match="not a subclass"):
        reg.add(int)

    class NoName(Estimator):
        pass

    with pytest.raises(RegistryError, match="has no `name`"):
        reg.add(NoName)


def test_bad_hyperparameters_are_reported():
    with pytest.raises(RegistryError, match=r"estimator 'exact': bad hyperparameters \{'dampng': 1\}"):
        REGISTRY.create("exact", dampng=1)


def test_a_builtin_has_one_identity():
    """Loaded by path or imported as a package module, a built-in estimator is one class object."""
    import importlib

    from influence_bench import REGISTRY

    cls = REGISTRY.get("exact")
    assert cls.__module__ == "influence_bench.estimators.exact"
    assert importlib.import_module("influence_bench.estimators.exact").Exact is cls


# ---- plug-in trust and failing plug-ins --------------------------------------------------------------


@pytest.fixture
def untrusting(monkeypatch):
    monkeypatch.delenv(registry_mod.TRUST_ENV, raising=False)
    monkeypatch.delenv("INFLUENCE_BENCH_ESTIMATORS", raising=False)


def test_cwd_estimators_need_an_opt_in(tmp_path, monkeypatch, untrusting):
    (tmp_path / "estimators").mkdir()
    _plugin(tmp_path / "estimators", "mine.py", "cwd-mine")
    monkeypatch.chdir(tmp_path)
    cwd = (tmp_path / "estimators").resolve()
    assert cwd not in registry_mod.estimator_dirs()
    assert registry_mod.untrusted_cwd_files() == [cwd / "mine.py"]
    note = registry_mod.untrusted_cwd_note()
    assert "mine.py" in note and registry_mod.TRUST_FLAG in note and registry_mod.TRUST_ENV in note
    reg = Registry()
    assert "cwd-mine" not in reg.names() and reg.notes == [note]
    with pytest.raises(RegistryError, match=r"unknown estimator 'cwd-mine'.*--trust-cwd-estimators"):
        reg.get("cwd-mine")

    monkeypatch.setenv(registry_mod.TRUST_ENV, "1")
    assert cwd in registry_mod.estimator_dirs() and registry_mod.untrusted_cwd_note() is None
    monkeypatch.delenv(registry_mod.TRUST_ENV)
    trusted = Registry()
    trusted.trust_cwd = True  # what the pytest option sets
    assert "cwd-mine" in trusted.names() and trusted.notes == []


@pytest.mark.parametrize("toml, trusted", [
    ("[tool.influence-bench]\ntrust-cwd-estimators = true\n", True),
    ("[tool.influence-bench]\ntrust-cwd-estimators = false\n", False),
    ("[tool.influence-bench]\ntrust-cwd-estimators = \"true\"\n", False),  # only the TOML boolean
    ("[tool.other]\ntrust-cwd-estimators = true\n", False),
    ("[tool.influence-bench\n", False),  # unreadable: no opt-in
])
def test_pyproject_opt_in(tmp_path, monkeypatch, untrusting, toml, trusted):
    (tmp_path / "pyproject.toml").write_text(toml)
    monkeypatch.chdir(tmp_path)
    assert registry_mod.cwd_trusted() is trusted


def test_builtin_directory_as_cwd_is_always_loaded(monkeypatch, untrusting):
    monkeypatch.chdir(registry_mod.builtin_dir().parent)
    assert registry_mod.builtin_dir().resolve() in registry_mod.estimator_dirs()
    assert registry_mod.untrusted_cwd_files() == [] and registry_mod.untrusted_cwd_note() is None


def test_identical_copies_of_the_builtins_are_not_reported(tmp_path, monkeypatch, untrusting):
    """Another checkout of this repository: its estimators/ are the built-ins, not foreign code."""
    (tmp_path / "estimators").mkdir()
    src = registry_mod.builtin_dir() / "exact.py"
    (tmp_path / "estimators" / "exact.py").write_bytes(src.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert registry_mod.untrusted_cwd_files() == []


def test_a_broken_file_is_recorded_and_the_others_load(tmp_path, monkeypatch, untrusting):
    _plugin(tmp_path, "good.py", "good-one")
    (tmp_path / "bad.py").write_text("raise ImportError('nope')\n")
    monkeypatch.setenv("INFLUENCE_BENCH_ESTIMATORS", str(tmp_path))
    reg = Registry()
    assert "good-one" in reg.names() and "exact" in reg.names()
    [failure] = reg.failures
    assert failure.name == "bad" and str(tmp_path / "bad.py") in str(failure) and "ImportError: nope" in str(failure)
    with pytest.raises(RegistryError, match=r"estimator 'bad' is not available: estimator file .*bad.py"):
        reg.get("bad")


class _EP:
    """What ``importlib.metadata.entry_points`` yields, enough of it."""

    def __init__(self, name, value, obj=None, exc=None):
        self.name, self.value, self.group, self.dist = name, value, registry_mod.ENTRY_POINT_GROUP, None
        self._obj, self._exc = obj, exc

    def load(self):
        if self._exc is not None:
            raise self._exc
        return self._obj


def test_failing_entry_points_are_recorded_by_name_and_value(monkeypatch, untrusting):
    class Fine(Estimator):
        name = "ep-fine"

    eps = [_EP("ep-broken", "pkg.mod:Cls", exc=ModuleNotFoundError("No module named 'pkg'")),
           _EP("ep-function", "json:dumps", obj=len), _EP("ep-fine", "x:Fine", obj=Fine)]
    monkeypatch.setattr(registry_mod.metadata, "entry_points", lambda group: eps)
    reg = Registry()
    assert "ep-fine" in reg.names() and "exact" in reg.names()
    msgs = {f.name: str(f) for f in reg.failures}
    assert "entry point 'ep-broken' = 'pkg.mod:Cls'" in msgs["ep-broken"]
    assert "ModuleNotFoundError: No module named 'pkg'" in msgs["ep-broken"]
    assert "not an influence_bench.Estimator subclass" in msgs["ep-function"]
    with pytest.raises(RegistryError, match="entry point 'ep-broken'"):
        reg.get("ep-broken")
    with pytest.raises(RegistryError, match="entry point 'ep-broken'"):  # asked to raise, it raises
        Registry().load_entry_points()


def test_a_field_without_default_is_refused_when_registered():
    from dataclasses import dataclass

    @dataclass
    class Needs(Estimator):
        name = "needs-arg"
        k: int

    with pytest.raises(RegistryError, match=r"estimator 'needs-arg' .*field\(s\) k have no default"):
        Registry().add(Needs)
