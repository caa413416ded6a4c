"""influence-bench: how faithful is a training-data influence estimator?

Sign convention (everywhere): an estimator returns ``I[j, i]``, the predicted change in the loss
of test point j when training point i is removed, ``L(z_j; theta_-i) - L(z_j; theta*)``.
Positive means point i was helping test point j. (docs/protocol.md has the whole protocol.)

The plug-in API (``influence_bench.api``) is this package's public face.
"""

from influence_bench.api import REGISTRY, Context, Estimator, EstimatorError, EstimatorUnsupported, register

__all__ = ["Context", "Estimator", "EstimatorError", "EstimatorUnsupported", "REGISTRY", "register"]
__version__ = "0.1.0"
