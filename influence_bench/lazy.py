"""Names a package loads on first use (PEP 562), so importing it stays cheap: ``import
influence_bench`` and the command line's ``--help`` and ``list`` import no torch."""

from __future__ import annotations

import importlib


def lazy_names(module_globals: dict, names: dict[str, str]):
    """``(__getattr__, __dir__)`` for a package whose ``names`` (name -> module holding it) load on
    first access and are then kept in ``module_globals``."""

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
            module_globals[name] = value
            return value
        raise AttributeError(f"module {module_globals['__name__']!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(module_globals) | set(module_globals.get("__all__", ())))

    return __getattr__, __dir__
