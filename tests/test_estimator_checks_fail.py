"""Every generated estimator check fails on an estimator broken in its way (the checks that only
ever pass on the built-ins would prove nothing)."""

from dataclasses import dataclass

import pytest
import torch

from influence_bench import Estimator
from influence_bench.scoring import checks


@pytest.fixture(scope="module")
def contexts():
    return checks.default_contexts()


@dataclass
class Undocumented(Estimator):
    """Gradient dot product."""

    name = "undocumented"
    scale: float = 1.0

    def influence(self, ctx):
        return self.scale * ctx.test_grads() @ ctx.train_grads().T


@dataclass
class Noisy(Estimator):
    """Random scores from a fresh seed each call (not tagged stochastic)."""

    name = "noisy"

    def influence(self, ctx):
        return torch.randn(ctx.n_test, ctx.n_train, dtype=torch.float64)


@dataclass
class OpaqueDiagnostics(Estimator):
    """Records an object JSON cannot hold."""

    name = "opaque"

    def influence(self, ctx):
        self.diagnostics["solver"] = object()
        return ctx.test_grads() @ ctx.train_grads().T


@dataclass
class IgnoresItsBudget(Estimator):
    """Tagged hvp with a max_seconds it never checks. Hyperparameters: max_seconds, unused."""

    name = "ignores-budget"
    tags = frozenset({"hvp"})
    max_seconds: float = 120.0

    def influence(self, ctx):
        return ctx.test_grads() @ ctx.train_grads().T


@dataclass
class ChunkDependent(Estimator):
    """Drops the last chunk. Hyperparameters: chunk_size, test points per block."""

    name = "chunk-dependent"
    chunk_size: int | None = None

    def influence(self, ctx):
        out = ctx.test_grads() @ ctx.train_grads().T
        if self.chunk_size:
            out = out.clone()
            out[-1] = 0.0
        return out


CHECK = {c.name: c for c in checks.CHECKS}


@pytest.mark.parametrize("check, cls, message", [
    ("documented", Undocumented, r"hyperparameters \['scale'\] are not documented"),
    ("deterministic", Noisy, "two runs on fresh contexts differ"),
    ("diagnostics", OpaqueDiagnostics, "diagnostics are not JSON-able"),
    ("budget-refusal", IgnoresItsBudget, "ran although its Hessian-vector products would exceed max_seconds"),
    ("chunk-invariance", ChunkDependent, "chunk_size=7 changes the result"),
])
def test_check_fails_on_an_estimator_broken_its_way(contexts, check, cls, message):
    assert CHECK[check].applies(cls)
    with pytest.raises(AssertionError, match=message):
        CHECK[check].run(cls, contexts)


def test_tags_choose_the_checks():
    assert not CHECK["deterministic"].applies(type("S", (Noisy,), {"tags": frozenset({"stochastic"})}))
    assert not CHECK["budget-refusal"].applies(Undocumented) and not CHECK["chunk-invariance"].applies(Noisy)
