"""Imported by the adapters' tests (a module of its own: ``conftest`` names tests/conftest.py too):
contexts of the smoke settings, our built-ins' matrices on them, and ``need(library)``: a test of a
library that is not installed skips, and fails instead where INFLUENCE_BENCH_REQUIRE_PEERS=1
(CI installs them all: a missing library must not pass as a skip)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from influence_bench_peers.common import LIBRARIES, library_version


def need(library: str) -> str:
    """The library's version; skip (or fail under INFLUENCE_BENCH_REQUIRE_PEERS=1) when it is missing."""
    version = library_version(library)
    if version is None:
        why = f"{library} is not installed ({LIBRARIES[library][2]})"
        if os.environ.get("INFLUENCE_BENCH_REQUIRE_PEERS", "").strip().lower() in ("1", "true", "yes", "on"):
            pytest.fail(why + "; INFLUENCE_BENCH_REQUIRE_PEERS=1 requires every peer library")
        pytest.skip(why)
    return version


_CONTEXTS: dict[str, object] = {}
_OURS: dict[tuple[str, str], np.ndarray] = {}


def context(setting: str):
    """The harness's context of a catalog setting (θ* from the model cache or the shipped models), one per
    test session; each call returns a ``fresh()`` copy, as the harness gives every estimator."""
    from influence_bench.api.loading import get_context
    from influence_bench.spec import catalog

    if setting not in _CONTEXTS:
        _CONTEXTS[setting] = get_context(catalog.get_setting(setting))
    return _CONTEXTS[setting].fresh()


def run(spec: str, setting: str) -> np.ndarray:
    """``[n_test, n_train]`` of an estimator spec on a setting, through the harness's own runner (its output
    checks included: shape, finite, dtype, device)."""
    from influence_bench.api.arguments import create
    from influence_bench.scoring.runner import run_estimator

    matrix, _ = run_estimator(create(spec), context(setting))
    return np.asarray(matrix, dtype=np.float64)


def ours(spec: str, setting: str) -> np.ndarray:
    """A built-in's matrix on a setting, computed once per session."""
    if (spec, setting) not in _OURS:
        _OURS[(spec, setting)] = run(spec, setting)
    return _OURS[(spec, setting)]


def agreement(theirs: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(Pearson r over all entries, least-squares slope of ``theirs`` on ``reference`` through 0)."""
    a, b = theirs.ravel(), reference.ravel()
    r = float(np.corrcoef(a, b)[0, 1])
    slope = float(a @ b / (b @ b))
    return r, slope
