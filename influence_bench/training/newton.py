"""Newton-CG on the weighted training objective, for many models at once.

Each model b minimises ``J(theta; w_b)``; each Newton step solves ``H_b s = g_b`` by conjugate
gradients with exact Hessian-vector products (vmapped over models), preconditioned by a fixed
``Preconditioner`` (the damped Hessian at theta*), followed by an Armijo line search. Near theta*
PCG needs few iterations because removing one point changes the Hessian by a low-rank O(1/n)
term. Used to polish theta* after L-BFGS and as the retraining engine of ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import grad, jvp, vmap

from influence_bench.curvature import products as curvature
from influence_bench.curvature.closed_form import closed_form
from influence_bench.models.flat import FlatModel


@dataclass
class Preconditioner:
    """Solves ``P x = b`` for a damped symmetric ``H``; indefinite ``H`` uses |eigenvalues| (saddle-free)."""

    chol: torch.Tensor | None = None
    evecs: torch.Tensor | None = None
    inv_evals: torch.Tensor | None = None
    kind: str = "cholesky"
    scale: float | None = None  # kind "identity": P = I / scale

    @classmethod
    def identity(cls, damping: float = 0.0) -> "Preconditioner":
        """No curvature information (models too large for an explicit Hessian): ``P = max(damping, 1) I``."""
        return cls(kind="identity", scale=1.0 / max(damping, 1.0))

    @classmethod
    def from_hessian(cls, H: torch.Tensor, damping: float = 0.0) -> "Preconditioner":
        A = H + damping * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return cls(chol=L)
        evals, evecs = torch.linalg.eigh(A)
        floor = max(damping, 1e-10 * float(evals.abs().max()))
        return cls(evecs=evecs, inv_evals=1.0 / evals.abs().clamp_min(floor), kind="saddle-free")

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """Solve for each row of ``B`` ([k, P]) and return [k, P]."""
        if self.scale is not None:
            return B * self.scale
        if self.chol is not None:  # two triangular solves: ~2x faster than cholesky_solve on CPU
            y = torch.linalg.solve_triangular(self.chol, B.T, upper=False)
            return torch.linalg.solve_triangular(self.chol.T, y, upper=True).T
        return ((B @ self.evecs) * self.inv_evals) @ self.evecs.T


@dataclass
class Downdated:
    """Per-model preconditioners ``(A - U_b U_b^T)^-1`` by Woodbury, with ``A^-1`` from ``base``.

    ``U_b U_b^T`` is the removed point's own (Gauss-Newton) curvature / n, so ``A - U_b U_b^T``
    is the leave-one-out Hessian at theta* (exactly, for a linear model): PCG then converges in
    one or two iterations instead of ~rank(U) + 1. Models whose downdate is ill-conditioned
    (``I - U^T A^-1 U`` not safely positive) keep the plain ``base``.
    """

    base: Preconditioner
    U: torch.Tensor  # [B, P, r]
    Z: torch.Tensor  # [B, P, r] = A^-1 U
    Minv: torch.Tensor  # [B, r, r] = (I - U^T Z)^-1, zero where not applied

    @classmethod
    def build(cls, base: Preconditioner, U: torch.Tensor, min_eig: float = 0.05) -> "Downdated":
        B, P, r = U.shape
        Z = base.solve(U.transpose(1, 2).reshape(B * r, P)).reshape(B, r, P).transpose(1, 2)
        M = torch.eye(r, dtype=U.dtype, device=U.device) - U.transpose(1, 2) @ Z
        M = 0.5 * (M + M.transpose(1, 2))
        evals, evecs = torch.linalg.eigh(M)
        ok = evals.min(dim=1).values > min_eig
        inv = evecs @ torch.diag_embed(1.0 / evals.clamp_min(min_eig)) @ evecs.transpose(1, 2)
        return cls(base, U, Z, torch.where(ok[:, None, None], inv, torch.zeros_like(inv)))

    def solve_rows(self, R: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.rows(idx)(R)

    def rows(self, idx: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The solver of models ``idx`` (rows of R in that order), their factors gathered once (a
        CG iteration then gathers nothing)."""
        U, Minv, Z = self.U[idx], self.Minv[idx], self.Z[idx]

        def solve(R: torch.Tensor) -> torch.Tensor:
            y = self.base.solve(R)
            t = torch.einsum("kpr,kp->kr", U, y)
            t = torch.einsum("krs,ks->kr", Minv, t)
            return y + torch.einsum("kpr,kr->kp", Z, t)

        return solve


@dataclass
class NewtonResult:
    theta: torch.Tensor  # [B, P]
    grad_norm: torch.Tensor  # [B]
    steps: torch.Tensor  # [B] steps taken by each model
    converged: torch.Tensor  # [B] bool


