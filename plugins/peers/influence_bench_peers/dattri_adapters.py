"""dattri (0.3.0) estimators as influence-bench plug-ins: ``dattri:explicit``, ``dattri:cg``, ``dattri:lissa``,
``dattri:arnoldi``, ``dattri:ekfac``, ``dattri:tracin``, ``dattri:trak``.

Common to all of them (see ``common.py`` for the protocol):

* the model is ``module_at_theta(ctx)`` (a copy at theta*, the context's dtype: float64 on the smoke settings);
  dattri's ``AttributionTask`` gets it with its state dict(s) as checkpoint(s) and a functional loss
  ``loss_func(params, (x, y))`` = the protocol's per-sample loss *averaged* over the batch it is given
  (``torch.func.functional_call``). dattri calls it on the whole training set (one batch: the Hessian
  of the *mean* training loss), on one sample with a batch axis of 1 (the influence functions' per-sample
  gradients) or on one sample without a batch axis (TracIn, TRAK, which ``vmap`` over axis 0): a missing
  batch axis is added back.
* dattri's ``attribute`` returns ``[n_train, n_test]``: transposed. Its result buffer is created in torch's
  default dtype (float32), whatever the model's: results carry float32 rounding (~1e-7 relative).
* The influence-function attributors return ``g_train^T (H_mean + regularization I)^-1 g_test`` with the
  gradients of the per-sample loss: that is ``n`` times the protocol's ``I`` with the same sign (dattri's
  score is positive when the training point helps). So ``sign=+1, scale=1/n`` and ``regularization =
  weight_decay + damping`` (``mean_hessian_damping``): the loss given to dattri has no weight-decay term,
  the protocol's ``H`` has it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.nn.utils import vector_to_parameters

from influence_bench import EstimatorError, EstimatorUnsupported, register
from influence_bench_peers.common import (
    PeerEstimator,
    as_protocol,
    library_version,
    loader,
    loss_name,
    mean_hessian_damping,
    mean_loss,
    module_at_theta,
    require,
    test_set,
    train_set,
    upstream,
)


def _loss_func(ctx, module):
    """dattri's functional loss: the protocol's loss averaged over the given samples (a sample without a
    batch axis, as TracIn/TRAK pass it, gets one). Class labels are read as class indices (``long``):
    dattri's LiSSA collate function casts every data tensor to float (its documented behaviour)."""
    batched_ndim = ctx.x_train.dim()
    cross_entropy = loss_name(ctx) == "cross_entropy"

    def loss_func(params, data):
        x, y = data
        if x.dim() == batched_ndim - 1:
            x, y = x[None], y[None]
        if cross_entropy:
            y = y.long()
        out = torch.func.functional_call(module, params, (x,))
        return mean_loss(ctx, out, y)

    return loss_func


