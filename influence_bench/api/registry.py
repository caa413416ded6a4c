"""One registry of estimators, filled by the ``@register`` decorator, by the ``.py`` files of the
estimator directories (discovered by path) and by the ``influence_bench.estimators`` entry-point group.

Which directories: the built-ins (``builtin_dir()``), always; the directories listed in
``$INFLUENCE_BENCH_ESTIMATORS`` (naming them is the opt-in); and ``./estimators`` of the working
directory only when it is trusted (``cwd_trusted()``): importing a file runs its code, so running the
tool in a checkout someone else wrote must not execute that checkout's ``estimators/*.py`` unasked.

A plug-in that fails to load (an entry point that raises, a file with a syntax error, a duplicate
name) does not take the others down: it is recorded in ``Registry.failures``, each naming the entry
point (its value and distribution) or the file, and ``get`` of a name it would have provided says so.

A name claimed twice (a user's ``estimators/lissa.py`` that keeps ``name = "lissa"``, an entry point
named like a built-in) is never settled silently in favour of either: the name is withdrawn (``names``
leaves it out, ``get`` raises an error naming both files) until one is renamed. A plug-in class that
sets ``overrides = True`` replaces an estimator of the same name instead, with a line in
``Registry.notes`` naming both files. A byte-identical copy of a built-in file (``estimators/`` of
another checkout of this repository) is the built-in and is not imported again.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from influence_bench.api.estimator import Estimator
from influence_bench.errors import RegistryError  # noqa: F401  (re-exported)
from influence_bench.trust import TRUST_ENV, TRUST_FLAG, TRUST_TOML, _truthy  # noqa: F401  (re-exported)

ENTRY_POINT_GROUP = "influence_bench.estimators"


class DuplicateName(RegistryError):
    """Two classes claim one estimator name: ``name``; the message names both files."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class LoadFailure:
    """A plug-in that did not load: ``what`` names it (entry point with value and distribution, or
    file), ``name`` is the estimator name it would likely have provided, ``error`` the one-line why."""

    what: str
    name: str
    error: str

    def __str__(self) -> str:
        return f"{self.what} failed to load: {self.error}"


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        text = f"{exc.msg} ({exc.filename}, line {exc.lineno})"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
        #: None: ``cwd_trusted()`` decides (env, ./pyproject.toml); True/False: the caller's choice
        #: (the pytest option sets True)
        self.trust_cwd: bool | None = None
        self.failures: list[LoadFailure] = []  # plug-ins that did not load (see the module docstring)
        self.notes: list[str] = []  # what a front end should say once (./estimators not loaded)
        self._withdrawn: dict[str, LoadFailure] = {}  # names claimed twice: the clash, said by `get`
        #: classes an entry point provided -> (distribution name, version) (``provenance.estimator_source``)
        self.distributions: dict[type, tuple[str | None, str | None]] = {}

    # ---- filling -------------------------------------------------------------------------
    def add(self, cls: type[Estimator]) -> type[Estimator]:
        if not (isinstance(cls, type) and issubclass(cls, Estimator)):
            raise RegistryError(f"{cls!r} is not a subclass of influence_bench.Estimator")
        name = getattr(cls, "name", "")
        if not name or not isinstance(name, str):
            raise RegistryError(f"estimator class {_location(cls)} has no `name`")
        required = _required_arguments(cls)
        if required:
            raise RegistryError(
                f"estimator {name!r} ({_location(cls)}): hyperparameter field(s) {', '.join(required)} have no "
                "default; give every field a default (the harness creates estimators without arguments)"
            )
        old = self._classes.get(name)
        if old is not None and old is not cls:
            if _location(old) == _location(cls):  # same file imported twice under two module names
                return cls
            mine, theirs = _overrides(cls), _overrides(old)
            if mine == theirs:
                raise DuplicateName(name, _clash_message(name, old, cls))
            winner, loser = (cls, old) if mine else (old, cls)
            self.notes.append(f"estimator {name!r} of {_location(winner)} replaces the one of {_location(loser)} "
                              "(it sets `overrides = True`)")
            self._classes[name] = winner
            return cls
        self._classes[name] = cls
        return cls

    def _withdraw(self, what: str, exc: DuplicateName) -> None:
        """A clash found while discovering: ``what`` (file or entry point) did not load, and the name is
        withdrawn (neither class is used; ``get`` says why)."""
        failure = LoadFailure(what, exc.name, str(exc))
        self.failures.append(failure)
        self._withdrawn.setdefault(exc.name, failure)

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

    def load_dir(self, directory: Path, keep_going: bool = False) -> None:
        """Import every ``*.py`` of ``directory`` (not ``_*.py``); ``keep_going``: record a file that
        fails in ``failures`` and go on with the others."""
        for path in sorted(Path(directory).glob("*.py")):
            if path.name.startswith("_") or _is_builtin_copy(path):
                continue
            try:
                self.load_file(path)
            except DuplicateName as exc:
                if not keep_going:
                    raise
                self._withdraw(f"estimator file {path}", exc)
            except RegistryError as exc:
                if not keep_going:
                    raise
                why = _one_line(exc.__cause__) if exc.__cause__ is not None else str(exc)
                self.failures.append(LoadFailure(f"estimator file {path}", path.stem, why))

    def load_entry_points(self, keep_going: bool = False) -> None:
        """Load the ``influence_bench.estimators`` entry points: each a class, or a module whose import
        registers its classes. ``keep_going``: record one that fails in ``failures``, load the others."""
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                self._load_entry_point(ep)
            except DuplicateName as exc:
                if not keep_going:
                    raise RegistryError(f"{_describe_entry_point(ep)} failed to load: {exc}") from exc
                self._withdraw(_describe_entry_point(ep), exc)
            except Exception as exc:  # noqa: BLE001 - any error of third-party code, named below
                failure = LoadFailure(_describe_entry_point(ep), ep.name, str(exc) if isinstance(exc, RegistryError)
                                      else _one_line(exc))
                if not keep_going:
                    raise RegistryError(str(failure)) from exc
                self.failures.append(failure)

    def _load_entry_point(self, ep) -> None:
        import types

        dist = getattr(ep, "dist", None)
        origin = (getattr(dist, "name", None), getattr(dist, "version", None)) if dist is not None else (None, None)
        before = set(self._classes.values())
        _LOADING.append(self)  # `@register` in the module it imports fills this registry
        try:
            obj = ep.load()
        finally:
            _LOADING.pop()
            for cls in set(self._classes.values()) - before:
                self.distributions[cls] = origin
        if isinstance(obj, type) and issubclass(obj, Estimator):
            self.distributions.setdefault(obj, origin)
            if self._classes.get(obj.name) is not obj:
                self.add(obj)
        elif not isinstance(obj, types.ModuleType):
            raise RegistryError(f"it points to {obj!r}, not an influence_bench.Estimator subclass or a module "
                                "whose import registers estimators")

    def discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        trusted = self.trust_cwd if self.trust_cwd is not None else cwd_trusted()
        for d in estimator_dirs(trusted):
            self.load_dir(d, keep_going=True)
        self.load_entry_points(keep_going=True)
        note = untrusted_cwd_note(trusted)
        if note:
            self.notes.append(note)

    # ---- lookup --------------------------------------------------------------------------
    def names(self) -> list[str]:
        self.discover()
        return sorted(n for n in self._classes if n not in self._withdrawn)

    def default_names(self) -> list[str]:
        """What runs when no estimator is named: every registered one but those that are ``opt_in``."""
        return [n for n in self.names() if not getattr(self._classes[n], "opt_in", False)]

    def get(self, name: str) -> type[Estimator]:
        self.discover()
        if name in self._withdrawn:
            raise RegistryError(f"estimator {name!r} is not available: {self._withdrawn[name]}")
        try:
            return self._classes[name]
        except KeyError:
            pass
        norm = name.replace("_", "-")
        mine = [f for f in self.failures if f.name.replace("_", "-") == norm]
        if mine:  # the plug-in that would have provided it failed: that is the message
            raise RegistryError(f"estimator {name!r} is not available: {mine[0]}") from None
        known = self.names()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        why = "".join(f" ({note})" for note in self.notes)
        if self.failures:
            why += f" ({len(self.failures)} plug-in(s) failed to load; `influence-bench list estimators` names them)"
        raise RegistryError(f"unknown estimator {name!r}.{hint} Known: {', '.join(known)}{why}")

    def create(self, name: str, **hyperparameters) -> Estimator:
        cls = self.get(name)
        try:
            return cls(**hyperparameters)
        except TypeError as exc:
            raise RegistryError(f"estimator {name!r}: bad hyperparameters {hyperparameters}: {exc}") from exc