def weighted_objective(fm: FlatModel, thetas, weights, x, y, weight_decay: float) -> torch.Tensor:
    """``[B]`` objectives J(theta_b; w_b)."""
    if (fast := closed_form(fm)) is not None:
        return fast.objective(fm, thetas, weights, x, y, weight_decay)
    return vmap(lambda t, w: curvature.objective(fm, t, x, y, weight_decay, w))(thetas, weights)


def weighted_grads(fm: FlatModel, thetas, weights, x, y, weight_decay: float) -> torch.Tensor:
    """``[B, P]`` gradients of J(theta_b; w_b), all models in one vectorised call."""
    if (fast := closed_form(fm)) is not None:
        return fast.grads(fm, thetas, weights, x, y, weight_decay)
    g = grad(lambda t, w: curvature.objective(fm, t, x, y, weight_decay, w))
    return vmap(g)(thetas, weights)


def weighted_hvps(fm: FlatModel, thetas, weights, vs, x, y, weight_decay: float) -> torch.Tensor:
    """``[B, P]`` Hessian-vector products of J(theta_b; w_b) with v_b (forward-over-reverse, vmapped)."""
    return weighted_hvp_operator(fm, thetas, weights, x, y, weight_decay)(vs)


def weighted_hvp_operator(fm: FlatModel, thetas, weights, x, y, weight_decay: float):
    """``vs [B, P] -> weighted_hvps(..., vs, ...)`` at fixed ``thetas`` / ``weights``; the closed
    forms compute what does not depend on ``v`` (forward pass, loss derivatives) once."""
    if (fast := closed_form(fm)) is not None:
        return fast.hvp_operator(fm, thetas, weights, x, y, weight_decay)

    def one(t, w, v):
        g = grad(lambda s: curvature.objective(fm, s, x, y, weight_decay, w))
        return jvp(g, (t,), (v,))[1]

    return lambda vs: vmap(one)(thetas, weights, vs)


