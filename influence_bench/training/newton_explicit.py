"""Newton with explicit batched Hessians, for models small enough to hold B of them (P^2 each).

Same iteration, stopping rule and damping semantics as ``newton.newton_cg_batched`` (which it
replaces for small models): model b minimises ``J(theta; w_b)`` (per-row weights, weight decay
included), stops once ``||g_b|| <= max(grad_tol, grad_rtol * ||g_b(theta0)||)`` or after
``max_steps`` steps, and each step is accepted by the same Levenberg-Marquardt rule (``adaptive``)
or Armijo search. Only the step differs: every active model's full Hessian is formed in one
vectorised call (``vmap`` over models of ``torch.func.hessian``), all ``H_b + lam_b I`` are
factored at once (``cholesky_ex``) and the damped Newton step is solved exactly. A model whose
``H_b + lam_b I`` is not positive definite takes the CG path's step instead: the same truncated
PCG (stops at negative curvature), with products by its explicit matrix and the same
preconditioner. Converged models leave the batch and are never touched again.

FLOPs per step and model (``step_flops``), on top of the matmul FLOPs of forming the Hessian, the
gradients and the objective evaluations (counted by ``torch.utils.flop_counter``): ``P^3 / 3``
for the Cholesky factor and ``2 P^2`` for its two triangular solves.
"""

from __future__ import annotations

import torch
from torch.func import hessian, vmap

from influence_bench.curvature import linear as linear_fastpath
from influence_bench.curvature import mlp as mlp_fastpath
from influence_bench.curvature import products as curvature
from influence_bench.models.flat import FlatModel
from influence_bench.training.newton import (
    Downdated,
    NewtonResult,
    Preconditioner,
    _armijo,
    _done,
    _lm_step,
    _pcg,
    training_objective,
)

# Largest model (parameters) whose Hessians are formed: 2048^2 float64 = 32 MiB per model.
EXPLICIT_NEWTON_MAX = 2048
HESSIAN_BYTES = 512 * 2 ** 20  # per chunk of models: the [B, P, P] Hessians and their factors
# per chunk of models while forming (models x P tangents x n samples): small chunks stay in cache
# (iris d2-w16, one thread: 0.77 s per model at 2^24, 0.16 s at 2^16, i.e. one model at a time)
FORM_ELEMENTS = 2 ** 16


def can_form(n_params: int) -> bool:
    """Small enough to hold the Hessians (``EXPLICIT_NEWTON_MAX``)."""
    return n_params <= EXPLICIT_NEWTON_MAX


def applies(fm: FlatModel, n_params: int) -> bool:
    """The engine's default: closed-form Hessians (softmax-linear models) up to the size bound.
    Hessians formed by autograd (MLPs) cost ~P Hessian-vector products per step against CG's
    <= cg_iters: measured on iris-mlp-d2-w16 (P = 403, 7 steps per model either way) ~25x slower
    than Newton-CG on CPU, so there they run only when asked for (``batched="explicit"``)."""
    return can_form(n_params) and linear_fastpath.applies(fm)


def step_flops(n_params: int) -> float:
    """FLOPs of one model's factorisation and solve (not counted by torch's flop counter)."""
    return n_params ** 3 / 3 + 2 * n_params ** 2


def weighted_hessians(fm: FlatModel, thetas, weights, x, y, weight_decay: float) -> torch.Tensor:
    """``[B, P, P]`` Hessians of J(theta_b; w_b), weight decay included, symmetrised; formed in
    chunks of models that keep the vmapped intermediates within ``FORM_ELEMENTS`` x 8 floats."""
    B, P = thetas.shape
    if linear_fastpath.applies(fm):
        return _softmax_linear_hessians(fm, thetas, weights, x, weight_decay)
    if mlp_fastpath.applies(fm):
        return _mlp_hessians(fm, thetas, weights, x, y, weight_decay)
    chunk = max(1, FORM_ELEMENTS // max(1, P * x.shape[0]))

    def one(t, w):
        return hessian(lambda s: curvature.objective(fm, s, x, y, weight_decay, w))(t)

    H = torch.cat([vmap(one)(thetas[i:i + chunk], weights[i:i + chunk]) for i in range(0, B, chunk)])
    return 0.5 * (H + H.transpose(1, 2))


def _mlp_hessians(fm: FlatModel, thetas, weights, x, y, weight_decay: float) -> torch.Tensor:
    """Tanh MLPs: the ``P`` columns of each model's Hessian as ``P`` exact Hessian-vector products
    of ``curvature.mlp`` (one batched call per chunk of models, ``FORM_ELEMENTS`` x 64 floats of
    hidden activations per chunk), symmetrised."""
    B, P = thetas.shape
    width = max(s[0] for s in fm.shapes[::2])
    chunk = max(1, (64 * FORM_ELEMENTS) // max(1, P * x.shape[0] * width))
    eye = torch.eye(P, dtype=thetas.dtype, device=thetas.device)
    H = torch.cat([mlp_fastpath.hvps(fm, thetas[i:i + chunk].repeat_interleave(P, 0),
                                     weights[i:i + chunk].repeat_interleave(P, 0),
                                     eye.repeat(min(chunk, B - i), 1), x, y, weight_decay).reshape(-1, P, P)
                   for i in range(0, B, chunk)])
    return 0.5 * (H + H.transpose(1, 2))


def _softmax_linear_hessians(fm: FlatModel, thetas, weights, x, weight_decay: float) -> torch.Tensor:
    """Closed form for logits ``W x + b`` (``linear_fastpath``'s layout: W row-major [C, D], then b):
    ``H_b = (1/n) sum_i w_bi (diag(p_bi) - p_bi p_bi^T) kron xt_i xt_i^T + wd I``, ``xt = [x, 1]``,
    as one GEMM ``[B, C*C, n] @ [n, (D+1)^2]`` (2 B C^2 n (D+1)^2 FLOPs)."""
    B, P = thetas.shape
    n, D = x.shape
    C = P // (D + 1)
    p = torch.softmax(linear_fastpath._logits(fm, thetas, x), -1)  # [B, n, C]
    A = (torch.diag_embed(p) - p[..., :, None] * p[..., None, :]) * (weights / n)[:, :, None, None]
    xt = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], dim=1)
    K = A.reshape(B, n, C * C).transpose(1, 2) @ (xt[:, :, None] * xt[:, None, :]).reshape(n, -1)
    K = K.reshape(B, C, C, D + 1, D + 1).permute(0, 1, 3, 2, 4).reshape(B, P, P)  # (c, d), (e, f)
    perm = torch.tensor([c * (D + 1) + d for c in range(C) for d in range(D)] + [c * (D + 1) + D for c in range(C)],
                        device=x.device)
    H = K[:, perm][:, :, perm]
    H.diagonal(dim1=1, dim2=2).add_(weight_decay)
    return 0.5 * (H + H.transpose(1, 2))


