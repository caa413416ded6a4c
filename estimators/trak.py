"""``trak``: TRAK with random projections (Park et al. 2023), ensembled over training checkpoints.

For each checkpoint ``theta_m`` (``ctx.checkpoints()``: evenly spaced L-BFGS iterates and theta*):

* model output function: the margin ``f(z) = log p_y - log(1 - p_y) = z_y - logsumexp(z_{c != y})``;
  its out-to-loss derivative is ``dL/df = -(1 - p_y)``, so ``Q_i = 1 - p_{i,y}``;
* features ``phi_i = Proj^T grad_theta f(z_i)`` with a Gaussian ``Proj`` (``[P, proj_dim]``, entries
  ``N(0, 1/proj_dim)``) drawn from ``torch.Generator().manual_seed(seed)`` (never a global seed; the
  same matrix for every checkpoint);
* kernel ``K_m = (Phi^T Phi + ridge Proj^T Proj)^+`` (pseudo-inverse from an eigendecomposition,
  eigenvalues below ``rcond`` times the largest dropped): the ridge is the projection of a
  parameter-space ridge ``ridge I``, so that for
  ``proj_dim >= P`` the projected formula reduces *exactly* to the un-projected
  ``grad f_t^T (sum_i grad f_i grad f_i^T + ridge I)^-1 grad f_i``;
* scores ``tau_m[t, i] = phi_t^T K_m phi_i``.

As in TRAK, the ensemble averages the kernel part and the Q part separately:
``tau = mean_m(tau_m) * mean_m(Q_m)[i]`` -- TRAK's attribution of the *output* ``f(z_t)``, i.e.
``f(z_t; theta*) - f(z_t; theta_-i)``. Conversion to docs/protocol.md's convention (change of test *loss*
when i is removed): ``I[t, i] = dL_t/df_t * (f(theta_-i) - f(theta*)) = (1 - p_{t,y}(theta*)) * tau[t, i]``;
the factor is positive, so TRAK's sign is kept (positive = helping). With one checkpoint this is
``g_t^T K g_i`` in loss gradients: the influence function with ``n H`` replaced by TRAK's feature
kernel (the ``1/n`` of the mean loss is absorbed by the un-normalised ``Phi^T Phi``).

Hyperparameters:
    proj_dim: projection dimension (default 512).
    seed: seed of the projection (results are stochastic in it: tag ``stochastic``).
    last: use only the last ``last`` checkpoints (default None: every saved checkpoint).
    ridge: ``lambda`` of the kernel in the un-normalised ``Phi^T Phi`` units (default None:
        ``n * weight_decay``, the weight decay of the mean objective in those units).
    rcond: kernel eigenvalues below ``rcond`` times the largest are dropped (pseudo-inverse).
Softmax cross-entropy only (the margin and Q are defined for it).
"""

from dataclasses import dataclass

import torch
from torch.func import grad, vmap

from influence_bench import Estimator, EstimatorUnsupported, register


