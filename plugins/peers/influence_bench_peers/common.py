"""What every peer adapter shares: its library (imported when an estimator runs, never at registration,
so ``influence-bench list estimators`` works without the libraries), θ* in a module of the library's
liking, the data as loaders, the loss of the protocol, and the library's failures as clear errors.

The protocol (influence_bench's docs/protocol.md): an estimator returns ``I[n_test, n_train]`` with

    I[j, i] ~= L(z_j; theta_{-i}) - L(z_j; theta*)  ~=  (1/n) g_j^T H^-1 g_i

positive when training point i *helps* test point j, ``H`` the Hessian of the *mean* training loss plus
``weight_decay * I`` (the objective is mean loss + weight_decay/2 ||theta||^2). Libraries differ in
sign (captum, dattri and pyDVL report -I or the "upweighting" derivative), in summed against mean loss
(a factor n in H and in the 1/n) and in where the damping goes; each adapter says which conversion it
applies, and ``plugins/peers/tests`` check it against ``exact`` on the convex settings (slope 1 within 5%).
"""

from __future__ import annotations

import copy
import importlib
from importlib import metadata
from typing import ClassVar

import torch
from torch.nn.utils import vector_to_parameters

from influence_bench import Estimator, EstimatorError, EstimatorUnsupported

#: library -> (import name, distribution name, how to install it)
LIBRARIES = {
    "captum": ("captum", "captum", "pip install 'influence-bench-peers[captum]'"),
    "kronfluence": ("kronfluence", "kronfluence", "pip install 'influence-bench-peers[kronfluence]'"),
    "dattri": ("dattri", "dattri", "pip install 'influence-bench-peers[dattri]'"),
    "pydvl": ("pydvl", "pyDVL", "pip install 'influence-bench-peers[pydvl]' && pip install --no-deps pydvl==0.10.0"),
}


def library_version(library: str) -> str | None:
    try:
        return metadata.version(LIBRARIES[library][1])
    except metadata.PackageNotFoundError:
        return None


def require(library: str, module: str | None = None):
    """Import ``module`` (default: the library's top package); a missing library is an ``EstimatorError``
    that says how to install it (the case is an error, never a silent skip)."""
    top, _, how = LIBRARIES[library]
    try:
        return importlib.import_module(module or top)
    except ImportError as exc:
        version = library_version(library)
        if version is None:
            raise EstimatorError(f"{library} is not installed; install it with: {how}") from exc
        raise EstimatorError(f"{library} {version} does not import ({type(exc).__name__}: {exc})") from exc


class upstream:
    """``with upstream(library, what):`` runs the library's code: any exception of it becomes an
    ``EstimatorError`` naming the library, its version, the call and the library's own message (an
    upstream defect is reported, not hidden). A class, not ``contextlib.contextmanager``: that one
    hands a ``StopIteration`` raised inside the block back unchanged when it is converted."""

    def __init__(self, library: str, what: str) -> None:
        self.library, self.what = library, what
        self._tqdm_init = None

    def __enter__(self) -> "upstream":
        try:  # the libraries' progress bars (dattri's, pyDVL's) would fill the harness's terminal
            import functools

            import tqdm
        except ImportError:
            return self
        self._tqdm_init = tqdm.tqdm.__init__
        tqdm.tqdm.__init__ = functools.partialmethod(self._tqdm_init, disable=True)
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if self._tqdm_init is not None:
            import tqdm

            tqdm.tqdm.__init__, self._tqdm_init = self._tqdm_init, None
        if exc is None or isinstance(exc, (EstimatorError, EstimatorUnsupported)) or not isinstance(exc, Exception):
            return False  # ours, or KeyboardInterrupt / SystemExit: pass through
        message = " ".join(str(exc).split())
        if len(message) > 400:
            message = message[:400] + " ..."
        raise EstimatorError(f"{self.library} {library_version(self.library)} failed in {self.what}: "
                             f"{type(exc).__name__}: {message}") from exc


class PeerEstimator(Estimator):
    """An adapter: ``library`` names the library (key of ``LIBRARIES``), ``method`` the method it implements
    (the report groups implementations of one method). Peer adapters are run only when named
    (``opt_in``): ``influence-bench score 'dattri:*'``, ``pytest suites --estimator 'captum:*'``."""

    library: ClassVar[str] = ""
    opt_in: ClassVar[bool] = True

    def record_library(self) -> None:
        self.diagnostics["library"] = f"{self.library} {library_version(self.library)}"


def module_at_theta(ctx) -> torch.nn.Module:
    """A copy of the setting's module holding θ* (the context's own module is never touched), in eval
    mode, parameters requiring grad, in the context's dtype and on its device."""
    module = copy.deepcopy(ctx.model).to(device=ctx.device, dtype=ctx.dtype)
    with torch.no_grad():
        vector_to_parameters(ctx.theta.detach().clone().to(ctx.device), module.parameters())
    for p in module.parameters():
        p.requires_grad_(True)
    return module.eval()


def loss_name(ctx) -> str:
    return ctx.fm.loss


def per_sample_loss(ctx, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The protocol's per-sample loss: softmax cross-entropy, or ``0.5 * ||out - y||^2``."""
    from influence_bench.curvature.products import loss_from_outputs

    return loss_from_outputs(loss_name(ctx), outputs, y)


def mean_loss(ctx, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return per_sample_loss(ctx, outputs, y).mean()


def sum_loss(ctx, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return per_sample_loss(ctx, outputs, y).sum()


def train_set(ctx) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(ctx.x_train.to(ctx.device), ctx.y_train.to(ctx.device))


def test_set(ctx) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(ctx.x_test.to(ctx.device), ctx.y_test.to(ctx.device))


def loader(dataset, batch_size: int | None = None) -> torch.utils.data.DataLoader:
    """In order, never shuffled (row i of the result is training point i); ``None``: one batch."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size or len(dataset), shuffle=False)


def mean_hessian_damping(ctx, damping: float = 0.0) -> float:
    """The damping a library must add to the Hessian of the *mean* (unregularised) loss for it to be the
    protocol's ``H + damping I``: the weight decay plus the estimator's own damping. A library working on
    the *summed* loss needs ``n_train`` times it."""
    return float(ctx.weight_decay) + float(damping)


def as_protocol(scores, ctx, *, sign: float, scale: float, transpose: bool = False) -> torch.Tensor:
    """``sign * scale * scores`` as the protocol's ``[n_test, n_train]`` float64 matrix on the context's
    device; ``transpose``: the library returned ``[n_train, n_test]``."""
    t = torch.as_tensor(scores).detach()
    if transpose:
        t = t.T
    return (sign * scale) * t.to(device=ctx.device, dtype=torch.float64).contiguous()
