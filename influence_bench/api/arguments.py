"""Estimator specs with hyperparameters: ``lissa(scale=10,depth=500)`` on the command line, in
``pytest --estimator`` and in the Python API.

A spec is a registered name, optionally followed by ``(field=value, ...)``: each field one of the
estimator's dataclass fields, each value a Python literal (``10``, ``1e-3``, ``'auto'``, ``None``,
``True``, ``(1, 2)``) or a bare word, read as a string (``curvature=ggn``). Values are checked against
the field's annotation (``int``, ``float``, ``str``, ``bool``, ``None``, ``Literal``, unions, tuples
and lists); an int given for a ``float`` field becomes a float.

A case records the estimator under its *label*: the name alone when every hyperparameter is at its
default, else ``name(field=value, ...)`` with the fields that differ, in field order
(``estimator_label``). So ``lissa`` and ``lissa(depth=500)`` are two rows, two baselines and two sets of
floors: the measured floors of the built-ins (measured at their defaults) match the bare name only.
The full hyperparameters are recorded in every case (``Case.hyperparameters``) whatever the label.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import re
import types
import typing
from typing import Any

from influence_bench.errors import RegistryError

_SPEC = re.compile(r"^\s*([A-Za-z0-9_.:\-]+)\s*(?:\((.*)\))?\s*$", re.S)  # `dattri:explicit`: a namespaced name


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"lissa(scale=10, depth=500)"`` -> ``("lissa", {"scale": 10, "depth": 500})``; values unchecked."""
    m = _SPEC.match(spec or "")
    if m is None:
        raise RegistryError(f"unknown estimator {spec!r}: an estimator is NAME or NAME(field=value, ...), e.g. "
                            "'lissa(scale=10,depth=500)'; `influence-bench list estimators` names them")
    name, inner = m.group(1), (m.group(2) or "").strip()
    if not inner:
        return name, {}
    try:
        call = ast.parse(f"_({inner})", mode="eval").body
    except SyntaxError as exc:
        raise RegistryError(f"estimator spec {spec!r}: cannot read the arguments {inner!r} ({exc.msg}); write "
                            "them as field=value, separated by commas") from None
    assert isinstance(call, ast.Call)
    if call.args or any(k.arg is None for k in call.keywords):
        raise RegistryError(f"estimator spec {spec!r}: arguments must be named, field=value "
                            f"(e.g. '{name}(depth=500)')")
    out: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg in out:
            raise RegistryError(f"estimator spec {spec!r}: {kw.arg} is given twice")
        out[kw.arg] = _literal(kw.value, f"_({inner})")
    return name, out


def _literal(node: ast.expr, source: str) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        pass
    text = ast.get_source_segment(source, node) or ""
    return text.strip().strip("'\"")  # a bare word (ggn, ekfac-2) is a string


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else []


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: its values go unchecked
        return {}


def type_name(hint: Any) -> str:
    if hint is type(None):
        return "None"
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    return str(hint).replace("typing.", "")


_NO = object()


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as the annotation ``hint`` wants it, or ``_NO``."""
    if hint is Any or hint is None:
        return value
    if hint is type(None):
        return None if value is None else _NO
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        exact = [a for a in args if isinstance(a, type) and type(value) is a]  # 10 for `int | float` stays an int
        for a in exact + [a for a in args if a not in exact]:
            got = _coerce(value, a)
            if got is not _NO:
                return got
        return _NO
    if origin is typing.Literal:
        return value if value in args else _NO
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return _NO
        kind = origin or hint
        if args and not (len(args) == 2 and args[1] is Ellipsis) and len(args) != len(value) and kind is tuple:
            return _NO
        inner = args[0] if args else Any
        items = [_coerce(v, inner if kind is list or (len(args) == 2 and args[1] is Ellipsis) else args[i])
                 for i, v in enumerate(value)] if args else list(value)
        return _NO if any(i is _NO for i in items) else kind(items)
    if hint is bool:
        return value if isinstance(value, bool) else _NO
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if hint is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NO
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _NO
    return value  # an annotation this checker does not read (a Protocol, a TypeVar): unchecked


def check_arguments(cls: type, given: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``given`` checked against ``cls``'s dataclass fields and their annotations; a ``RegistryError``
    naming the estimator (and ``where``, e.g. the setting), the field, its type and what was given."""
    name = getattr(cls, "name", cls.__name__)
    at = f" ({where})" if where else ""
    fields = {f.name: f for f in _fields(cls)}
    hints = _hints(cls)
    listing = ", ".join(f"{f} ({type_name(hints[f]) if f in hints else '?'})" for f in fields) or "none"
    out = {}
    for key, value in given.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise RegistryError(f"estimator {name!r}{at} has no hyperparameter {key!r}{hint} Its hyperparameters: "
                                f"{listing}")
        got = _coerce(value, hints[key]) if key in hints else value
        if got is _NO:
            raise RegistryError(f"estimator {name!r}{at}: hyperparameter {key} must be {type_name(hints[key])}, "
                                f"got {value!r} ({type(value).__name__})")
        out[key] = got
    return out


def expand_specs(specs, registry=None) -> list[str]:
    """Specs with names given as globs (``'dattri:*'``, ``'*:cg'``) replaced by the registered names they
    match, sorted (opt-in estimators included: a glob names them); a glob matching nothing is a
    ``RegistryError``. Other specs pass unchanged, duplicates are dropped."""
    import fnmatch

    out: list[str] = []
    for spec in specs:
        name = spec.split("(", 1)[0].strip()
        if not any(c in name for c in "*?["):
            out.append(spec)
            continue
        if registry is None:
            from influence_bench.api.registry import REGISTRY as registry
        if "(" in spec:
            raise RegistryError(f"estimator spec {spec!r}: a glob cannot take hyperparameters; name one estimator")
        matched = [n for n in registry.names() if fnmatch.fnmatchcase(n, name)]
        if not matched:
            raise RegistryError(f"no estimator matches {name!r}; `influence-bench list estimators` names them "
                                "(peer libraries' adapters: pip install -e 'plugins/peers[all]')")
        out += matched
    return list(dict.fromkeys(out))


def create(spec: str, registry=None) -> Any:
    """The estimator a spec names, its arguments checked (``RegistryError`` otherwise)."""
    if registry is None:
        from influence_bench.api.registry import REGISTRY as registry
    name, given = parse_spec(spec)
    cls = registry.get(name)
    kwargs = check_arguments(cls, given)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # the class's own __post_init__ checks
        raise RegistryError(f"estimator {name!r}: bad hyperparameters {kwargs}: {exc}") from exc


def estimator_label(est: Any) -> str:
    """``name`` when every hyperparameter is at its default, else ``name(field=value, ...)`` of those
    that differ (field order); the key a case is recorded, gated and floored under."""
    changed = []
    for f in _fields(type(est)):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = _NO
        value = getattr(est, f.name, _NO)
        if value is _NO or _same(value, default):
            continue
        changed.append(f"{f.name}={value!r}")
    return f"{est.name}({','.join(changed)})" if changed else est.name


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b) or (isinstance(a, float) and isinstance(b, int) and a == b)
    except Exception:  # noqa: BLE001 - arrays and the like: compare as text
        return repr(a) == repr(b)


def base_name(label: str) -> str:
    """The registered name inside a label or spec: ``lissa(depth=500)`` -> ``lissa``."""
    return label.split("(", 1)[0].strip()
