"""captum 0.9.0 (``captum.influence``) as influence-bench estimators.

What captum ships for training-data influence and what is adapted here:

* ``NaiveInfluenceFunction`` -> ``captum:naive-if`` (method ``exact``): the explicit Hessian;
* ``ArnoldiInfluenceFunction`` -> ``captum:arnoldi`` (method ``arnoldi``). It is *not* exported from
  ``captum.influence`` in 0.9.0; it lives in ``captum.influence._core.arnoldi_influence_function``, where a
  user of captum has to import it from too;
* ``TracInCP`` -> ``captum:tracincp`` and ``TracInCPFast`` -> ``captum:tracincp-fast`` (method ``tracin``).

(``TracInCPFastRandProj`` and ``SimilarityInfluence`` are not adapted: the first is TracInCPFast with a
random projection of its last-layer embeddings, the second a similarity of layer activations, not an
influence estimate.)

Conventions that every adapter below relies on:

* captum's influence scores are dot products ``+g_test . M g_train``: positive when the training point
  helps the test point, as in the protocol, so the sign is ``+1`` throughout (not Koh & Liang's
  ``-g_test H^-1 g_train`` "upweighting" derivative);
* captum's influence functions take the Hessian of the *summed* (per-example, ``reduction="none"``) loss
  over the training set and add their ``hessian_reg`` to it; the adapters pass
  ``hessian_reg = n_train * mean_hessian_damping(ctx, damping)``, so captum's matrix is ``n_train`` times the
  protocol's ``H + damping I`` and its ``g_j^T (n H)^-1 g_i`` already *is* the protocol's
  ``(1/n) g_j^T H^-1 g_i`` (scale 1);
* checkpoints are handed to captum as names (``"theta-star"``, ``"ckpt-0000"`` ...) with a
  ``checkpoints_load_func`` that writes the matching flat parameter vector into the adapter's own copy of
  the model (``module_at_theta``) and returns the learning-rate weight, no files involved;
* captum re-seeds torch's *global* generator in its influence-function constructors
  (``torch.manual_seed(seed)``), and every pass over a ``DataLoader`` draws a seed from it; the adapters run
  captum inside ``torch.random.fork_rng`` so the caller's random state is left as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils import vector_to_parameters

from influence_bench import EstimatorUnsupported, register
from influence_bench_peers.common import (
    PeerEstimator,
    as_protocol,
    loader,
    mean_hessian_damping,
    module_at_theta,
    per_sample_loss,
    require,
    test_set,
    train_set,
    upstream,
)


class _ProtocolLoss(torch.nn.Module):
    """The protocol's per-sample loss (``common.per_sample_loss``) with a ``reduction`` attribute, which captum
    reads to decide how to turn it into per-example gradients and a total (summed) loss: ``"none"`` for the
    influence functions and ``TracInCP`` (per-example autograd), ``"sum"`` for ``TracInCPFast``."""

    def __init__(self, ctx, reduction: str):
        super().__init__()
        self.ctx, self.reduction = ctx, reduction

    def forward(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = per_sample_loss(self.ctx, outputs, y)
        return losses.sum() if self.reduction == "sum" else losses


def _loss(ctx, reduction: str) -> _ProtocolLoss:
    return _ProtocolLoss(ctx, reduction)


def _loader(thetas: dict[str, tuple[torch.Tensor, float]]):
    """captum's ``checkpoints_load_func``: checkpoint name -> (flat parameters, learning-rate weight)."""

    def load(model: torch.nn.Module, name: str) -> float:
        theta, lr = thetas[name]
        with torch.no_grad():
            vector_to_parameters(theta.detach().clone().to(next(model.parameters()).device), model.parameters())
        return float(lr)

    return load


