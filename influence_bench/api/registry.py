"""One registry of estimators, filled by the ``@register`` decorator, by the ``.py`` files of the
estimator directories (discovered by path) and by the ``influence_bench.estimators`` entry-point group.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import sys
from importlib import metadata
from pathlib import Path

from influence_bench.api.estimator import Estimator

ENTRY_POINT_GROUP = "influence_bench.estimators"


class RegistryError(LookupError):
    pass


def _location(cls: type) -> str:
    try:
        return f"{inspect.getsourcefile(cls)}:{inspect.getsourcelines(cls)[1]}"
    except (OSError, TypeError):
        return f"{cls.__module__}.{cls.__qualname__}"


class Registry:
    def __init__(self) -> None:
        self._classes: dict[str, type[Estimator]] = {}
        self._loaded_files: set[Path] = set()
        self._discovered = False

    # ---- filling -------------------------------------------------------------------------
    def add(self, cls: type[Estimator]) -> type[Estimator]:
        if not (isinstance(cls, type) and issubclass(cls, Estimator)):
            raise RegistryError(f"{cls!r} is not a subclass of influence_bench.Estimator")
        name = getattr(cls, "name", "")
        if not name or not isinstance(name, str):
            raise RegistryError(f"estimator class {_location(cls)} has no `name`")
        old = self._classes.get(name)
        if old is not None and old is not cls:
            if _location(old) == _location(cls):  # same file imported twice under two module names
                return cls
            raise RegistryError(
                f"duplicate estimator name {name!r}: defined at {_location(old)} and at {_location(cls)}"
            )
        self._classes[name] = cls
        return cls

    def load_file(self, path: Path) -> None:
        """Import one estimator file by path; its ``@register`` decorators fill this registry."""
        path = Path(path).resolve()
        if path in self._loaded_files:
            return
        self._loaded_files.add(path)
        modname = _module_name(path)
        existing = sys.modules.get(modname)
        if existing is not None and Path(getattr(existing, "__file__", "") or "").resolve() == path:
            for obj in vars(existing).values():  # imported already (e.g. as influence_bench.estimators.X)
                if isinstance(obj, type) and issubclass(obj, Estimator) and obj.name and obj.__module__ == modname \
                        and self._classes.get(obj.name) is not obj:
                    self.add(obj)
            return
        spec = importlib.util.spec_from_file_location(modname, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        _LOADING.append(self)  # `@register` in that file fills this registry
        try:
            spec.loader.exec_module(module)
        except RegistryError:
            raise
        except Exception as exc:
            sys.modules.pop(modname, None)
            raise RegistryError(f"could not import estimator file {path}: {type(exc).__name__}: {exc}") from exc
        finally:
            _LOADING.pop()

    def load_dir(self, directory: Path) -> None:
        for path in sorted(Path(directory).glob("*.py")):
            if not path.name.startswith("_"):
                self.load_file(path)

    def load_entry_points(self) -> None:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            obj = ep.load()  # a class, or a module whose import registers its classes
            if isinstance(obj, type) and issubclass(obj, Estimator):
                if self._classes.get(obj.name) is not obj:
                    self.add(obj)

    def discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for d in estimator_dirs():
            self.load_dir(d)
        self.load_entry_points()

    # ---- lookup --------------------------------------------------------------------------
    def names(self) -> list[str]:
        self.discover()
        return sorted(self._classes)

    def get(self, name: str) -> type[Estimator]:
        self.discover()
        try:
            return self._classes[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._classes, n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise RegistryError(
                f"unknown estimator {name!r}.{hint} Known: {', '.join(sorted(self._classes))}"
            ) from None

    def create(self, name: str, **hyperparameters) -> Estimator:
        cls = self.get(name)
        try:
            return cls(**hyperparameters)
        except TypeError as exc:
            raise RegistryError(f"estimator {name!r}: bad hyperparameters {hyperparameters}: {exc}") from exc


def _module_name(path: Path) -> str:
    """One identity per file: a built-in is ``influence_bench.estimators.<stem>`` (the name an
    installed wheel gives it too), a plug-in file ``influence_bench_plugins.<folder>.<stem>``."""
    if path.parent == builtin_dir().resolve():
        return f"influence_bench.estimators.{path.stem}"
    return f"influence_bench_plugins.{path.parent.name}.{path.stem}".replace("-", "_")


def builtin_dir() -> Path:
    """The built-in estimator plug-ins of *this* copy of influence_bench: ``influence_bench/estimators``
    in an installed wheel, the repository's ``estimators/`` in a checkout (editable install)."""
    here = Path(__file__).resolve().parents[1]  # the influence_bench package
    for d in (here / "estimators", here.parent / "estimators"):
        if (d / "__init__.py").is_file():
            return d
    return here.parent / "estimators"


def estimator_dirs() -> list[Path]:
    """Built-ins, then ``./estimators`` of the working directory, then ``$INFLUENCE_BENCH_ESTIMATORS``."""
    dirs = [builtin_dir(), Path.cwd() / "estimators"]
    extra = os.environ.get("INFLUENCE_BENCH_ESTIMATORS", "")
    dirs += [Path(p) for p in extra.split(os.pathsep) if p]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in out:
            out.append(d.resolve())
    return out


REGISTRY = Registry()
_LOADING: list[Registry] = []  # registries currently importing a plugin file


def register(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator: ``@register`` adds an estimator to the registry loading the file (the
    global ``REGISTRY`` when the module is imported normally)."""
    return (_LOADING[-1] if _LOADING else REGISTRY).add(cls)


def builtin_estimators() -> list[str]:
    """Names of the registered estimators whose class lives in the built-in ``estimators/``."""
    from influence_bench.api.registry import REGISTRY, builtin_dir

    root = builtin_dir().resolve()
    out = []
    for name in REGISTRY.names():
        src = inspect.getsourcefile(REGISTRY.get(name))
        if src and root in Path(src).resolve().parents:
            out.append(name)
    return out
