"""What a plug-in author touches: ``Estimator`` (subclass it), ``register`` (decorate it),
``Context`` (what ``influence(ctx)`` receives), ``REGISTRY`` and the errors an estimator raises.
Everything here is re-exported by ``influence_bench`` itself."""

from influence_bench.api.context import Context
from influence_bench.api.estimator import Estimator
from influence_bench.api.registry import REGISTRY, register
from influence_bench.errors import EstimatorError, EstimatorUnsupported

__all__ = ["Context", "Estimator", "EstimatorError", "EstimatorUnsupported", "REGISTRY", "register"]
