"""The errors an estimator raises (re-exported by ``influence_bench`` and ``influence_bench.api``):
the lowest layer, so curvature helpers can refuse a model without importing the plug-in API."""

from __future__ import annotations


class EstimatorError(RuntimeError):
    """An estimator failed or returned something unusable; the message names estimator and setting."""


class EstimatorUnsupported(RuntimeError):
    """An estimator refuses a setting up front (model too large, layer type unsupported, ...).

    Raised inside ``influence``; the suites record the case as skipped with this message.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread while a run can still save what it finished (``score``):
    a ``KeyboardInterrupt``, so every guard that lets Ctrl-C through lets it through too."""


class RegistryError(LookupError):
    """An estimator that cannot be had: an unknown name, a plug-in that failed to load, a bad spec or
    hyperparameter (``api/registry.py``, ``api/arguments.py``)."""
