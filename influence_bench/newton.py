"""Preconditioned Newton iterations on the weighted training objective, for many models at once.

``theta <- theta - P^-1 grad J(theta; w)`` with a fixed preconditioner ``P`` (the damped Hessian
at theta*). Near theta* the iteration converges fast because removing one point changes the
Hessian by O(1/n). Used to polish theta* after L-BFGS and as the retraining engine of ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import grad, jvp, vmap

from . import curvature
from .models import FlatModel


@dataclass
class Preconditioner:
    """Solves ``P x = b`` for a damped symmetric ``H``; indefinite ``H`` uses |eigenvalues| (saddle-free)."""

    chol: torch.Tensor | None = None
    evecs: torch.Tensor | None = None
    inv_evals: torch.Tensor | None = None
    kind: str = "cholesky"

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
        if self.chol is not None:
            return torch.cholesky_solve(B.T, self.chol).T
        return ((B @ self.evecs) * self.inv_evals) @ self.evecs.T


@dataclass
class NewtonResult:
    theta: torch.Tensor  # [B, P]
    grad_norm: torch.Tensor  # [B]
    steps: torch.Tensor  # [B] steps taken by each model
    converged: torch.Tensor  # [B] bool


def weighted_grads(fm: FlatModel, thetas, weights, x, y, weight_decay: float) -> torch.Tensor:
    """``[B, P]`` gradients of J(theta_b; w_b), all models in one vectorised call."""
    g = grad(lambda t, w: curvature.objective(fm, t, x, y, weight_decay, w))
    return vmap(g)(thetas, weights)


def newton_batched(fm: FlatModel, theta0: torch.Tensor, weights: torch.Tensor, x, y,
                   weight_decay: float, precond: Preconditioner, max_steps: int,
                   grad_tol: float) -> NewtonResult:
    """Run the iteration for ``B = len(weights)`` models from ``theta0`` ([P] or [B, P]).

    Each model stops on its own once ``||grad|| < grad_tol`` (so a batch gives the same numbers
    as one model at a time).
    """
    B = weights.shape[0]
    theta = (theta0.expand(B, -1) if theta0.dim() == 1 else theta0).clone()
    steps = torch.zeros(B, dtype=torch.long, device=theta.device)
    active = torch.ones(B, dtype=torch.bool, device=theta.device)
    gnorm = torch.full((B,), float("inf"), dtype=theta.dtype, device=theta.device)
    for _ in range(max_steps + 1):
        idx = active.nonzero().squeeze(1)
        g = weighted_grads(fm, theta[idx], weights[idx], x, y, weight_decay)
        gn = g.norm(dim=1)
        gnorm[idx] = gn
        done = gn < grad_tol
        active[idx[done]] = False
        if not bool(active.any()) or int(steps.max()) >= max_steps:
            break
        move = idx[~done]
        theta[move] -= precond.solve(g[~done])
        steps[move] += 1
    return NewtonResult(theta, gnorm, steps, ~active | (gnorm < grad_tol))




def weighted_hvps(fm: FlatModel, thetas, weights, vs, x, y, weight_decay: float) -> torch.Tensor:
    """``[B, P]`` Hessian-vector products of J(theta_b; w_b) with v_b (forward-over-reverse, vmapped)."""

    def one(t, w, v):
        g = grad(lambda s: curvature.objective(fm, s, x, y, weight_decay, w))
        return jvp(g, (t,), (v,))[1]

    return vmap(one)(thetas, weights, vs)


def newton_cg_batched(fm: FlatModel, theta0: torch.Tensor, weights: torch.Tensor, x, y,
                      weight_decay: float, precond: Preconditioner, max_steps: int, grad_tol: float,
                      damping: float = 0.0, cg_iters: int = 30, cg_rtol: float = 1e-10) -> NewtonResult:
    """Newton steps on each model's own objective, each solved by preconditioned CG.

    The step solves ``(H_b(theta_b) + damping I) s = g_b`` with the exact Hessian of model b
    (batched HVPs), preconditioned by ``precond`` (the Hessian at theta*): removing one point is
    a low-rank change, so PCG needs few iterations, and unlike a fixed preconditioner it cannot
    diverge when one point dominates a low-curvature direction. CG stops at negative curvature
    (truncated Newton), so a non-convex model still takes a descent step.
    """
    B = weights.shape[0]
    theta = (theta0.expand(B, -1) if theta0.dim() == 1 else theta0).clone()
    steps = torch.zeros(B, dtype=torch.long, device=theta.device)
    gnorm = torch.full((B,), float("inf"), dtype=theta.dtype, device=theta.device)
    active = torch.ones(B, dtype=torch.bool, device=theta.device)
    for _ in range(max_steps + 1):
        idx = active.nonzero().squeeze(1)
        g = weighted_grads(fm, theta[idx], weights[idx], x, y, weight_decay)
        gn = g.norm(dim=1)
        gnorm[idx] = gn
        done = gn < grad_tol
        active[idx[done]] = False
        if not bool(active.any()) or int(steps.max()) >= max_steps:
            break
        idx, g = idx[~done], g[~done]
        # inexact Newton (Eisenstat-Walker forcing): loose solves far from the optimum, tight near it
        rtol = torch.clamp(g.norm(dim=1).sqrt(), max=0.1).clamp_min(cg_rtol)
        s = _pcg(lambda v: weighted_hvps(fm, theta[idx], weights[idx], v, x, y, weight_decay) + damping * v,
                 g, precond, cg_iters, rtol)
        theta[idx] -= _armijo(fm, theta[idx], weights[idx], s, g, x, y, weight_decay)[:, None] * s
        steps[idx] += 1
    return NewtonResult(theta, gnorm, steps, gnorm < grad_tol)


def _armijo(fm: FlatModel, thetas, weights, s, g, x, y, weight_decay: float,
            c: float = 1e-4, halvings: int = 20) -> torch.Tensor:
    """Per-model step length ``t`` (1, 1/2, 1/4, ...) for ``theta - t s`` with sufficient decrease.

    Near a minimum ``t = 1`` is accepted at once, so convex retraining keeps Newton's quadratic
    convergence; far from it (flat directions of deep nets) it keeps the steps from diverging.
    A model for which no halving decreases the objective gets ``t = 0``.
    """
    obj = vmap(lambda t, w: curvature.objective(fm, t, x, y, weight_decay, w))
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


def _pcg(matvec, b: torch.Tensor, precond: Preconditioner, iters: int, rtol: torch.Tensor) -> torch.Tensor:
    """Batched preconditioned CG for ``A_k x_k = b_k`` (rows), each stopping once its residual is
    below ``rtol[k] * ||b_k||``; negative curvature
    ends a row's iteration with the iterate so far (or the preconditioned gradient if at the start)."""
    x = torch.zeros_like(b)
    r = b.clone()
    z = precond.solve(r)
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
        z = precond.solve(r)
        rz_new = (r * z).sum(1)
        beta = torch.where(live, rz_new / rz, torch.zeros_like(rz))
        p = torch.where(live[:, None], z + beta[:, None] * p, p)
        rz = torch.where(live, rz_new, rz)
    return x


