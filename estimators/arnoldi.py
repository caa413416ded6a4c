"""``arnoldi``: influence restricted to the top eigenspace of the Hessian (Schioppa et al. 2022).

Schioppa, Zablotskaia, Vilar & Sokolov, "Scaling Up Influence Functions", AAAI 2022.

The Arnoldi iteration (for a symmetric operator: Lanczos with full re-orthogonalisation) runs
``n_iters`` curvature-vector products from a seeded random start and yields an orthonormal Krylov
basis ``Q`` and the projected matrix ``T = Q H Q^T``. Its eigenpairs give Ritz pairs
``(lambda_k, u_k = Q^T s_k)``; the ``top_p`` of largest ``|lambda_k|`` are kept and

    I[j, i] = (1/n) sum_k (g_test_j . u_k) (g_train_i . u_k) / (lambda_k + damping)

-- the influence function with ``H^-1`` replaced by its restriction to the dominant eigenspace.
Gradients enter only through their projections onto the ``top_p`` directions. With
``n_iters >= top_p >= P`` the basis is complete and this equals ``exact``.

Hyperparameters:
    n_iters     Arnoldi steps = curvature-vector products (default 200; capped at P).
    top_p       eigenpairs kept (default 100; capped at n_iters). Schioppa et al. keep the
                largest-magnitude ones; negative eigenvalues (a saddle) are kept with their sign.
    curvature   "hessian" (default) or "ggn".
    damping     added to every kept eigenvalue (default 0).
    seed        seed of the start vector (a private torch.Generator).
    max_basis_mb  refuse settings whose basis (n_iters x P floats) exceeds this.
    max_seconds refuse (``EstimatorUnsupported``) when the ``n_iters`` Hessian-vector products would take
                longer than this at the product time measured on the setting (default 120 s).

Diagnostics: the kept eigenvalues, how many are negative, the Ritz residuals
``||H u - lambda u||`` of the kept pairs (converged eigenpairs have small ones), rank.
"""

from dataclasses import dataclass

import torch

from influence_bench import Estimator, EstimatorUnsupported, register
from influence_bench.curvature.products import arnoldi

CURVATURES = ("hessian", "ggn")


@register
@dataclass
class Arnoldi(Estimator):
    name = "arnoldi"
    tags = frozenset({"hvp"})

    n_iters: int = 200
    top_p: int = 100
    curvature: str = "hessian"
    damping: float = 0.0
    seed: int = 0
    max_basis_mb: float = 4096.0
    max_seconds: float = 120.0  # refuse when the n_iters Hessian-vector products would take longer

    def __post_init__(self):
        if self.curvature not in CURVATURES:
            raise ValueError(f"arnoldi: curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if self.n_iters < 1 or self.top_p < 1:
            raise ValueError(f"arnoldi: need n_iters >= 1 and top_p >= 1, got {self.n_iters}, {self.top_p}")

    def influence(self, ctx):
        P = ctx.n_params
        m = min(self.n_iters, P)
        mb = m * P * ctx.theta.element_size() / 2**20
        if mb > self.max_basis_mb:
            raise EstimatorUnsupported(
                f"the Arnoldi basis of n_iters={m} vectors x {P} parameters needs {mb:.0f} MiB > "
                f"max_basis_mb={self.max_basis_mb:.0f}. Lower n_iters, raise max_basis_mb, or use `cg`/`lissa`.")
        ctx.check_hvp_budget(m, self.name, self.max_seconds, f"an Arnoldi basis of {m} vectors")
        products = ctx.curvature_operator(self.curvature)  # one autograd graph, reused every step
        gen = torch.Generator().manual_seed(self.seed)
        Q, T, beta = arnoldi(lambda v: products(v[None])[0], P, m, generator=gen,
                             dtype=ctx.dtype, device=ctx.device)
        evals, evecs = torch.linalg.eigh(T)
        p = min(self.top_p, m)
        keep = torch.argsort(evals.abs(), descending=True)[:p]
        lam, S = evals[keep] + self.damping, evecs[:, keep]
        # drop numerically zero eigenvalues (only possible without weight decay / damping)
        tiny = lam.abs() <= 1e3 * torch.finfo(lam.dtype).eps * float(evals.abs().max())
        U = S[:, ~tiny].T @ Q  # [p, P] Ritz vectors
        lam = lam[~tiny]
        a = ctx.test_grads() @ U.T  # [n_test, p]
        b = ctx.train_grads() @ U.T  # [n_train, p]
        d = self.diagnostics
        d["curvature"] = self.curvature
        d["n_iters"] = m
        d["rank"] = int(lam.numel())
        d["eigenvalues"] = lam.tolist()
        d["top_eigenvalue"] = float(evals.max())
        d["n_negative"] = int((lam < 0).sum())
        d["n_dropped_zero"] = int(tiny.sum())
        ritz = (beta * S[-1, ~tiny]).abs()  # ||H u - lambda u||, exact for the Arnoldi relation
        d["ritz_residual_max"] = float(ritz.max()) if ritz.numel() else 0.0
        d["complete_basis"] = m == P
        return (a / lam) @ b.T / ctx.n_train