def _required_arguments(cls: type) -> list[str]:
    """Constructor parameters without a default (a dataclass field without one, most often)."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def _overrides(cls: type) -> bool:
    return getattr(cls, "overrides", False) is True


def _is_builtin(cls: type) -> bool:
    try:
        src = inspect.getsourcefile(cls)
    except TypeError:
        return False
    return bool(src) and Path(src).resolve().parent == builtin_dir().resolve()


def _clash_message(name: str, old: type, new: type) -> str:
    first, second = (new, old) if _is_builtin(new) and not _is_builtin(old) else (old, new)
    if _is_builtin(first):
        fix = f'rename yours (name = "my-{name}"), or set `overrides = True` on it to replace the built-in'
    else:
        fix = f'rename one of them (name = "my-{name}")'
    return f"estimator name {name!r} is defined twice: by {_location(first)} and by {_location(second)}; {fix}"


def _is_builtin_copy(path: Path) -> bool:
    """``path`` is a byte-identical copy of the built-in file of its name, outside the built-in folder."""
    twin = builtin_dir() / path.name
    try:
        return path.resolve().parent != builtin_dir().resolve() and twin.is_file() \
            and twin.read_bytes() == path.read_bytes()
    except OSError:
        return False


def _describe_entry_point(ep) -> str:
    dist = getattr(ep, "dist", None)
    where = ""
    if dist is not None:
        try:
            where = f" of distribution {dist.metadata['Name']} {dist.version}"
        except Exception:  # noqa: BLE001 - metadata of a broken install: name what we can
            where = f" of distribution {getattr(dist, 'name', '?')}"
    return f"entry point {ep.name!r} = {ep.value!r} (group {ENTRY_POINT_GROUP}){where}"


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


def cwd_trusted() -> bool:
    """Whether ``./estimators`` of the working directory may be imported: ``$INFLUENCE_BENCH_TRUST_CWD=1``
    (the command line's ``--trust-cwd-estimators`` sets it), or ``trust-cwd-estimators = true`` under
    ``[tool.influence-bench]`` in the working directory's ``pyproject.toml``."""
    if _truthy(os.environ.get(TRUST_ENV)):
        return True
    try:
        with open(Path.cwd() / "pyproject.toml", "rb") as fh:
            tool = tomllib.load(fh).get("tool", {}).get("influence-bench", {})
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return False
    return isinstance(tool, dict) and tool.get("trust-cwd-estimators") is True


def _cwd_dir() -> Path:
    return Path.cwd() / "estimators"


def _is_builtin_dir(d: Path) -> bool:
    try:
        return d.resolve() == builtin_dir().resolve()
    except OSError:
        return False


def untrusted_cwd_files() -> list[Path]:
    """The ``.py`` files of ``./estimators`` that are not this copy's built-ins (by name and bytes),
    i.e. what trusting the working directory would import."""
    d = _cwd_dir()
    if not d.is_dir() or _is_builtin_dir(d):
        return []
    return [path for path in sorted(d.glob("*.py")) if not path.name.startswith("_") and not _is_builtin_copy(path)]


def untrusted_cwd_note(trusted: bool | None = None) -> str | None:
    """One line when ``./estimators`` holds plug-in files that were not imported for want of an opt-in."""
    if trusted is None:
        trusted = cwd_trusted()
    files = [] if trusted else untrusted_cwd_files()
    if not files:
        return None
    names = ", ".join(p.name for p in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return (f"./estimators ({names}) was not loaded: importing it runs its code; if you trust it, pass "
            f"{TRUST_FLAG}, set {TRUST_ENV}=1, or put `{TRUST_TOML}` in ./pyproject.toml")


def estimator_dirs(trust_cwd: bool | None = None) -> list[Path]:
    """Built-ins, then ``./estimators`` of the working directory if trusted (``cwd_trusted()`` when
    ``trust_cwd`` is None; always when it is the built-in directory), then ``$INFLUENCE_BENCH_ESTIMATORS``."""
    if trust_cwd is None:
        trust_cwd = cwd_trusted()
    cwd = _cwd_dir()
    dirs = [builtin_dir()] + ([cwd] if trust_cwd or _is_builtin_dir(cwd) else [])
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


def registered_tags(name: str) -> frozenset:
    """The tags of a registered estimator, by its name or a label with hyperparameters
    (``lissa(depth=500)``), for cases written before ``Case.tags`` existed; none if unknown."""
    try:
        return REGISTRY.get(name.split("(", 1)[0].strip()).tags
    except RegistryError:
        return frozenset()
