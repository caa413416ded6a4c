import textwrap

import pytest

from influence_bench import Estimator
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
