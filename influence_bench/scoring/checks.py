"""Checks every registered estimator must pass, generated from the registry (as scikit-learn's
``parametrize_with_checks``): built-ins and plug-ins alike get them, with nothing to list by hand.

``pytest suites/`` runs them as ``check-<check>-<estimator>`` cases (``--estimator`` selects). An
estimator's tags choose which checks apply: ``stochastic`` estimators are not held to bit-for-bit
determinism, ``hvp`` and ``hessian`` estimators (which budget their Hessian-vector products with
``max_seconds``) must refuse a setting whose products would exceed it. A known exception is one
strict entry of ``EXCEPTIONS`` with its reason: it fails when the check starts passing.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from influence_bench.api.context import Context
from influence_bench.api.estimator import Estimator, check_output
from influence_bench.api.registry import REGISTRY
from influence_bench.errors import EstimatorUnsupported

# (check, estimator) -> why it is expected to fail. Strict: a listed pair that passes fails.
EXCEPTIONS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[type[Estimator], "CheckContexts"], None]
    applies: Callable[[type[Estimator]], bool] = lambda cls: True
    what: str = ""


class CheckContexts:
    """Small trained models the checks run on, built once per session (each estimator gets
    ``fresh()`` copies, so no check sees another's cached quantities)."""

    def __init__(self, build: Callable[[str], Context]):
        self._build, self._made = build, {}

    def get(self, which: str) -> Context:
        """A fresh copy whose Hessian-vector products count as free: a check's outcome must not
        depend on how loaded the machine is (``budget-refusal`` sets its own product time)."""
        if which not in self._made:
            self._made[which] = self._build(which)
        return self._made[which].fresh().with_cached("hvp_seconds", 0.0)


def documented_fields(cls: type[Estimator]) -> list[str]:
    """Hyperparameters (dataclass fields) that neither the class nor its module's docstring names."""
    if not dataclasses.is_dataclass(cls):
        return []
    docs = " ".join(d for d in (cls.__doc__, getattr(sys.modules.get(cls.__module__), "__doc__", None))
                    if d and not d.startswith(f"{cls.__name__}("))  # not the dataclass-generated signature
    return [f.name for f in dataclasses.fields(cls) if not re.search(rf"\b{re.escape(f.name)}\b", docs)]


def _check_documented(cls, contexts) -> None:
    if not cls.name:
        raise AssertionError(f"{cls.__name__}: no estimator name")
    missing = documented_fields(cls)
    assert not missing, (f"estimator {cls.name!r}: hyperparameters {missing} are not documented in the class or "
                         "module docstring")


def _output(cls, ctx: Context) -> tuple[Estimator, torch.Tensor]:
    est = cls()
    out = est.influence(ctx)
    return est, check_output(out, cls.name, ctx.setting.id, (ctx.n_test, ctx.n_train))


def _check_output(cls, contexts) -> None:
    for which in ("convex", "mlp"):
        _output(cls, contexts.get(which))  # check_output raises, naming what is wrong


def _check_deterministic(cls, contexts) -> None:
    ctx = contexts.get("mlp")
    _, a = _output(cls, ctx)
    _, b = _output(cls, contexts.get("mlp"))
    assert torch.equal(a, b), (f"estimator {cls.name!r}: two runs on fresh contexts differ by "
                               f"{float((a - b).abs().max()):.3g}; tag it 'stochastic' if it samples")


def _check_diagnostics(cls, contexts) -> None:
    from influence_bench.scoring.runner import _jsonable

    est, _ = _output(cls, contexts.get("mlp"))
    try:
        json.dumps(_jsonable(dict(est.diagnostics)), allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"estimator {cls.name!r}: diagnostics are not JSON-able: {exc}") from exc


CHUNK_FIELDS = ("chunk_size", "chunk")  # sizes that bound memory only (a batch_size may sample: lissa)


def _chunk_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name in CHUNK_FIELDS] if dataclasses.is_dataclass(cls) else []


def _check_chunk_invariance(cls, contexts) -> None:
    ctx = contexts.get("mlp")
    _, want = _output(cls, ctx)
    for f in _chunk_fields(cls):
        est = cls(**{f: 7})
        got = check_output(est.influence(contexts.get("mlp")), cls.name, ctx.setting.id, (ctx.n_test, ctx.n_train))
        # iterative solvers that stop at a tolerance may differ within it; a chunking bug (rows
        # misaligned, a chunk dropped) moves entries by the order of the entries themselves
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-4 * float(want.abs().max()),
                                   err_msg=f"estimator {cls.name!r}: {f}=7 changes the result")


def _check_budget_refusal(cls, contexts) -> None:
    ctx = contexts.get("mlp").with_cached("hvp_seconds", 1e6)  # as if one product took 11 days
    try:
        cls().influence(ctx)
    except EstimatorUnsupported as exc:
        msg = str(exc)
        assert cls.name in msg and "max_seconds" in msg, (f"estimator {cls.name!r}: its refusal does not name "
                                                          f"the estimator and the budget: {msg!r}")
        return
    raise AssertionError(f"estimator {cls.name!r} (tags {sorted(cls.tags)}) ran although its Hessian-vector "
                         "products would exceed max_seconds")


CHECKS = [
    Check("documented", _check_documented, what="every hyperparameter is named in a docstring"),
    Check("output", _check_output, what="a finite floating [n_test, n_train] tensor on a convex model and an MLP"),
    Check("deterministic", _check_deterministic, lambda cls: "stochastic" not in cls.tags,
          "bit-identical on two fresh contexts (unless tagged stochastic)"),
    Check("diagnostics", _check_diagnostics, what="diagnostics serialise to JSON"),
    Check("chunk-invariance", _check_chunk_invariance, lambda cls: bool(_chunk_fields(cls)),
          "chunk / batch sizes do not change the result"),
    Check("budget-refusal", _check_budget_refusal, lambda cls: bool({"hvp", "hessian"} & cls.tags)
          and any(f.name == "max_seconds" for f in dataclasses.fields(cls)),
          "refuses, naming itself and max_seconds, beyond its Hessian-vector-product budget"),
]


def cases(names: list[str] | None = None) -> list[tuple[str, Check]]:
    """(estimator, check) for every registered estimator (or ``names``) and every check that applies."""
    out = []
    for name in names or REGISTRY.default_names():
        cls = REGISTRY.get(name)
        out += [(name, c) for c in CHECKS if c.applies(cls)]
    return out


def default_contexts() -> CheckContexts:
    """Iris logistic regression (convex, its catalog setting) and a small tanh MLP (one hidden layer
    of 6, weight decay 1e-2, trained here in a second: not cached)."""
    from influence_bench.api.loading import build_context, get_context
    from influence_bench.data.datasets import load
    from influence_bench.spec import catalog
    from influence_bench.spec.settings import DataSpec, ModelSpec, Setting, TestPointSpec, TrainSpec

    def build(which: str) -> Context:
        if which == "convex":
            return get_context(catalog.get_setting("iris-logreg-wd1e-3"))
        s = Setting(id="check-mlp-d1-w6", tier="smoke", data=DataSpec("iris", 120, 30),
                    model=ModelSpec("mlp", depth=1, width=6), train=TrainSpec(weight_decay=1e-2, lbfgs_tol=1e-4),
                    test_points=TestPointSpec(n_random=6))
        return build_context(s, load(s.data), use_cache=False)

    return CheckContexts(build)
