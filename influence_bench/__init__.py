"""influence-bench: how faithful is a training-data influence estimator?

Sign convention (everywhere): an estimator returns ``I[j, i]``, the predicted change in the loss
of test point j when training point i is removed, ``L(z_j; theta_-i) - L(z_j; theta*)``.
Positive means point i was helping test point j. (docs/protocol.md has the whole protocol.)

The plug-in API (``influence_bench.api``) is this package's public face.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from influence_bench.errors import EstimatorError, EstimatorUnsupported, RegistryError
from influence_bench.lazy import lazy_names

if TYPE_CHECKING:  # pragma: no cover
    from influence_bench.api import REGISTRY, Context, Estimator, register

__version__ = "0.1.0"

# loaded on first use (PEP 562): `import influence_bench` and the command line's --help and `list`
# do not import torch
_LAZY = {"Context": "influence_bench.api", "Estimator": "influence_bench.api", "REGISTRY": "influence_bench.api",
         "register": "influence_bench.api", "score": "influence_bench.python_api",
         "load_runs": "influence_bench.python_api"}

__all__ = ["Context", "Estimator", "EstimatorError", "EstimatorUnsupported", "REGISTRY", "RegistryError",
           "load_runs", "register", "score", "__version__"]


__getattr__, __dir__ = lazy_names(globals(), _LAZY)