@dataclass(frozen=True)
class BatchedObjective:
    """Per-model objectives for ``newton_cg_batched``: ``value(thetas, weights)`` -> [B],
    ``grads(thetas, weights)`` -> [B, P], ``hvps(thetas, weights, vs)`` -> [B, P] (row b: model b's
    own objective, parameters and weights); optionally ``hvp_operator(thetas, weights)`` -> the
    function ``vs -> hvps(thetas, weights, vs)`` with its ``v``-free work done once (CG calls it
    once per Newton step instead of redoing that work every iteration)."""

    value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    grads: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    hvps: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    hvp_operator: Callable[[torch.Tensor, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None = None

    def operator(self, thetas: torch.Tensor, weights: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.hvp_operator is not None:
            return self.hvp_operator(thetas, weights)
        return lambda vs: self.hvps(thetas, weights, vs)


def training_objective(fm: FlatModel, x, y, weight_decay: float) -> BatchedObjective:
    """The weighted training objective J(theta; w) (the default of ``newton_cg_batched``)."""
    return BatchedObjective(lambda t, w: weighted_objective(fm, t, w, x, y, weight_decay),
                            lambda t, w: weighted_grads(fm, t, w, x, y, weight_decay),
                            lambda t, w, v: weighted_hvps(fm, t, w, v, x, y, weight_decay),
                            lambda t, w: weighted_hvp_operator(fm, t, w, x, y, weight_decay))


def newton_cg_batched(fm: FlatModel, theta0: torch.Tensor, weights: torch.Tensor, x, y,
                      weight_decay: float, precond: Preconditioner, max_steps: int, grad_tol: float,
                      damping: float = 0.0, cg_iters: int = 30, cg_rtol: float = 1e-10,
                      downdate: torch.Tensor | None = None,
                      objective: BatchedObjective | None = None, grad_rtol: float = 0.0,
                      adaptive: bool = False) -> NewtonResult:
    """Newton steps on each model's own objective, each solved by preconditioned CG.

    The step solves ``(H_b(theta_b) + damping I) s = g_b`` with the exact Hessian of model b
    (batched HVPs), preconditioned by ``precond`` (the Hessian at theta*): removing one point is
    a low-rank change, so PCG needs few iterations, and unlike a fixed preconditioner it cannot
    diverge when one point dominates a low-curvature direction. CG stops at negative curvature
    (truncated Newton), so a non-convex model still takes a descent step. ``downdate`` ([B, P, r])
    gives each model the Woodbury-corrected preconditioner of ``Downdated``. ``objective`` replaces
    the weighted training objective (``fm``, ``x``, ``y``, ``weight_decay`` are then unused), e.g.
    the proximal Bregman objective of ``groundtruth/pbrf.py``.

    Model b stops once ``||g_b|| <= stop_tol = max(grad_tol, grad_rtol * ||g_b(theta0)||)`` (relative
    to its own gradient at the start) or after ``max_steps`` steps; ``converged`` says which. With
    ``adaptive`` the damping is Levenberg-Marquardt's, per model (``_lm_step``): ``damping`` is only
    where it starts; it falls while the quadratic model predicts the decrease well and rises when it
    does not, so it ends far below the curvature it would otherwise swamp (the last steps are Newton
    steps) yet keeps a step from jumping along a flat direction into another basin.
    """
    obj = objective or training_objective(fm, x, y, weight_decay)
    B = weights.shape[0]
    per_model = Downdated.build(precond, downdate) if downdate is not None else None
    theta = (theta0.expand(B, -1) if theta0.dim() == 1 else theta0).clone()
    steps = torch.zeros(B, dtype=torch.long, device=theta.device)
    gnorm = torch.full((B,), float("inf"), dtype=theta.dtype, device=theta.device)
    active = torch.ones(B, dtype=torch.bool, device=theta.device)
    lam = torch.full((B,), float(damping), dtype=theta.dtype, device=theta.device)
    nu = torch.full_like(lam, 2.0)
    tol = torch.full((B,), float(grad_tol), dtype=theta.dtype, device=theta.device)
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
        # inexact Newton (Eisenstat-Walker forcing): loose solves far from the optimum, tight near it
        rtol = torch.clamp(g.norm(dim=1).sqrt(), max=0.1).clamp_min(cg_rtol)
        solve = precond.solve if per_model is None else per_model.rows(idx)
        d, hvp = lam[idx, None], obj.operator(theta[idx], weights[idx])
        s = _pcg(lambda v: hvp(v) + d * v, g, solve, cg_iters, rtol)
        if adaptive:
            t, lam[idx], nu[idx] = _lm_step(obj.value, theta[idx], weights[idx], s, g, lam[idx], nu[idx])
        else:
            t = _armijo(fm, theta[idx], weights[idx], s, g, x, y, weight_decay, value=obj.value)
        theta[idx] -= t[:, None] * s
        steps[idx] += 1
    return NewtonResult(theta, gnorm, steps, _done(gnorm, tol, grad_rtol))


def _done(gn: torch.Tensor, tol: torch.Tensor, grad_rtol: float) -> torch.Tensor:
    """Converged: below the absolute tolerance (strictly, as before) or the relative one (<=)."""
    return (gn <= tol) if grad_rtol > 0 else (gn < tol)


def _lm_step(value, thetas, weights, s, g, lam, nu) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Levenberg-Marquardt acceptance and damping update (Nielsen's rule) for the steps ``theta - s``
    that solve ``(H + lam I) s = g``: the gain ratio ``rho`` of the actual decrease to the one the
    quadratic model predicts, ``(g.s + lam |s|^2) / 2``, accepts the step (``t = 1``) when positive and
    scales ``lam`` by ``max(1/3, 1 - (2 rho - 1)^3)``; a rejected step (``t = 0``) multiplies ``lam``
    by ``nu``, which doubles on every consecutive rejection. A step whose change of the objective is
    below its rounding is accepted with ``lam`` unchanged. Returns (t, lam, nu)."""
    f0, f1 = value(thetas, weights), value(thetas - s, weights)
    pred = 0.5 * ((g * s).sum(1) + lam * (s * s).sum(1))
    gain = f0 - f1
    rounding = gain.abs() <= 64 * torch.finfo(f0.dtype).eps * f0.abs()
    rho = gain / torch.where(pred > 0, pred, torch.ones_like(pred))
    ok = torch.isfinite(f1) & ((rounding & (pred >= 0)) | ((pred > 0) & (rho > 1e-3)))
    shrink = torch.clamp(1 - (2 * rho.clamp(0, 1) - 1) ** 3, min=1 / 3)
    lam_ok = torch.where(rounding, lam, lam * shrink)
    return (ok.to(thetas.dtype), torch.where(ok, lam_ok, lam * nu),
            torch.where(ok, torch.full_like(nu, 2.0), nu * 2))


def _armijo(fm: FlatModel, thetas, weights, s, g, x, y, weight_decay: float,
            c: float = 1e-4, halvings: int = 20, value=None) -> torch.Tensor:
    """Per-model step length ``t`` (1, 1/2, 1/4, ...) for ``theta - t s`` with sufficient decrease.

    Near a minimum ``t = 1`` is accepted at once, so convex retraining keeps Newton's quadratic
    convergence; far from it (flat directions of deep nets) it keeps the steps from diverging.
    A model for which no halving decreases the objective gets ``t = 0``. ``value(thetas, weights)``
    replaces the weighted training objective.
    """
    def obj(t, w):
        if value is not None:
            return value(t, w)
        return weighted_objective(fm, t, w, x, y, weight_decay)

    f0 = obj(thetas, weights)
    slope = (g * s).sum(1)  # directional derivative along -s is -slope
    t = torch.ones_like(f0)
    todo = torch.ones_like(f0, dtype=torch.bool)
    for _ in range(halvings):
        f = obj(thetas - t[:, None] * s, weights)
        # the last term forgives rounding: near the optimum f changes below float resolution
        ok = torch.isfinite(f) & (f <= f0 - c * t * slope + 64 * torch.finfo(f.dtype).eps * f0.abs())
        todo &= ~ok
        if not bool(todo.any()):
            return t
        t = torch.where(todo, t * 0.5, t)
    return torch.where(todo, torch.zeros_like(t), t)


def _pcg(matvec, b: torch.Tensor, solve, iters: int, rtol: torch.Tensor) -> torch.Tensor:
    """Batched preconditioned CG for ``A_k x_k = b_k`` (rows), each stopping once its residual is
    below ``rtol[k] * ||b_k||``; negative curvature
    ends a row's iteration with the iterate so far (or the preconditioned gradient if at the start)."""
    x = torch.zeros_like(b)
    r = b.clone()
    z = solve(r)
    p = z.clone()
    rz = (r * z).sum(1)
    bnorm = b.norm(dim=1)
    live = torch.ones(b.shape[0], dtype=torch.bool, device=b.device)
    for k in range(iters):
        Ap = matvec(p)
        pAp = (p * Ap).sum(1)
        neg = live & (pAp <= 0)
        if k == 0:
            x[neg] = z[neg]
        live &= ~neg
        alpha = torch.where(live, rz / torch.where(pAp > 0, pAp, torch.ones_like(pAp)), torch.zeros_like(rz))
        x += alpha[:, None] * p
        r -= alpha[:, None] * Ap
        live &= r.norm(dim=1) > rtol * bnorm
        if not bool(live.any()):
            break
        z = solve(r)
        rz_new = (r * z).sum(1)
        beta = torch.where(live, rz_new / rz, torch.zeros_like(rz))
        p = torch.where(live[:, None], z + beta[:, None] * p, p)
        rz = torch.where(live, rz_new, rz)
    return x


def newton_cg_sequential(fm: FlatModel, theta0: torch.Tensor, weights: torch.Tensor, x, y,
                         weight_decay: float, precond: Preconditioner, max_steps: int, grad_tol: float,
                         damping: float = 0.0, cg_iters: int = 30, cg_rtol: float = 1e-10,
                         grad_rtol: float = 0.0, adaptive: bool = False) -> NewtonResult:
    """The same iteration one model at a time with plain ``torch.autograd`` (double backward):
    the independent reference that the vmapped engine is tested against (its objective values too
    come from the generic module call, never from ``curvature.linear`` / ``curvature.mlp``)."""

    def value(t, w):
        return torch.stack([curvature.objective(fm, tb, x, y, weight_decay, wb) for tb, wb in zip(t, w)])

    thetas, norms, steps, tols = [], [], [], []
    for w in weights:
        theta = theta0.clone()
        k, tol = 0, None
        lam, nu = torch.tensor([float(damping)], dtype=theta0.dtype), torch.tensor([2.0], dtype=theta0.dtype)
        while True:
            t = theta.detach().requires_grad_(True)
            g = torch.autograd.grad(curvature.objective(fm, t, x, y, weight_decay, w), t, create_graph=True)[0]
            if tol is None:
                tol = max(grad_tol, grad_rtol * float(g.detach().norm()))
            if bool(_done(g.detach().norm(), torch.tensor(tol), grad_rtol)) or k >= max_steps:
                break

            def matvec(v, g=g, t=t, lam=lam):
                return torch.autograd.grad(g, t, v[0], retain_graph=True)[0][None] + lam * v

            rtol = torch.clamp(g.detach().norm().sqrt(), max=0.1).clamp_min(cg_rtol)[None]
            s = _pcg(matvec, g.detach()[None], precond.solve, cg_iters, rtol)
            if adaptive:
                step, lam, nu = _lm_step(value, theta[None], w[None], s, g.detach()[None], lam, nu)
            else:
                step = _armijo(fm, theta[None], w[None], s, g.detach()[None], x, y, weight_decay, value=value)
            theta = theta - step[0] * s[0]
            k += 1
        thetas.append(theta.detach())
        norms.append(g.norm().detach())
        steps.append(k)
        tols.append(tol)
    gn = torch.stack(norms)
    return NewtonResult(torch.stack(thetas), gn, torch.tensor(steps),
                        _done(gn, torch.tensor(tols, dtype=gn.dtype), grad_rtol))