def newton_cg_sequential(fm: FlatModel, theta0: torch.Tensor, weights: torch.Tensor, x, y,
                         weight_decay: float, precond: Preconditioner, max_steps: int, grad_tol: float,
                         damping: float = 0.0, cg_iters: int = 30, cg_rtol: float = 1e-10) -> NewtonResult:
    """The same iteration one model at a time with plain ``torch.autograd`` (double backward):
    the independent reference that the vmapped engine is tested against."""
    thetas, norms, steps = [], [], []
    for w in weights:
        theta = theta0.clone()
        k = 0
        while True:
            t = theta.detach().requires_grad_(True)
            g = torch.autograd.grad(curvature.objective(fm, t, x, y, weight_decay, w), t, create_graph=True)[0]
            if g.norm() < grad_tol or k >= max_steps:
                break

            def matvec(v, g=g, t=t):
                return torch.autograd.grad(g, t, v[0], retain_graph=True)[0][None] + damping * v

            rtol = torch.clamp(g.detach().norm().sqrt(), max=0.1).clamp_min(cg_rtol)[None]
            s = _pcg(matvec, g.detach()[None], precond, cg_iters, rtol)
            theta = theta - _armijo(fm, theta[None], w[None], s, g.detach()[None], x, y, weight_decay)[0] * s[0]
            k += 1
        thetas.append(theta.detach())
        norms.append(g.norm().detach())
        steps.append(k)
    gn = torch.stack(norms)
    return NewtonResult(torch.stack(thetas), gn, torch.tensor(steps), gn < grad_tol)