def _state_at(module, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state dict of ``module`` holding ``theta`` (a copy; ``module`` is untouched)."""
    m = copy.deepcopy(module)
    with torch.no_grad():
        vector_to_parameters(theta.detach().clone().to(next(m.parameters()).device,
                                                      next(m.parameters()).dtype), m.parameters())
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _task(ctx, module, loss_func=None, checkpoints=None, target_func=None):
    task_mod = require("dattri", "dattri.task")
    if checkpoints is None:
        checkpoints = {k: v.detach().clone() for k, v in module.state_dict().items()}
    with upstream("dattri", "AttributionTask.__init__"):
        return task_mod.AttributionTask(loss_func=loss_func or _loss_func(ctx, module), model=module,
                                        checkpoints=checkpoints, target_func=target_func)


def _call(what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` inside ``upstream``; a ``StopIteration`` of the library is re-raised as a
    ``RuntimeError`` first (a generator-based context manager cannot turn a StopIteration into its error)."""
    with upstream("dattri", what):
        try:
            return fn(*args, **kwargs)
        except StopIteration as exc:
            raise RuntimeError(f"StopIteration {exc}".strip()) from exc


def _device(ctx) -> str:
    return str(ctx.device)


def _if_scores(ctx, attributor, what: str, train_batch: int | None = None, dtype=None):
    """cache() on the whole training set as one batch (the Hessian of the mean loss), then attribute."""
    train, test = train_set(ctx), test_set(ctx)
    if dtype is not None:
        train = torch.utils.data.TensorDataset(*(t.to(dtype) if t.is_floating_point() else t for t in train.tensors))
        test = torch.utils.data.TensorDataset(*(t.to(dtype) if t.is_floating_point() else t for t in test.tensors))
    _call(f"{what}.cache", attributor.cache, loader(train))
    return _call(f"{what}.attribute", attributor.attribute, loader(train, train_batch), loader(test))


@register
@dataclass
class DattriExplicit(PeerEstimator):
    """dattri's ``IFAttributorExplicit``: the explicit Hessian of the loss dattri is given, inverted.

    Conversion: dattri returns ``S[i, j] = g_i^T (H_mean + regularization I)^-1 g_j``, ``[n_train, n_test]``;
    ``regularization = weight_decay + damping`` makes ``H_mean + regularization I`` the protocol's ``H +
    damping I``; ``I = S^T / n`` (``sign=+1``, ``scale=1/n``, transposed).

    Hyperparameters:
        damping     added to the protocol's H (default 0, as ``exact``).
        max_params  refuse models with more parameters (default 12,000, as ``exact``).
    """

    name = "dattri:explicit"
    library = "dattri"
    method = "exact"
    tags = frozenset({"hessian", "second-order"})

    damping: float = 0.0
    max_params: int = 12_000

    def influence(self, ctx):
        if ctx.n_params > self.max_params:
            raise EstimatorUnsupported(f"{ctx.n_params} parameters exceed max_params={self.max_params} (the explicit "
                                       "Hessian); use dattri:cg")
        mod = require("dattri", "dattri.algorithm.influence_function")
        self.record_library()
        module = module_at_theta(ctx)
        task = _task(ctx, module)
        reg = mean_hessian_damping(ctx, self.damping)
        with upstream("dattri", "IFAttributorExplicit.__init__"):
            att = mod.IFAttributorExplicit(task=task, device=_device(ctx), regularization=reg)
        S = _if_scores(ctx, att, "IFAttributorExplicit")
        self.diagnostics["regularization"] = reg
        return as_protocol(S, ctx, sign=1.0, scale=1.0 / ctx.n_train, transpose=True)


@register
@dataclass
class DattriCG(PeerEstimator):
    """dattri's ``IFAttributorCG``: ``(H_mean + regularization I)^-1 g_test`` by conjugate gradient.

    Conversion as ``dattri:explicit``: ``regularization = weight_decay + damping``, ``I = S^T / n``.

    Hyperparameters:
        damping   added to the protocol's H (default 0, as ``cg``).
        max_iter  CG iterations (dattri's ``max_iter``; default 50, see ``tol``; ``cg`` caps at 1000 and stops
                  at a relative residual of 1e-5).
        tol       dattri's ``tol`` (default 1e-10). Upstream defect (dattri 0.3.0): ``ihvp_cg`` ignores it (a
                  TODO: no early exit under ``vmap``) and always runs ``max_iter`` iterations; once the residual
                  has vanished (after about P steps in float64) the next step divides 0/0 and the scores are NaN.
                  The adapter reports that as an ``EstimatorError`` naming dattri; hence the default
                  ``max_iter=50`` (enough for the smoke settings' convex models, P <= 50 on iris).
        mode      dattri's autodiff mode for the products (default "rev-rev").
    """

    name = "dattri:cg"
    library = "dattri"
    method = "cg"
    tags = frozenset({"hvp", "second-order"})

    damping: float = 0.0
    max_iter: int = 50
    tol: float = 1e-10
    mode: str = "rev-rev"

    def influence(self, ctx):
        mod = require("dattri", "dattri.algorithm.influence_function")
        self.record_library()
        module = module_at_theta(ctx)
        task = _task(ctx, module)
        reg = mean_hessian_damping(ctx, self.damping)
        with upstream("dattri", "IFAttributorCG.__init__"):
            att = mod.IFAttributorCG(task=task, device=_device(ctx), max_iter=self.max_iter, tol=self.tol,
                                     mode=self.mode, regularization=reg)
        S = _if_scores(ctx, att, "IFAttributorCG")
        bad = int((~torch.isfinite(S)).sum())
        if bad:
            raise EstimatorError(
                f"dattri {library_version('dattri')} IFAttributorCG returned {bad} non-finite values (NaN/Inf) of "
                f"{S.numel()} with max_iter={self.max_iter}: its ihvp_cg ignores tol and always runs max_iter "
                "iterations, dividing 0/0 once the residual has vanished; use a smaller max_iter")
        self.diagnostics["regularization"] = reg
        return as_protocol(S, ctx, sign=1.0, scale=1.0 / ctx.n_train, transpose=True)


def _float32_capable_task(est, ctx):
    """(dattri's influence_function module, θ* in a module, its task) for an estimator with a ``dtype``
    field: "context" keeps the context's dtype, "float32" runs a float32 copy (dattri 0.3.0's LiSSA and
    Arnoldi work in float32 only)."""
    if est.dtype not in ("context", "float32"):
        raise ValueError(f"{est.name}: dtype must be 'context' or 'float32', got {est.dtype!r}")
    mod = require("dattri", "dattri.algorithm.influence_function")
    est.record_library()
    module = module_at_theta(ctx)
    if est.dtype == "float32":
        module = module.float()
    return mod, module, _task(ctx, module)


@register
@dataclass
class DattriLiSSA(PeerEstimator):
    """dattri's ``IFAttributorLiSSA``: Koh & Liang's recursion ``h <- v + (1 - d) h - H_B h / s`` on random
    mini-batches ``B``, ``A^-1 v ~= h / s`` with ``A = H_mean + s d I``.

    Conversion: dattri's ``damping`` ``d`` is ``(weight_decay + damping) / scaling`` so that ``A`` is the
    protocol's ``H + damping I``; then as ``dattri:explicit``: ``I = S^T / n``.

    Upstream defect (dattri 0.3.0): the attributor's collate function casts every data tensor to float32
    (``sampled_input[i].float()``), so with a float64 model (the context's dtype, the default here) the
    Hessian-vector products fail on a dtype mismatch; the adapter reports it (``EstimatorError``).
    ``dtype="float32"`` runs the model and the data in float32, the dtype that collate function assumes
    (the labels are read back as class indices by the loss).

    Hyperparameters:
        damping      added to the protocol's H (default 0, as ``lissa``).
        scaling      dattri's ``scaling`` (``lissa``'s ``scale``; must exceed lambda_max(H)/2; default 10).
        recursion_depth  default 2000 (``lissa``'s ``depth``).
        batch_size   training points per product (default 128, as ``lissa``).
        num_repeat   default 1 (``lissa``'s ``repeats``).
        dtype        "context" (default: the context's dtype, faithful) or "float32".
    """

    name = "dattri:lissa"
    library = "dattri"
    method = "lissa"
    tags = frozenset({"hvp", "stochastic", "second-order"})

    damping: float = 0.0
    scaling: float = 10.0
    recursion_depth: int = 2000
    batch_size: int = 128
    num_repeat: int = 1
    dtype: str = "context"

    def influence(self, ctx):
        mod, module, task = _float32_capable_task(self, ctx)
        d = mean_hessian_damping(ctx, self.damping) / self.scaling
        with upstream("dattri", "IFAttributorLiSSA.__init__"):
            att = mod.IFAttributorLiSSA(task=task, device=_device(ctx), batch_size=min(self.batch_size, ctx.n_train),
                                        num_repeat=self.num_repeat, recursion_depth=self.recursion_depth,
                                        damping=d, scaling=self.scaling)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # dattri samples the batches from the global generator
            S = _if_scores(ctx, att, "IFAttributorLiSSA", dtype=torch.float32 if self.dtype == "float32" else None)
        self.diagnostics.update({"dattri_damping": d, "model_dtype": str(next(module.parameters()).dtype)})
        return as_protocol(S, ctx, sign=1.0, scale=1.0 / ctx.n_train, transpose=True)


@register
@dataclass
class DattriArnoldi(PeerEstimator):
    """dattri's ``IFAttributorArnoldi``: the top ``proj_dim`` Ritz pairs ``(lambda_k, u_k)`` of ``H_mean +
    regularization I`` from ``max_iter`` Arnoldi steps; train and test gradients are projected onto
    ``u_k / sqrt(lambda_k)``, ``S[i, j] = sum_k (g_i . u_k)(g_j . u_k) / lambda_k``.

    Conversion as ``dattri:explicit``: ``regularization = weight_decay + damping``, ``I = S^T / n``.

    Hyperparameters:
        damping   added to the protocol's H (default 0, as ``arnoldi``).
        proj_dim  Ritz pairs kept (default 100 = ``arnoldi``'s ``top_p``).
        max_iter  Arnoldi steps (default 200 = ``arnoldi``'s ``n_iters``).
        seed      dattri's seed of the start vector.
        dtype     "context" (default: the context's dtype, faithful) or "float32".

    Upstream defect (dattri 0.3.0): ``ArnoldiProjector`` draws its start vector and its Hessenberg matrix in
    float32 (``torch.rand(feature_dim)``, ``torch.zeros(...)``), so with a float64 model (the default here)
    the iteration fails on a dtype mismatch; the adapter reports it (``EstimatorError``). ``dtype="float32"``
    runs the model and data in float32, the dtype the projector assumes.
    """

    name = "dattri:arnoldi"
    library = "dattri"
    method = "arnoldi"
    tags = frozenset({"hvp"})

    damping: float = 0.0
    proj_dim: int = 100
    max_iter: int = 200
    seed: int = 0
    dtype: str = "context"

    def influence(self, ctx):
        mod, module, task = _float32_capable_task(self, ctx)
        reg = mean_hessian_damping(ctx, self.damping)
        with upstream("dattri", "IFAttributorArnoldi.__init__"):
            att = mod.IFAttributorArnoldi(task=task, device=_device(ctx), proj_dim=min(self.proj_dim, ctx.n_params),
                                          max_iter=self.max_iter, regularization=reg, seed=self.seed)
        with torch.random.fork_rng(devices=[]):  # dattri seeds the global generator for its start vector
            S = _if_scores(ctx, att, "IFAttributorArnoldi", dtype=torch.float32 if self.dtype == "float32" else None)
        self.diagnostics["regularization"] = reg
        return as_protocol(S, ctx, sign=1.0, scale=1.0 / ctx.n_train, transpose=True)


@register
@dataclass
class DattriEKFAC(PeerEstimator):
    """dattri's ``IFAttributorEKFAC``: EK-FAC of the *empirical* Fisher (the true labels' gradients) of every
    ``nn.Linear`` layer, corrected eigenvalues ``lambda`` of the mean loss; ``ifvp = Q_S^T ((Q_S V Q_A^T) /
    (lambda + damping)) Q_A``.

    Conversion: dattri's ``damping = weight_decay + damping`` (added to the mean-loss eigenvalues, as
    ``ekfac`` adds it), ``I = S^T / n``, ``sign=+1``. Models with layers other than ``nn.Linear`` holding
    parameters are unsupported (dattri's EK-FAC covers only the modules it hooks).

    Upstream defect (dattri 0.3.0): for a layer with a bias, ``transform_test_rep`` concatenates the
    flattened weight gradient and the bias gradient and reshapes the result to ``[out, in + 1]``
    (``torch.cat([w.flatten(1), b.flatten(1)]).reshape(-1, out, in + 1)``) instead of appending the bias
    as the last column, so the weight and bias entries are mixed up -- a silently wrong preconditioner,
    not a crash: on ``iris-logreg`` the scores' slope against ``ekfac`` is off (see the tests).

    A model that is a bare ``nn.Linear`` is wrapped in ``nn.Sequential`` (same parameters in the same order):
    dattri names a module's parameters ``module_name + ".weight"``, which for the root module (name ``""``)
    selects no parameter at all (dattri 0.3.0 then fails with a ``StopIteration`` in ``flatten_params``);
    dattri documents ``module_name`` as keys of ``model.named_modules()`` of a container model.

    Hyperparameters:
        damping: added to the weight decay on every corrected eigenvalue (default 0, as ``ekfac``).
    """

    name = "dattri:ekfac"
    library = "dattri"
    method = "ekfac"
    tags = frozenset({"curvature-approximation"})

    damping: float = 0.0

    def influence(self, ctx):
        module = module_at_theta(ctx)
        others = [type(m).__name__ for m in module.modules()
                  if not isinstance(m, torch.nn.Linear) and any(True for _ in m.parameters(recurse=False))]
        if others:
            raise EstimatorUnsupported(f"dattri's EK-FAC covers nn.Linear layers only; this model has parameters "
                                       f"in {sorted(set(others))}")
        mod = require("dattri", "dattri.algorithm.influence_function")
        self.record_library()
        if isinstance(module, torch.nn.Linear):
            module = torch.nn.Sequential(module)  # same parameters, same order; named "0.weight", "0.bias"
        task = _task(ctx, module)
        reg = mean_hessian_damping(ctx, self.damping)
        with upstream("dattri", "IFAttributorEKFAC.__init__"):
            att = mod.IFAttributorEKFAC(task=task, device=_device(ctx), damping=reg)
        S = _if_scores(ctx, att, "IFAttributorEKFAC")
        self.diagnostics["damping"] = reg
        return as_protocol(S, ctx, sign=1.0, scale=1.0 / ctx.n_train, transpose=True)


@register
@dataclass
class DattriTracIn(PeerEstimator):
    """dattri's ``TracInAttributor``: ``S[i, j] = sum_k w_k g_i(theta_k) . g_j(theta_k)`` over checkpoints.

    Checkpoints and weights ``w_k`` are ``ctx.checkpoints()`` and their recorded ``lr_k`` (as ``tracin``);
    the gradients are projected by dattri's random projector, here ``proj_type="identity"`` (no projection,
    as ``tracin``). Conversion: ``I = S^T / n`` (the ``1/n`` of the mean objective, see ``tracin``), sign +1.

    Hyperparameters:
        last: use only the last ``last`` checkpoints (default all, as ``tracin``).
    """

    name = "dattri:tracin"
    library = "dattri"
    method = "tracin"
    tags = frozenset({"gradient-only", "checkpoints"})

    last: int | None = None

    def influence(self, ctx):
        mod = require("dattri", "dattri.algorithm.tracin")
        self.record_library()
        ckpts = ctx.checkpoints()
        if self.last is not None:
            if self.last < 1:
                raise ValueError(f"last must be >= 1, got {self.last}")
            ckpts = ckpts[-self.last:]
        module = module_at_theta(ctx)
        states = [_state_at(module, theta) for theta, _ in ckpts]
        weights = torch.tensor([float(lr) for _, lr in ckpts], dtype=torch.float64)
        task = _task(ctx, module, checkpoints=states)
        with upstream("dattri", "TracInAttributor.__init__"):
            att = mod.TracInAttributor(task=task, weight_list=weights, normalized_grad=False,
                                       projector_kwargs={"proj_dim": ctx.n_params, "proj_type": "identity",
                                                         "device": _device(ctx)},
                                       device=_device(ctx))
        with upstream("dattri", "TracInAttributor.attribute"):
            S = att.attribute(loader(train_set(ctx), 256), loader(test_set(ctx)))
        self.diagnostics.update({"n_checkpoints": len(ckpts), "lr_weights": weights.tolist()})
        return as_protocol(S, ctx, sign=1.0, scale=1.0 / ctx.n_train, transpose=True)


@register
@dataclass
class DattriTRAK(PeerEstimator):
    """dattri's ``TRAKAttributor``: per checkpoint, features ``phi = R^T grad f / sqrt(P)`` of the margin
    ``f = log p_y - log(1 - p_y)`` (the task's loss function here, as TRAK's paper and dattri's examples),
    ``R`` dattri's ``[P, proj_dim]`` N(0, 1) projection (a new one per checkpoint), ``tau = phi_t (Phi^T Phi +
    regularization I)^-1 Phi^T`` averaged over checkpoints, times ``Q_i = 1 - p_{i,y}`` averaged over
    checkpoints.

    Conversion: TRAK attributes the *output* ``f(theta*) - f(theta_-i)``; the change of test *loss* is
    ``(1 - p_{t,y}(theta*)) tau`` (as ``trak``), positive, so ``sign=+1``; transposed. The ridge ``lambda``
    of ``trak`` (default ``n * weight_decay``) in dattri's units (gradients divided by ``sqrt(P)``, an
    unnormalised projection) is ``regularization = lambda * proj_dim / P``: then ``phi_t^T (..)^-1 phi_i`` =
    ``g_t^T R (R^T G^T G R + lambda R^T R / proj_dim ...)`` approximates ``trak``'s kernel with
    ``R R^T ~ proj_dim I`` (exactly so when ``proj_dim >> P``).

    Hyperparameters:
        proj_dim: projection dimension (default 512, as ``trak``).
        seed: dattri's ``proj_seed``.
        last: use only the last ``last`` checkpoints (default all, as ``trak``).
        ridge: ``trak``'s ``ridge`` (default None: ``n * weight_decay``).
    Softmax cross-entropy only.
    """

    name = "dattri:trak"
    library = "dattri"
    method = "trak"
    tags = frozenset({"stochastic", "checkpoints"})

    proj_dim: int = 512
    seed: int = 0
    last: int | None = None
    ridge: float | None = None

    def influence(self, ctx):
        if loss_name(ctx) != "cross_entropy":
            raise EstimatorUnsupported(f"TRAK's margin and Q are defined for softmax cross-entropy; this model's "
                                       f"loss is {loss_name(ctx)!r}")
        mod = require("dattri", "dattri.algorithm.trak")
        self.record_library()
        ckpts = ctx.checkpoints()
        if self.last is not None:
            if self.last < 1:
                raise ValueError(f"last must be >= 1, got {self.last}")
            ckpts = ckpts[-self.last:]
        module = module_at_theta(ctx)
        batched_ndim = ctx.x_train.dim()

        def _outputs(params, data):
            x, y = data
            if x.dim() == batched_ndim - 1:
                x, y = x[None], y[None]
            return torch.func.functional_call(module, params, (x,)), y.long()

        def margin(params, data):
            out, y = _outputs(params, data)
            logp = -torch.nn.functional.cross_entropy(out, y)
            return logp - torch.log1p(-torch.exp(logp))

        def correct_probability(params, data):
            out, y = _outputs(params, data)
            return torch.exp(-torch.nn.functional.cross_entropy(out, y))

        states = [_state_at(module, theta) for theta, _ in ckpts]
        task = _task(ctx, module, loss_func=margin, checkpoints=states)
        ridge = ctx.n_train * ctx.weight_decay if self.ridge is None else float(self.ridge)
        reg = ridge * self.proj_dim / ctx.n_params
        with upstream("dattri", "TRAKAttributor.__init__"):
            att = mod.TRAKAttributor(task=task, correct_probability_func=correct_probability,
                                     projector_kwargs={"proj_dim": self.proj_dim, "proj_seed": self.seed,
                                                       "proj_max_batch_size": 32, "device": _device(ctx)},
                                     device=_device(ctx), regularization=reg)
        with upstream("dattri", "TRAKAttributor.cache"):
            att.cache(loader(train_set(ctx), 256))
        with upstream("dattri", "TRAKAttributor.attribute"):
            S = att.attribute(loader(test_set(ctx)))
        with torch.no_grad():
            p_test = torch.softmax(module(ctx.x_test.to(ctx.device)), -1).gather(
                -1, ctx.y_test.to(ctx.device).long()[:, None])[:, 0]
        self.diagnostics.update({"n_checkpoints": len(ckpts), "ridge": ridge, "regularization": reg})
        out_to_loss = (1.0 - p_test).to(torch.float64)
        return as_protocol(S, ctx, sign=1.0, scale=1.0, transpose=True) * out_to_loss[:, None]
