import inspect
import textwrap
from pathlib import Path

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
    assert "estimator name 'dup' is defined twice" in msg and 'rename one of them (name = "my-dup")' in msg
    assert msg.count("test_registry.py:") == 2  # file:line of both definitions


def test_duplicate_of_a_builtin_from_a_plugin_file(tmp_path, monkeypatch):
    path = _plugin(tmp_path, "clash.py", "exact")
    REGISTRY.discover()
    with pytest.raises(RegistryError, match=r"estimator name 'exact' is defined twice: by .*exact.py:\d+ and by "
                                            r".*clash.py:\d+; rename yours"):
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


# ---- a name claimed twice: never settled silently ------------------------------------------------------


def _cwd_lissa(tmp_path, monkeypatch, extra=""):
    """``tmp_path/estimators/lissa.py`` keeping the built-in's name, the working directory trusted."""
    (tmp_path / "estimators").mkdir()
    path = _plugin(tmp_path / "estimators", "lissa.py", "lissa")
    if extra:
        path.write_text(path.read_text().replace("    name = 'lissa'\n", f"    name = 'lissa'\n    {extra}\n"))
    monkeypatch.chdir(tmp_path)
    reg = Registry()
    reg.trust_cwd = True
    reg.discover()
    return reg, path


def test_a_cwd_file_reusing_a_builtin_name_withdraws_the_name(tmp_path, monkeypatch, untrusting):
    reg, user = _cwd_lissa(tmp_path, monkeypatch)
    builtin = registry_mod.builtin_dir() / "lissa.py"
    [failure] = reg.failures
    assert failure.name == "lissa" and str(user.resolve()) in failure.what
    assert "lissa" not in reg.names() and "exact" in reg.names()  # the others still load
    with pytest.raises(RegistryError) as e:
        reg.get("lissa")  # not the built-in, silently: the error names both files
    msg = str(e.value)
    assert f"estimator name 'lissa' is defined twice: by {builtin.resolve()}:" in msg
    assert f"and by {user.resolve()}:" in msg and 'rename yours (name = "my-lissa")' in msg
    assert len(msg.splitlines()) == 1


def test_a_clash_under_another_file_name_withdraws_the_name_it_claims(tmp_path, monkeypatch, untrusting):
    _plugin(tmp_path, "my_variant.py", "exact")
    monkeypatch.setenv("INFLUENCE_BENCH_ESTIMATORS", str(tmp_path))
    reg = Registry()
    assert "exact" not in reg.names() and [f.name for f in reg.failures] == ["exact"]
    with pytest.raises(RegistryError, match=r"'exact' is not available: .*defined twice: by .*exact\.py:\d+ and by "
                                            r".*my_variant\.py:\d+"):
        reg.get("exact")


def test_overrides_replaces_the_builtin_with_a_note_naming_both(tmp_path, monkeypatch, untrusting):
    reg, user = _cwd_lissa(tmp_path, monkeypatch, extra="overrides = True")
    assert reg.failures == [] and "lissa" in reg.names()
    cls = reg.get("lissa")
    assert Path(inspect.getsourcefile(cls)).resolve() == user.resolve()
    [note] = reg.notes
    assert str(user.resolve()) in note and str((registry_mod.builtin_dir() / "lissa.py").resolve()) in note
    assert "overrides = True" in note


def test_overrides_wins_whichever_is_registered_first_and_two_overriders_clash():
    reg = Registry()

    class Mine(Estimator):
        name = "ov"
        overrides = True

    class Theirs(Estimator):
        name = "ov"

    class Also(Estimator):
        name = "ov"
        overrides = True

    reg.add(Mine)
    reg.add(Theirs)
    assert reg._classes["ov"] is Mine and len(reg.notes) == 1
    with pytest.raises(RegistryError, match="estimator name 'ov' is defined twice"):
        reg.add(Also)
    not_bool = type("NotBool", (Estimator,), {"name": "ov", "overrides": "yes"})  # only the boolean True counts
    reg2 = Registry()
    reg2.add(Theirs)
    with pytest.raises(RegistryError, match="defined twice"):
        reg2.add(not_bool)


