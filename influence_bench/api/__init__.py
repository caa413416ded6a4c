"""What a plug-in author touches: ``Estimator`` (subclass it), ``register`` (decorate it),
``Context`` (what ``influence(ctx)`` receives), ``REGISTRY`` and the errors an estimator raises.
Everything here is re-exported by ``influence_bench`` itself.

The names are loaded on first use (PEP 562), so importing a torch-free part of the package (the
command line's ``--help``, ``list``, reading run files) does not import torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from influence_bench.errors import EstimatorError, EstimatorUnsupported
from influence_bench.lazy import lazy_names

if TYPE_CHECKING:  # pragma: no cover
    from influence_bench.api.context import Context
    from influence_bench.api.estimator import Estimator
    from influence_bench.api.registry import REGISTRY, register

_LAZY = {"Context": "influence_bench.api.context", "Estimator": "influence_bench.api.estimator",
         "REGISTRY": "influence_bench.api.registry", "register": "influence_bench.api.registry"}

__all__ = ["Context", "Estimator", "EstimatorError", "EstimatorUnsupported", "REGISTRY", "register"]


__getattr__, __dir__ = lazy_names(globals(), _LAZY)
