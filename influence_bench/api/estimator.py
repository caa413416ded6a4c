"""The estimator plug-in API.

An estimator is a small class with a ``name``, a few capability tags and one method,
``influence(ctx)``, returning the ``[n_test, n_train]`` matrix of predicted changes in test loss
when each training point is removed (the sign convention of docs/protocol.md)::

    I[j, i] ~= L(z_j; theta_{-i}) - L(z_j; theta*)     # positive: point i was helping test point j

First-order influence functions give ``I[j, i] = (1/n) grad L(z_j)^T H^-1 grad L(z_i)``.
Hyperparameters are dataclass fields with defaults; ``diagnostics`` is recorded with the results.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from influence_bench.errors import EstimatorError, EstimatorUnsupported  # noqa: F401

if TYPE_CHECKING:
    from influence_bench.api.context import Context


class Estimator:
    """Base class. Subclass it as a dataclass, set ``name``, implement ``influence``."""

    name: ClassVar[str] = ""
    #: capability tags, e.g. {"hessian"}, {"stochastic"}, {"gradient-only"}, and claims the floors
    #: hold an estimator to whatever its name: ``"second-order"`` declares that it computes (or
    #: converges to) the whole model's inverse-Hessian (or Gauss-Newton) influence function, so it
    #: must reach the convex floors on logistic regression (``spec/thresholds.toml``)
    tags: ClassVar[frozenset[str]] = frozenset()
    #: this estimator's own limits on one ``influence`` call (``None``: the harness default, see
    #: ``scoring/isolation.py``); ``--time-limit NAME=SECONDS`` / ``--memory-limit NAME=MB`` override
    time_limit_s: ClassVar[float | None] = None
    memory_limit_mb: ClassVar[float | None] = None
    #: the method this class implements (``exact``, ``cg``, ``lissa``, ``arnoldi``, ``ekfac``, ``tracin``,
    #: ``trak``...), so a report can put implementations of one method side by side; "" means its name
    method: ClassVar[str] = ""
    #: run only when named (``--estimator 'dattri:*'``), not in the default "every registered estimator"
    #: of ``pytest suites``, the checks and the benchmarks (peer-library adapters set it)
    opt_in: ClassVar[bool] = False

    def __init__(self) -> None:  # dataclass subclasses generate their own
        pass

    def influence(self, ctx: "Context") -> torch.Tensor:
        raise NotImplementedError(f"estimator {self.name!r} does not implement influence(ctx)")

    # ---- bookkeeping, not for overriding -------------------------------------------------
    @property
    def diagnostics(self) -> dict[str, Any]:
        if "_diagnostics" not in self.__dict__:
            self.__dict__["_diagnostics"] = {}
        return self.__dict__["_diagnostics"]

    def hyperparameters(self) -> dict[str, Any]:
        if dataclasses.is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {}

    @property
    def stochastic(self) -> bool:
        return "stochastic" in self.tags


def check_output(value: Any, estimator: str, setting: str, shape: tuple[int, int],
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Validate an estimator's return value; raise ``EstimatorError`` saying exactly what is wrong.
    ``device``: the context's device, where the matrix must be (a ``meta`` tensor has no values)."""
    where = f"estimator {estimator!r} on setting {setting!r}"
    if not isinstance(value, torch.Tensor):
        raise EstimatorError(f"{where} returned {type(value).__name__}, expected a torch.Tensor of shape {shape}")
    if value.layout != torch.strided:
        raise EstimatorError(f"{where} returned a {value.layout} tensor, expected a dense (strided) one")
    if device is not None and value.device.type != torch.device(device).type or value.device.type == "meta":
        raise EstimatorError(f"{where} returned a tensor on {value.device}, expected one on the context's device "
                             f"({device})")
    if not value.is_floating_point():
        raise EstimatorError(f"{where} returned dtype {value.dtype}, expected a floating-point tensor")
    if tuple(value.shape) != tuple(shape):
        raise EstimatorError(f"{where} returned shape {tuple(value.shape)}, expected [n_test, n_train] = {shape}")
    bad = ~torch.isfinite(value)
    if bool(bad.any()):
        raise EstimatorError(f"{where} returned {int(bad.sum())} non-finite values (NaN/Inf) of {value.numel()}")
    return value.detach().to("cpu", torch.float64)