def _steps(fm, theta, weights, g, lam, x, y, weight_decay, solve_rows, cg_iters, rtol) -> torch.Tensor:
    """Damped Newton steps ``(H_b + lam_b I)^-1 g_b``; non-positive-definite rows by truncated PCG."""
    H = weighted_hessians(fm, theta, weights, x, y, weight_decay)
    H.diagonal(dim1=1, dim2=2).add_(lam[:, None])
    L, info = torch.linalg.cholesky_ex(H)
    pd = info == 0
    s = torch.zeros_like(g)
    if bool(pd.any()):
        s[pd] = torch.cholesky_solve(g[pd, :, None], L[pd]).squeeze(-1)
    bad = (~pd).nonzero().squeeze(1)
    if len(bad):
        A = H[bad]
        s[bad] = _pcg(lambda v: (A @ v[:, :, None]).squeeze(-1), g[bad],
                      lambda r: solve_rows(r, bad), cg_iters, rtol[bad])
    return s


def newton_explicit_batched(fm: FlatModel, theta0: torch.Tensor, weights: torch.Tensor, x, y,
                            weight_decay: float, precond: Preconditioner, max_steps: int, grad_tol: float,
                            damping: float = 0.0, cg_iters: int = 30, cg_rtol: float = 1e-10,
                            downdate: torch.Tensor | None = None, grad_rtol: float = 0.0,
                            adaptive: bool = False) -> NewtonResult:
    """``newton_cg_batched``'s arguments and result; exact damped Newton steps (module docstring).
    ``precond`` / ``downdate`` / ``cg_iters`` / ``cg_rtol`` serve the indefinite rows' PCG only."""
    B, P = weights.shape[0], theta0.shape[-1]
    if not can_form(P):
        raise ValueError(f"explicit Newton: {P} parameters is above EXPLICIT_NEWTON_MAX = {EXPLICIT_NEWTON_MAX} "
                         f"(a [B, P, P] Hessian each); use newton_cg_batched")
    obj = training_objective(fm, x, y, weight_decay)
    per_model = Downdated.build(precond, downdate) if downdate is not None else None
    theta = (theta0.expand(B, -1) if theta0.dim() == 1 else theta0).clone()
    opts = dict(dtype=theta.dtype, device=theta.device)
    steps = torch.zeros(B, dtype=torch.long, device=theta.device)
    gnorm = torch.full((B,), float("inf"), **opts)
    active = torch.ones(B, dtype=torch.bool, device=theta.device)
    lam, nu = torch.full((B,), float(damping), **opts), torch.full((B,), 2.0, **opts)
    tol = torch.full((B,), float(grad_tol), **opts)
    per_chunk = max(1, HESSIAN_BYTES // (2 * P * P * theta.element_size()))
    for k in range(max_steps + 1):
        idx = active.nonzero().squeeze(1)
        g = obj.grads(theta[idx], weights[idx])
        gn = g.norm(dim=1)
        gnorm[idx] = gn
        if k == 0:
            tol = torch.maximum(tol, grad_rtol * gn)
        done = _done(gn, tol[idx], grad_rtol)
        active[idx[done]] = False
        if not bool(active.any()) or int(steps.max()) >= max_steps:
            break
        idx, g = idx[~done], g[~done]
        rtol = torch.clamp(g.norm(dim=1).sqrt(), max=0.1).clamp_min(cg_rtol)  # PCG rows only (as CG)
        s = torch.empty_like(g)
        for a in range(0, len(idx), per_chunk):
            rows = idx[a:a + per_chunk]

            def solve_rows(r, bad, rows=rows):
                return precond.solve(r) if per_model is None else per_model.solve_rows(r, rows[bad])

            s[a:a + per_chunk] = _steps(fm, theta[rows], weights[rows], g[a:a + per_chunk], lam[rows],
                                        x, y, weight_decay, solve_rows, cg_iters, rtol[a:a + per_chunk])
        if adaptive:
            t, lam[idx], nu[idx] = _lm_step(obj.value, theta[idx], weights[idx], s, g, lam[idx], nu[idx])
        else:
            t = _armijo(fm, theta[idx], weights[idx], s, g, x, y, weight_decay, value=obj.value)
        theta[idx] -= t[:, None] * s
        steps[idx] += 1
    return NewtonResult(theta, gnorm, steps, _done(gnorm, tol, grad_rtol))
