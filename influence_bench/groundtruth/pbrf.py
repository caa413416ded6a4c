"""``pbrf`` ground truth: the proximal Bregman response function (Bae et al. 2022, "If Influence
Functions are the Answer, Then What is the Question?"), many models at once.

Removing training point i (this repo's sign convention: the change in test loss when i is
REMOVED) is a down-weighting by ``-1/n``. Its PBRF response is

    theta_i = argmin_theta  (1/n) sum_k D_k(f(x_k; theta), f(x_k; theta*))
                          - (1/n) loss(f(x_i; theta), y_i)
                          + ((lambda + wd) / 2) ||theta - theta*||^2

with ``D_k(z, z*) = l_k(z) - l_k(z*) - grad_z l_k(z*)^T (z - z*)`` the Bregman divergence of
sample k's loss in OUTPUT (logit) space, i.e. ``logsumexp(z) - logsumexp(z*) - softmax(z*)^T (z - z*)``
for cross-entropy and ``0.5 ||z - z*||^2`` for the squared error ``0.5 ||z - y||^2`` of
``curvature.loss_from_outputs`` (computed from that very function, so the scaling agrees).

Proximity, exactly: ``lambda = GroundTruthSpec.damping`` and ``wd`` the setting's weight decay. The
training objective's regulariser ``wd/2 ||theta||^2`` is quadratic, so its own Bregman divergence
around theta* is ``wd/2 ||theta - theta*||^2``: the PBRF keeps the weight decay's curvature and adds
the proximity ``lambda/2 ||theta - theta*||^2`` on top. The PBRF objective's Hessian at theta* is then
``G + lambda I - H_i / n`` with ``G = (1/n) sum_k J_k^T A_k J_k + wd I`` the Gauss-Newton matrix of
the training objective (``ctx.ggn()``, as in the ``exact-ggn`` estimator), and one Newton step from
theta* gives ``theta_i - theta* ~= (1/n) (G + lambda I)^-1 grad l_i(theta*)``: the first-order
influence ``(1/n) g_test^T (G + lambda I)^-1 g_i`` of ``exact-ggn`` with ``damping = lambda`` is the
linearisation of this ground truth. ``wd + lambda`` must be > 0 (else the objective has no
minimiser in the directions the outputs do not see); it is refused otherwise.

General weights (``retrain_weights``): row b up-weights ``-(1 - w_b[k]) / n`` for every k, so
``w = 1`` is no removal, whose PBRF optimum is theta* itself (the gradient there is zero up to
rounding, Newton takes no step): no control run is needed and
``delta[i, j] = L(z_j; theta_i) - L(z_j; theta*)``.

Solved by the batched Newton-CG of ``newton.py`` from theta*, preconditioned by ``G + lambda I``
(per-model Woodbury downdate by the removed point's Gauss-Newton curvature, exact for a linear
model), or by the identity above ``common.EXPLICIT_HESSIAN_MAX`` parameters. Reads
``GroundTruthSpec.damping`` (lambda), ``max_steps``, ``grad_tol`` and ``cg_iters``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import grad, jvp, vmap

from influence_bench.api.context import Context
from influence_bench.curvature import linear as linear_fastpath
from influence_bench.curvature import products as curvature
from influence_bench.groundtruth import common
from influence_bench.groundtruth.entries import Entries, convergence_flags
from influence_bench.models.flat import FlatModel
from influence_bench.training.newton import BatchedObjective, NewtonResult, Preconditioner, newton_cg_batched

# Part of what a store key for this mode should hash (the integrator's choice), like engine.ENGINE_VERSION.
PBRF_VERSION = "pbrf-newton-cg/1"


def proximity(ctx: Context) -> float:
    """``lambda + wd``, the coefficient of ``||theta - theta*||^2 / 2``; refuses a problem without minimiser."""
    lam, wd = float(ctx.setting.ground_truth.damping), float(ctx.weight_decay)
    if lam < 0:
        raise ValueError(f"{ctx.setting.id}: pbrf ground truth needs GroundTruthSpec.damping >= 0, got {lam}")
    if lam + wd <= 0:
        raise ValueError(
            f"{ctx.setting.id}: pbrf ground truth needs weight_decay + GroundTruthSpec.damping > 0 (got "
            f"{wd} + {lam}): without a proximity term the PBRF objective has no minimiser. Set "
            "GroundTruthSpec(damping=...) > 0 for this setting.")
    return lam + wd


def _outputs(fm: FlatModel, thetas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[B, n, C]`` outputs of every model (one GEMM for logistic regression, vmap otherwise)."""
    if linear_fastpath.applies(fm):
        return linear_fastpath._logits(fm, thetas, x)
    return vmap(fm, in_dims=(0, None))(thetas, x)


def bregman(loss: str, d: torch.Tensor, p_star: torch.Tensor | None) -> torch.Tensor:
    """``D(z* + d, z*)`` of the per-sample loss in output space, per sample (last dim = outputs).

    Cross-entropy: ``logsumexp(z) - logsumexp(z*) - p*^T d = log(1 + sum_c p*_c expm1(e_c))`` with
    ``e = d - p*^T d`` (``p* = softmax(z*)``), free of the cancellation of the textbook form, so
    its rounding error is ``O(eps |d|)`` instead of ``O(eps * loss)``: Armijo's sufficient-decrease
    test still resolves the tiny decreases of the last Newton steps. Squared error: ``0.5 ||d||^2``.
    """
    if loss == "mse":
        return 0.5 * d.pow(2).sum(-1)
    e = d - (p_star * d).sum(-1, keepdim=True)
    return torch.log1p((p_star * torch.expm1(e)).sum(-1))