def test_a_trusted_identical_copy_of_the_builtins_is_the_builtin(tmp_path, monkeypatch, untrusting):
    (tmp_path / "estimators").mkdir()
    (tmp_path / "estimators" / "exact.py").write_bytes((registry_mod.builtin_dir() / "exact.py").read_bytes())
    monkeypatch.chdir(tmp_path)
    reg = Registry()
    reg.trust_cwd = True
    assert "exact" in reg.names() and reg.failures == []
    assert reg.get("exact").__module__ == "influence_bench.estimators.exact"


def test_an_entry_point_reusing_a_builtin_name_withdraws_it(monkeypatch, untrusting):
    class Imposter(Estimator):
        name = "gradient-dot"

    monkeypatch.setattr(registry_mod.metadata, "entry_points",
                        lambda group: [_EP("gradient-dot", "pkg:Imposter", obj=Imposter)])
    reg = Registry()
    reg.discover()
    [failure] = reg.failures
    assert "entry point 'gradient-dot' = 'pkg:Imposter'" in str(failure)
    assert "gradient-dot" not in reg.names()
    with pytest.raises(RegistryError, match=r"defined twice: by .*gradient_dot\.py:\d+ and by .*test_registry\.py:\d+"):
        reg.get("gradient-dot")
    strict = Registry()
    strict.load_dir(registry_mod.builtin_dir())
    with pytest.raises(RegistryError, match=r"entry point 'gradient-dot'.*defined twice"):  # asked to raise
        strict.load_entry_points()


def test_cli_lists_the_clash_as_not_loaded(tmp_path, untrusting):
    """The command line, from a working directory whose estimators/lissa.py keeps the built-in's name."""
    import os
    import subprocess
    import sys

    (tmp_path / "estimators").mkdir()
    user = _plugin(tmp_path / "estimators", "lissa.py", "lissa")
    env = {k: v for k, v in os.environ.items() if k not in (registry_mod.TRUST_ENV, "INFLUENCE_BENCH_ESTIMATORS")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "influence_bench.cli", *a], cwd=tmp_path,  # noqa: E731
                                    env=env, capture_output=True, text=True, timeout=120)
    listed = run("--trust-cwd-estimators", "list", "estimators")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [ln.split()[0] for ln in lines if "NOT LOADED" in ln] == ["lissa"]
    assert not any(ln.startswith("lissa ") and "NOT LOADED" not in ln for ln in lines)  # the built-in is not listed
    flat = "".join(listed.stdout.split())  # the row may be wrapped to the terminal's width
    assert f"definedtwice:by{(registry_mod.builtin_dir() / 'lissa.py').resolve()}:" in flat
    assert f"andby{user.resolve()}:" in flat


def test_pytest_collection_asked_for_a_clashing_name_is_a_usage_error_naming_both(tmp_path, untrusting):
    """``--estimator lissa`` must not collect the built-in while ./estimators/lissa.py also claims it."""
    import os
    import subprocess
    import sys

    (tmp_path / "estimators").mkdir()
    user = _plugin(tmp_path / "estimators", "lissa.py", "lissa")
    suite = Path(__file__).resolve().parents[1] / "suites" / "test_estimator_checks.py"
    env = {k: v for k, v in os.environ.items() if k not in (registry_mod.TRUST_ENV, "INFLUENCE_BENCH_ESTIMATORS")}
    proc = subprocess.run([sys.executable, "-m", "pytest", str(suite), "--collect-only", "-q", "-p", "no:cacheprovider",
                           registry_mod.TRUST_FLAG, "--estimator", "lissa"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 4, text  # pytest's usage error
    [line] = [ln for ln in text.splitlines() if ln.startswith("ERROR: influence-bench: estimator 'lissa'")]
    assert f"by {(registry_mod.builtin_dir() / 'lissa.py').resolve()}:" in line and f"by {user.resolve()}:" in line