def _rng_fork(ctx):
    devices = [ctx.device.index or 0] if ctx.device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _final_linear(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Linear:
    """The ``nn.Linear`` whose output *is* the model's output (captum's TracInCPFast differentiates the loss
    with respect to the model output and multiplies by that layer's input: any later operation would make
    its score silently wrong, so such a model is refused)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise EstimatorUnsupported("captum's TracInCPFast needs a final nn.Linear layer (final_fc_layer); "
                                   f"the model {type(model).__name__} has none")
    seen = []
    handle = linears[-1].register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    if not seen or seen[-1].shape != out.shape or not torch.equal(seen[-1], out):
        raise EstimatorUnsupported("captum's TracInCPFast needs the model output to be the final nn.Linear's "
                                   f"output; in {type(model).__name__} something follows that layer")
    return linears[-1]


def _test_batch(ctx) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = test_set(ctx).tensors
    return (x, y)


@register
@dataclass
class CaptumNaiveInfluence(PeerEstimator):
    """captum's ``NaiveInfluenceFunction``: the explicit Hessian (``torch.autograd.functional.hessian`` of the
    summed training loss), eigendecomposed; ``H^-1`` is replaced by ``V diag(1/lambda) V^T`` over the top
    ``projection_dim`` eigenpairs whose eigenvalue (after adding ``hessian_reg``) exceeds
    ``hessian_inverse_tol``, and the score is ``g_test^T V diag(1/lambda) V^T g_train``.

    Conversion to the protocol: captum's Hessian is of the *summed* loss, so ``hessian_reg =
    n_train * (weight_decay + damping)`` makes it ``n_train * (H + damping I)`` and the score equals
    ``(1/n) g_j^T (H + damping I)^-1 g_i``: sign +1, scale 1, captum's ``[n_test, n_train]`` as is.

    Hyperparameters (defaults comparable to our ``exact``):
        damping             added to the protocol's H (default 0, as ``exact``); passed as part of
                            ``hessian_reg`` (times n_train).
        projection_dim      eigenpairs kept (default None: all P of them, the whole inverse, as ``exact``).
        hessian_inverse_tol eigenvalues of ``n (H + damping I)`` at or below it are dropped (captum's
                            pseudo-inverse; default 1e-5, captum's). With weight decay the convex settings
                            have none; on a saddle the negative directions are dropped, where ``exact``
                            inverts them (LU).
        max_params          refuse models with more parameters (default 12,000, as ``exact``): captum forms
                            the P x P Hessian and eigendecomposes it with the *general* ``torch.linalg.eig``.
    """

    name = "captum:naive-if"
    library = "captum"
    method = "exact"
    tags = frozenset({"hessian", "second-order"})

    damping: float = 0.0
    projection_dim: int | None = None
    hessian_inverse_tol: float = 1e-5
    max_params: int = 12_000
    seed: int = 42

    def influence(self, ctx):
        if ctx.n_params > self.max_params:
            raise EstimatorUnsupported(
                f"{ctx.n_params} parameters exceed max_params={self.max_params}: captum's NaiveInfluenceFunction "
                "forms and eigendecomposes the P x P Hessian. Use captum:arnoldi, or raise max_params.")
        mod = require("captum", "captum.influence")
        self.record_library()
        model = module_at_theta(ctx)
        k = min(self.projection_dim or ctx.n_params, ctx.n_params)
        reg = ctx.n_train * mean_hessian_damping(ctx, self.damping)
        load = _loader({"theta-star": (ctx.theta, 1.0)})
        with _rng_fork(ctx), upstream("captum", "NaiveInfluenceFunction.__init__"):
            inst = mod.NaiveInfluenceFunction(
                model, loader(train_set(ctx)), "theta-star", checkpoints_load_func=load,
                loss_fn=_loss(ctx, "none"), batch_size=None, sample_wise_grads_per_batch=False,
                projection_dim=k, seed=self.seed, hessian_reg=reg,
                hessian_inverse_tol=self.hessian_inverse_tol, projection_on_cpu=ctx.device.type == "cpu")
        with _rng_fork(ctx), upstream("captum", "NaiveInfluenceFunction.influence"):
            scores = inst.influence(_test_batch(ctx))
        self.diagnostics.update({"rank": int(inst.R.shape[1]), "hessian_reg": reg})
        return as_protocol(scores, ctx, sign=1.0, scale=1.0)


@register
@dataclass
class CaptumArnoldi(PeerEstimator):
    """captum's ``ArnoldiInfluenceFunction`` (Schioppa et al. 2022), imported from
    ``captum.influence._core.arnoldi_influence_function`` (0.9.0 does not export it from
    ``captum.influence``). Arnoldi iteration with Hessian-vector products of the summed training loss from a
    seeded random start, the top ``projection_dim`` eigenpairs of the Krylov restriction plus
    ``hessian_reg`` (above ``hessian_inverse_tol``), score ``g_test^T V diag(1/lambda) V^T g_train``.

    Conversion to the protocol: as ``captum:naive-if``: ``hessian_reg = n_train * (weight_decay + damping)``
    is added to the summed-loss Hessian restricted to the Krylov space (the space itself does not depend
    on a shift), so eigenvalues are ``n (lambda + weight_decay + damping)`` and the score is the protocol's
    ``(1/n) sum_k (g_j . u_k)(g_i . u_k) / (lambda_k + damping)``: sign +1, scale 1.

    Upstream behaviour seen in 0.9.0 (``_parameter_arnoldi`` / ``_parameter_distill``): of ``arnoldi_dim``
    iterations only ``arnoldi_dim - 1`` basis vectors reach the eigendecomposition (the last computed column
    of the Hessenberg matrix is dropped), and when the iteration stops early at ``arnoldi_tol`` one more valid
    vector is lost. The adapter therefore asks for ``arnoldi_dim = min(n_iters, P) + 1`` (the documented
    parameter) and uses ``arnoldi_tol = 0`` by default (no early stop; the documented parameter), so captum
    builds the same ``min(n_iters, P)``-vector basis as our ``arnoldi``. With a positive ``arnoldi_tol`` and
    ``n_iters >= P`` one eigendirection is missing.

    Hyperparameters (defaults as our ``arnoldi``):
        n_iters             Krylov basis size = Hessian-vector products (default 200, capped at P).
        top_p               eigenpairs kept: captum's ``projection_dim`` (default 100). captum keeps the
                            *largest* eigenvalues (positive ones only, above ``hessian_inverse_tol``), ours
                            the largest in magnitude: the same on a convex setting.
        damping             added to the protocol's H (default 0); part of ``hessian_reg`` (times n_train).
        seed                captum's seed of the start vector (default 0).
        arnoldi_tol         captum's early-stop threshold on the residual norm (default 0: none, see above).
        hessian_inverse_tol captum's, on eigenvalues of ``n (H + damping I)`` (default 1e-4, captum's).
        max_basis_mb        refuse when the basis (n_iters x P floats) exceeds it (default 4096 MiB).
    """

    name = "captum:arnoldi"
    library = "captum"
    method = "arnoldi"
    tags = frozenset({"hvp"})

    n_iters: int = 200
    top_p: int = 100
    damping: float = 0.0
    seed: int = 0
    arnoldi_tol: float = 0.0
    hessian_inverse_tol: float = 1e-4
    max_basis_mb: float = 4096.0

    def __post_init__(self):
        if self.n_iters < 1 or self.top_p < 1:
            raise ValueError(f"captum:arnoldi: need n_iters >= 1 and top_p >= 1, got {self.n_iters}, {self.top_p}")

    def influence(self, ctx):
        m = min(self.n_iters, ctx.n_params)
        mb = (m + 1) * ctx.n_params * ctx.theta.element_size() / 2**20
        if mb > self.max_basis_mb:
            raise EstimatorUnsupported(
                f"captum's Arnoldi basis of {m + 1} vectors x {ctx.n_params} parameters needs {mb:.0f} MiB > "
                f"max_basis_mb={self.max_basis_mb:.0f}. Lower n_iters or raise max_basis_mb.")
        mod = require("captum", "captum.influence._core.arnoldi_influence_function")
        self.record_library()
        model = module_at_theta(ctx)
        reg = ctx.n_train * mean_hessian_damping(ctx, self.damping)
        load = _loader({"theta-star": (ctx.theta, 1.0)})
        with _rng_fork(ctx), upstream("captum", "ArnoldiInfluenceFunction.__init__"):
            inst = mod.ArnoldiInfluenceFunction(
                model, loader(train_set(ctx)), "theta-star", checkpoints_load_func=load,
                loss_fn=_loss(ctx, "none"), batch_size=None, sample_wise_grads_per_batch=False,
                projection_dim=min(self.top_p, m), seed=self.seed, arnoldi_dim=m + 1,
                arnoldi_tol=self.arnoldi_tol, hessian_reg=reg, hessian_inverse_tol=self.hessian_inverse_tol,
                projection_on_cpu=ctx.device.type == "cpu")
        with _rng_fork(ctx), upstream("captum", "ArnoldiInfluenceFunction.influence"):
            scores = inst.influence(_test_batch(ctx))
        self.diagnostics.update({"n_iters": m, "rank": len(inst.R), "hessian_reg": reg})
        return as_protocol(scores, ctx, sign=1.0, scale=1.0)


def _checkpoints(ctx, last: int | None, lr: float | None) -> dict[str, tuple[torch.Tensor, float]]:
    ckpts = ctx.checkpoints()
    if last is not None:
        if last < 1:
            raise ValueError(f"last must be >= 1, got {last}")
        ckpts = ckpts[-last:]
    # zero-padded names: captum sorts a list of checkpoint names (natural sort) before using it
    return {f"ckpt-{k:04d}": (theta, float(lr_k if lr is None else lr)) for k, (theta, lr_k) in enumerate(ckpts)}


@register
@dataclass
class CaptumTracInCP(PeerEstimator):
    """captum's ``TracInCP`` over the training run's checkpoints: ``sum_k lr_k g_test(theta_k) . g_i(theta_k)``
    with per-example gradients of all parameters (``reduction="none"`` loss, per-example autograd).

    Checkpoints: ``ctx.checkpoints()`` (oldest first, theta* last), each handed to captum by name with a
    ``checkpoints_load_func`` that loads its parameters and returns its learning-rate weight ``lr_k``: the
    quantity of our ``tracin``.

    Conversion to the protocol: captum sums per-example gradient dot products (Pruthi et al.'s per-example
    SGD TracIn); our ``tracin`` is that divided by n (the objective is the *mean* loss, a full-batch step
    moves theta by ``-(lr/n) g_i`` on account of point i): sign +1, scale ``1/n_train``.

    Hyperparameters (as our ``tracin``):
        last    use only the last ``last`` checkpoints (default all).
        lr      one weight for every checkpoint instead of the recorded ``lr_k`` (default: recorded).
    """

    name = "captum:tracincp"
    library = "captum"
    method = "tracin"
    tags = frozenset({"gradient-only", "checkpoints"})

    last: int | None = None
    lr: float | None = None

    def influence(self, ctx):
        mod = require("captum", "captum.influence")
        self.record_library()
        thetas = _checkpoints(ctx, self.last, self.lr)
        model = module_at_theta(ctx)
        with _rng_fork(ctx), upstream("captum", "TracInCP.__init__"):
            inst = mod.TracInCP(model, loader(train_set(ctx)), list(thetas), checkpoints_load_func=_loader(thetas),
                                loss_fn=_loss(ctx, "none"), batch_size=None, sample_wise_grads_per_batch=False)
        with _rng_fork(ctx), upstream("captum", "TracInCP.influence"):
            scores = inst.influence(_test_batch(ctx))
        self.diagnostics.update({"n_checkpoints": len(thetas), "lr_weights": [w for _, w in thetas.values()]})
        return as_protocol(scores, ctx, sign=1.0, scale=1.0 / ctx.n_train)


@register
@dataclass
class CaptumTracInCPFast(PeerEstimator):
    """captum's ``TracInCPFast``: TracInCP restricted to the *weight* of the final ``nn.Linear`` layer
    (``final_fc_layer``), computed without parameter gradients as
    ``sum_k lr_k (dL_j/dout . dL_i/dout) (a_j . a_i)`` (``a``: the layer's input). The final layer's *bias*
    gradient (``dL/dout`` itself) is not part of captum's score. It is therefore neither our ``tracin`` (all
    parameters) nor our ``last-layer`` (final layer, with the inverse Hessian): on logistic regression it is
    our ``tracin`` without the bias terms; on an MLP it is ``tracin`` over the final weight only.

    Checkpoints, learning-rate weights and the conversion as ``captum:tracincp`` (captum requires a "sum" or
    "mean" loss here; the adapter gives it the protocol's loss with ``reduction="sum"``, so each row of the
    output Jacobian is one example's gradient): sign +1, scale ``1/n_train``.

    Hyperparameters: ``last``, ``lr`` as our ``tracin``.
    """

    name = "captum:tracincp-fast"
    library = "captum"
    method = "tracin-final-weight"  # not our tracin's quantity: `bench methods` must not time one against the other
    tags = frozenset({"gradient-only", "checkpoints", "last-layer"})

    last: int | None = None
    lr: float | None = None

    def influence(self, ctx):
        mod = require("captum", "captum.influence")
        self.record_library()
        thetas = _checkpoints(ctx, self.last, self.lr)
        model = module_at_theta(ctx)
        layer = _final_linear(model, ctx.x_test[:2].to(ctx.device, ctx.dtype))
        with _rng_fork(ctx), upstream("captum", "TracInCPFast.__init__"):
            inst = mod.TracInCPFast(model, layer, loader(train_set(ctx)), list(thetas),
                                    checkpoints_load_func=_loader(thetas), loss_fn=_loss(ctx, "sum"), batch_size=None)
        with _rng_fork(ctx), upstream("captum", "TracInCPFast.influence"):
            scores = inst.influence(_test_batch(ctx))
        self.diagnostics.update({"n_checkpoints": len(thetas), "layer_weight_params": layer.weight.numel(),
                                 "lr_weights": [w for _, w in thetas.values()]})
        return as_protocol(scores, ctx, sign=1.0, scale=1.0 / ctx.n_train)
