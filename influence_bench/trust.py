"""Whether ``./estimators`` of the working directory may be imported (its code runs): the names of the
switches, torch-free so the command line can offer them without loading the plug-in API."""

from __future__ import annotations

TRUST_ENV = "INFLUENCE_BENCH_TRUST_CWD"  # =1: import ./estimators of the working directory
TRUST_FLAG = "--trust-cwd-estimators"  # the same, on the command line and as a pytest option
TRUST_TOML = "[tool.influence-bench] trust-cwd-estimators = true"  # the same, in ./pyproject.toml


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")
