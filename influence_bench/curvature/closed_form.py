"""Which hand-written batched closed form a model has (``objective`` / ``grads`` / ``hvps`` /
``hvp_operator`` over ``[B, P]`` parameters and ``[B, n]`` weights, one chain of matmuls for all
models): ``linear`` for softmax-linear models, ``mlp`` for tanh MLPs, None for the rest (vmap then)."""

from __future__ import annotations

from types import ModuleType

from influence_bench.curvature import linear, mlp
from influence_bench.models.flat import FlatModel


def closed_form(fm: FlatModel) -> ModuleType | None:
    return next((m for m in (linear, mlp) if m.applies(fm)), None)
