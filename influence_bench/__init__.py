"""influence-bench: how faithful is a training-data influence estimator?

Sign convention (everywhere): an estimator returns ``I[j, i]``, the predicted change in the loss
of test point j when training point i is removed, ``L(z_j; theta_-i) - L(z_j; theta*)``.
Positive means point i was helping test point j.
"""

from .context import Context
from .estimator import Estimator, EstimatorError, EstimatorUnsupported
from .registry import REGISTRY, register

__all__ = ["Context", "Estimator", "EstimatorError", "EstimatorUnsupported", "REGISTRY", "register"]
__version__ = "0.1.0"
