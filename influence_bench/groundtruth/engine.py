"""Leave-one-out retraining, many models at once (``torch.func.vmap`` over removal weights).

``warm`` mode: every model starts at theta*, the removed point's weight is zero, and at most
``max_steps`` Newton-CG steps are taken (see ``GroundTruthSpec``). A
control model trained the same way without removal is subtracted, so continued training is not
mistaken for influence: ``delta[i] = L(z; theta_-i) - L(z; theta_control)``.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import curvature
from ..context import Context
from ..newton import NewtonResult, Preconditioner, newton_cg_batched, newton_cg_sequential
from .store import Entries

# Bump whenever a change to the retraining can change stored numbers: it is part of the store key.
ENGINE_VERSION = "warm-newton-cg/2"
# Warm-start Newton-CG is deterministic (no data order, no sampling): replicates are identical, so
# the noise ceiling is 1 by declaration (a test checks two builds are bit-identical).
NOISE_CEILING = 1.0
CEILING_METHOD = "deterministic"


# Above this many parameters the explicit Hessian (P^2 floats) is not formed: retraining runs
# Newton-CG without a preconditioner (more CG iterations per step for the same accuracy).
EXPLICIT_HESSIAN_MAX = 12_000


def preconditioner(ctx: Context) -> Preconditioner:
    damping = ctx.setting.ground_truth.damping
    if ctx.n_params > EXPLICIT_HESSIAN_MAX:
        return Preconditioner.identity(damping)
    return ctx._memo(("gt-precond", damping), lambda: Preconditioner.from_hessian(ctx.hessian(), damping))


def removal_weights(n: int, removed: np.ndarray, dtype, device) -> torch.Tensor:
    """Row b is all ones except a zero at ``removed[b]``; ``removed[b] = -1`` means no removal."""
    w = torch.ones(len(removed), n, dtype=dtype, device=device)
    rows = np.flatnonzero(removed >= 0)
    w[torch.as_tensor(rows), torch.as_tensor(removed[rows])] = 0.0
    return w


def removal_downdate(ctx: Context, removed: np.ndarray) -> torch.Tensor:
    """``[B, P, C]`` factors U_b with U_b U_b^T = (removed point's Gauss-Newton curvature) / n
    (zero for the control row), so each model is preconditioned by its own leave-one-out Hessian."""
    rows = np.flatnonzero(removed >= 0)
    idx = torch.as_tensor(removed[rows])
    F = curvature.output_curvature_factors(ctx.fm, ctx.theta, ctx.x_train[idx], ctx.y_train[idx])
    U = torch.zeros(len(removed), *F.shape[1:], dtype=F.dtype, device=F.device)
    U[torch.as_tensor(rows)] = F / ctx.n_train ** 0.5
    return U


def retrain(ctx: Context, removed: np.ndarray, chunk: int = 128, batched: bool = True) -> NewtonResult:
    """Retrain one model per entry of ``removed`` (``-1`` = control). Chunked over models."""
    gt = ctx.setting.ground_truth
    parts = []
    for s in range(0, len(removed), chunk):
        rem = removed[s:s + chunk]
        w = removal_weights(ctx.n_train, rem, ctx.dtype, ctx.device)
        parts.append(retrain_weights(ctx, w, gt.max_steps, removal_downdate(ctx, rem) if batched else None,
                                     batched=batched))
    return _cat(parts)


def retrain_weights(ctx: Context, weights: torch.Tensor, max_steps: int, downdate: torch.Tensor | None = None,
                    batched: bool = True) -> NewtonResult:
    """Warm-start Newton-CG from theta* on each row of ``weights`` ([B, n], 0 = removed), with the
    setting's damping / CG budget, preconditioned by H* (per-model Woodbury if ``downdate``)."""
    gt = ctx.setting.ground_truth
    run = newton_cg_batched if batched else newton_cg_sequential
    kw = dict(damping=gt.damping, cg_iters=gt.cg_iters)
    if batched and downdate is not None:
        kw["downdate"] = downdate
    return run(ctx.fm, ctx.theta, weights, ctx.x_train, ctx.y_train, ctx.weight_decay, preconditioner(ctx),
               max_steps, gt.grad_tol, **kw)


def _cat(parts: list[NewtonResult]) -> NewtonResult:
    return NewtonResult(*(torch.cat([getattr(p, f) for p in parts]) for f in ("theta", "grad_norm", "steps", "converged")))


def test_losses(ctx: Context, thetas: torch.Tensor) -> torch.Tensor:
    """``[B, n_test_all]`` losses of every test-set point under each model."""
    with torch.no_grad():
        return torch.stack([curvature.per_sample_loss(ctx.fm, t, ctx.data.x_test, ctx.data.y_test) for t in thetas])


def compute(ctx: Context, removed: np.ndarray, chunk: int = 128, batched: bool = True) -> Entries:
    """Ground truth for ``removed`` training indices (with the control run)."""
    removed = np.asarray(removed, dtype=np.int64)
    res = retrain(ctx, np.concatenate([[-1], removed]), chunk=chunk, batched=batched)
    losses = test_losses(ctx, res.theta)
    delta = (losses[1:] - losses[0]).cpu().numpy()
    return Entries(removed, delta, res.grad_norm[1:].cpu().numpy(), res.steps[1:].cpu().numpy())
