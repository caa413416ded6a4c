"""Where an estimator's code came from, recorded with every result case (``Case.estimator_source``).

``estimator_source(cls)`` is a dict:

* ``file``: the source file of the module that defines the class, relative to the root of this
  copy of influence_bench (the checkout, or ``site-packages`` for an installed wheel) when it lies
  inside it (``estimators/lissa.py``), else its bare file name (``my_lissa.py``): a run file names no
  directory of the machine it ran on. None when the class has no source file.
* ``sha256``: the first 16 hex digits of the sha256 of that file's bytes (the whole module file;
  code the class imports from other modules is not covered). None without a file.
* ``class``: ``module.QualName`` of the class.
* ``package`` / ``version``: the distribution of the ``influence_bench.estimators`` entry point that
  provided the class (``importlib.metadata``), else None (built-ins, plug-in files).

Computed once per class and process (the file is read at the class's first case).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from pathlib import Path

SHA_DIGITS = 16


def _root() -> Path:
    return Path(__file__).resolve().parents[2]  # the folder holding the influence_bench package


def _source_file(cls: type) -> Path | None:
    try:
        src = inspect.getsourcefile(cls)
    except TypeError:  # a class of a built-in module
        return None
    return Path(src) if src and Path(src).is_file() else None


def shown_path(path: Path) -> str:
    """``path`` relative to the influence_bench root when inside it, else its file name."""
    path = path.resolve()
    try:
        return path.relative_to(_root()).as_posix()
    except ValueError:
        return path.name


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:SHA_DIGITS]


@functools.lru_cache(maxsize=None)
def _file_record(cls: type) -> tuple[str | None, str | None]:
    path = _source_file(cls)
    if path is None:
        return None, None
    try:
        return shown_path(path), file_sha256(path)
    except OSError:
        return shown_path(path), None


def estimator_source(cls: type, registry=None) -> dict:
    """The provenance of estimator class ``cls`` (see the module docstring); ``registry`` (default the
    global one) knows which classes an entry point provided."""
    if registry is None:
        from influence_bench.api.registry import REGISTRY as registry
    file, sha = _file_record(cls)
    package, version = registry.distributions.get(cls, (None, None))
    return {"file": file, "sha256": sha, "class": f"{cls.__module__}.{cls.__qualname__}",
            "package": package, "version": version}