def objective(ctx: Context) -> BatchedObjective:
    """The PBRF objective of every row of a weight matrix ([B, n], 1 = kept, 0 = removed), batched.

    With ``d_k = f(x_k; theta) - f(x_k; theta*)`` and ``l_k(z) - l_k(z*) = g*_k^T d_k + D_k`` it is
    computed as ``(1/n) sum_k [w_k D_k - (1 - w_k) g*_k^T d_k] + (lambda + wd)/2 ||theta - theta*||^2``,
    i.e. the PBRF objective minus the constant ``-(1/n) sum_k (1 - w_k) l_k(z*)`` (a removed point's
    own Bregman term and its negated loss cancel exactly). Models are independent, so gradients and
    HVPs of each model's objective are those of the sum over models (one reverse pass, one
    forward-over-reverse pass for all B models)."""
    fm, x, y, theta_star, n = ctx.fm, ctx.x_train, ctx.y_train, ctx.theta, ctx.n_train
    prox = proximity(ctx)
    with torch.no_grad():
        z_star = _outputs(fm, theta_star[None], x)[0]  # [n, C], the same route as the models' outputs
        p_star = torch.softmax(z_star, -1) if fm.loss == "cross_entropy" else None
    g_star = grad(lambda z: curvature.loss_from_outputs(fm.loss, z, y).sum())(z_star)  # dl_k/dz at z*

    def value(thetas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        d = _outputs(fm, thetas, x) - z_star  # [B, n, C]
        per_point = weights * bregman(fm.loss, d, p_star) - (1 - weights) * (d * g_star).sum(-1)
        return per_point.sum(1) / n + 0.5 * prox * (thetas - theta_star).pow(2).sum(1)

    def grads(thetas, weights):
        return grad(lambda t: value(t, weights).sum())(thetas)

    def hvps(thetas, weights, vs):
        return jvp(lambda t: grads(t, weights), (thetas,), (vs,))[1]

    return BatchedObjective(value, grads, hvps)


def preconditioner(ctx: Context) -> Preconditioner:
    """``G + lambda I`` (the PBRF Hessian at theta* before the removal), or the identity for large models."""
    lam = float(ctx.setting.ground_truth.damping)
    if ctx.n_params > common.EXPLICIT_HESSIAN_MAX:
        return Preconditioner.identity(lam)
    return ctx.cached(("pbrf-precond", lam), lambda: Preconditioner.from_hessian(ctx.ggn(), lam))


def _single_removals(weights: torch.Tensor) -> np.ndarray | None:
    """Per row the one index with weight 0 (-1 if none), or None when some row is not of that form."""
    off = weights != 1
    if bool((off.sum(1) > 1).any()) or bool((weights[off] != 0).any()):
        return None
    idx = off.to(torch.int64).argmax(1)
    return torch.where(off.any(1), idx, torch.full_like(idx, -1)).cpu().numpy()


def retrain_weights(ctx: Context, weights: torch.Tensor) -> NewtonResult:
    """PBRF optimum of each row of ``weights`` ([B, n], 1 = kept, 0 = removed), Newton-CG from theta*."""
    gt = ctx.setting.ground_truth
    obj = objective(ctx)  # checks lambda + wd > 0 first
    weights = weights.to(ctx.device, ctx.dtype)
    precond = preconditioner(ctx)
    removed = _single_removals(weights) if ctx.n_params <= common.EXPLICIT_HESSIAN_MAX else None
    downdate = None if removed is None else common.removal_downdate(ctx, removed)
    return newton_cg_batched(ctx.fm, ctx.theta, weights, ctx.x_train, ctx.y_train, ctx.weight_decay, precond,
                             gt.max_steps, gt.grad_tol, cg_iters=gt.cg_iters, downdate=downdate, objective=obj)


def compute(ctx: Context, removed: np.ndarray, chunk: int = 128) -> Entries:
    """``delta[i, j] = L(z_j; theta_i^pbrf) - L(z_j; theta*)`` for every test-set point j (no control run)."""
    removed = np.asarray(removed, dtype=np.int64)
    proximity(ctx)
    base = common.test_losses(ctx, ctx.theta[None])[0]
    deltas, norms, steps, conv = [], [], [], []
    for s in range(0, len(removed), chunk):
        rem = removed[s:s + chunk]
        res = retrain_weights(ctx, common.removal_weights(ctx.n_train, rem, ctx.dtype, ctx.device))
        deltas.append((common.test_losses(ctx, res.theta) - base).cpu().numpy())
        norms.append(res.grad_norm.cpu().numpy())
        steps.append(res.steps.cpu().numpy())
        conv.append(res.converged.cpu().numpy())
    n_test = int(ctx.data.x_test.shape[0])
    if not deltas:
        return Entries.empty(n_test)
    return Entries(removed, np.concatenate(deltas), np.concatenate(norms), np.concatenate(steps),
                   converged=convergence_flags(np.concatenate(conv)))