def margin(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[n]``: ``log p_y - log(1 - p_y)`` of logits ``out`` ``[n, C]`` (stable)."""
    mask = torch.arange(out.shape[-1], device=out.device) == y[:, None]
    z_y = out.gather(-1, y[:, None])[:, 0]
    others = out.masked_fill(mask, float("-inf"))
    return z_y - torch.logsumexp(others, dim=-1)


def margin_grads(fm, theta, x, y, chunk_size: int = 1024) -> torch.Tensor:
    """``[n, P]`` gradients of each sample's margin at ``theta``."""
    def one(xi, yi):
        return grad(lambda t: margin(fm(t, xi[None]), yi[None])[0])(theta)
    return torch.cat([vmap(one)(x[i:i + chunk_size], y[i:i + chunk_size]) for i in range(0, x.shape[0], chunk_size)])


def p_true(fm, theta, x, y) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(fm(theta, x), dim=-1).gather(-1, y[:, None])[:, 0]


DIRECT_KERNEL = True  # proj_dim >= P with a ridge: the unprojected kernel by Cholesky (False: always eigh)


def _ridge_kernel(Gt: torch.Tensor, G: torch.Tensor, ridge: float) -> torch.Tensor:
    """``Gt (G^T G + ridge I)^-1 G^T`` ``[n_test, n]`` for ``ridge > 0``: by the ``[n, n]`` system
    ``(Gt G^T)(G G^T + ridge I)^-1`` when there are fewer samples than parameters, else the ``[P, P]`` one."""
    n, P = G.shape
    if n <= P:
        L = torch.linalg.cholesky(G @ G.T + ridge * torch.eye(n, dtype=G.dtype, device=G.device))
        return torch.cholesky_solve(G @ Gt.T, L).T
    L = torch.linalg.cholesky(G.T @ G + ridge * torch.eye(P, dtype=G.dtype, device=G.device))
    return Gt @ torch.cholesky_solve(G.T, L)


@register
@dataclass
class TRAK(Estimator):
    name = "trak"
    tags = frozenset({"stochastic", "checkpoints"})

    proj_dim: int = 512
    seed: int = 0
    last: int | None = None
    ridge: float | None = None
    rcond: float = 1e-12

    def projection(self, ctx) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        P = torch.randn(ctx.n_params, self.proj_dim, generator=gen, dtype=torch.float64)
        return (P / self.proj_dim ** 0.5).to(ctx.device, ctx.dtype)

    def influence(self, ctx):
        if ctx.fm.loss != "cross_entropy":
            raise EstimatorUnsupported(f"trak's margin output and Q weighting are defined for softmax "
                                       f"cross-entropy; this model's loss is {ctx.fm.loss!r}. Use `exact`.")
        if self.proj_dim < 1:
            raise ValueError(f"proj_dim must be >= 1, got {self.proj_dim}")
        ckpts = ctx.checkpoints()
        if self.last is not None:
            if self.last < 1:
                raise ValueError(f"last must be >= 1, got {self.last}")
            ckpts = ckpts[-self.last:]
        ridge = ctx.n_train * ctx.weight_decay if self.ridge is None else float(self.ridge)
        # proj_dim >= P with a ridge: the projection changes nothing (see the module docstring), so the kernel
        # is solved unprojected, in the smaller of the n- and P-dimensional forms (Cholesky, not an
        # eigendecomposition of proj_dim^2: 9-10x faster on the Iris settings, equal to 1e-11)
        direct = DIRECT_KERNEL and self.proj_dim >= ctx.n_params and ridge > 0
        Proj = None if direct else self.projection(ctx)
        reg = ridge * (Proj.T @ Proj) if ridge > 0 and not direct else 0.0  # the ridge, projected
        tau = torch.zeros(ctx.n_test, ctx.n_train, dtype=ctx.dtype, device=ctx.device)
        Q = torch.zeros(ctx.n_train, dtype=ctx.dtype, device=ctx.device)
        ranks = []
        for theta, _ in ckpts:
            if direct:
                tau += _ridge_kernel(margin_grads(ctx.fm, theta, ctx.x_test, ctx.y_test),
                                     margin_grads(ctx.fm, theta, ctx.x_train, ctx.y_train), ridge)
                ranks.append(ctx.n_params)  # (G^T G + ridge I)^-1: full rank
                Q += 1.0 - p_true(ctx.fm, theta, ctx.x_train, ctx.y_train)
                continue
            phi = margin_grads(ctx.fm, theta, ctx.x_train, ctx.y_train) @ Proj  # [n, k]
            phi_t = margin_grads(ctx.fm, theta, ctx.x_test, ctx.y_test) @ Proj  # [n_test, k]
            M = phi.T @ phi + reg
            lam, V = torch.linalg.eigh(0.5 * (M + M.T))
            keep = lam > self.rcond * lam[-1].clamp_min(1e-300)  # pseudo-inverse (rank <= P when proj_dim > P)
            ranks.append(int(keep.sum()))
            Vk = V[:, keep] / lam[keep].sqrt()  # K = Vk Vk^T
            tau += (phi_t @ Vk) @ (phi @ Vk).T
            Q += 1.0 - p_true(ctx.fm, theta, ctx.x_train, ctx.y_train)
        m = len(ckpts)
        tau, Q = tau / m, Q / m
        out_to_loss = 1.0 - p_true(ctx.fm, ctx.theta, ctx.x_test, ctx.y_test)
        self.diagnostics.update({"n_checkpoints": m, "ridge": ridge, "kernel_rank": ranks,
                                 "projected": self.proj_dim < ctx.n_params, "kernel": "direct" if direct else "eigh"})
        return out_to_loss[:, None] * tau * Q[None, :]
