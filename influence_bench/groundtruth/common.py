"""What every ground-truth recipe shares: removal weights, the preconditioner at theta* and its
per-model downdate, the seeded initialisation, chunking with out-of-memory halving, test losses."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from influence_bench.api.context import Context
from influence_bench.curvature import products as curvature
from influence_bench.training import fit as training
from influence_bench.training.newton import NewtonResult, Preconditioner


def initial_theta(ctx: Context) -> torch.Tensor:
    """The setting's seeded initialisation (where theta*'s training started)."""
    def make():
        m = training.initial_module(ctx.setting, ctx.data, ctx.dtype, ctx.device)
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    return ctx.cached("gt-initial-theta", make)


# Above this many parameters the explicit Hessian (P^2 floats) is not formed: retraining runs
# Newton-CG without a preconditioner (more CG iterations per step for the same accuracy).
EXPLICIT_HESSIAN_MAX = 12_000


def preconditioner(ctx: Context) -> Preconditioner:
    damping = ctx.setting.ground_truth.damping
    if ctx.n_params > EXPLICIT_HESSIAN_MAX:
        return Preconditioner.identity(damping)
    return ctx.cached(("gt-precond", damping), lambda: Preconditioner.from_hessian(ctx.hessian(), damping))


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


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def chunked(n: int, chunk: int, run, what: str) -> list:
    """``run(start, stop)`` over ``[0, n)`` in chunks of at most ``chunk`` models; a chunk that runs out
    of memory is halved (down to one model) and retried, with a warning saying so."""
    out, s = [], 0
    while s < n:
        stop = min(s + chunk, n)
        try:
            out.append(run(s, stop))
        except (RuntimeError, MemoryError) as exc:
            if not (_is_oom(exc) or isinstance(exc, MemoryError)) or chunk == 1:
                raise
            chunk = max(1, (stop - s) // 2)
            warnings.warn(f"{what}: out of memory retraining {stop - s} models at once; halving the chunk to "
                          f"{chunk} models and continuing", stacklevel=2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        s = stop
    return out


def cat(parts: list[NewtonResult]) -> NewtonResult:
    return NewtonResult(*(torch.cat([getattr(p, f) for p in parts]) for f in ("theta", "grad_norm", "steps", "converged")))


def test_losses(ctx: Context, thetas: torch.Tensor) -> torch.Tensor:
    """``[B, n_test_all]`` losses of every test-set point under each model."""
    with torch.no_grad():
        return torch.stack([curvature.per_sample_loss(ctx.fm, t, ctx.data.x_test, ctx.data.y_test) for t in thetas])
