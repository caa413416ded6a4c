"""Facts about a trained setting recorded with every result: curvature (the paper's explanation
of fragility), how stationary theta* is, which test points were chosen and why, the data source.

Computed once per context and attached to each case as ``diagnostics["setting_info"]``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from .context import Context
from .groundtruth.engine import EXPLICIT_HESSIAN_MAX

# Up to DENSE_EIG_MAX parameters all eigenvalues come from the explicit Hessian (eigvalsh,
# seconds). Up to the engine's EXPLICIT_HESSIAN_MAX the Hessian is formed anyway (ground truth's
# preconditioner), so Lanczos (ARPACK) runs on it; above, Lanczos on Hessian-vector products.
DENSE_EIG_MAX = 3000


def hessian_extremes(ctx: Context, k: int = 3) -> dict:
    """The ``k`` largest and ``k`` smallest (most negative) Hessian eigenvalues of the training
    objective (incl. weight decay) at theta*, with the method used. Lanczos finds the extreme
    ones reliably; beyond them it can miss the multiplicity of a repeated eigenvalue."""
    if ctx.n_params <= DENSE_EIG_MAX:
        ev = torch.linalg.eigvalsh(ctx.hessian()).cpu().numpy()
        return {"top": ev[::-1][:k].tolist(), "bottom": ev[:k].tolist(), "method": "dense eigvalsh",
                "n_negative": int((ev < 0).sum())}
    if ctx.n_params <= EXPLICIT_HESSIAN_MAX:  # formed for ground truth anyway: cheap mat-vecs
        H = ctx.hessian()
        matvec = lambda v: (H @ torch.as_tensor(v, dtype=H.dtype, device=H.device)).cpu().numpy()  # noqa: E731
    else:
        def matvec(v):
            t = torch.as_tensor(np.ravel(v), dtype=ctx.dtype, device=ctx.device)
            return ctx.hvp(t).detach().cpu().numpy()
    op = LinearOperator((ctx.n_params, ctx.n_params), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(ctx.n_params)
    out = {"method": "lanczos (scipy eigsh)"}
    for key, which in (("top", "LA"), ("bottom", "SA")):
        try:
            vals = eigsh(op, k=k, which=which, v0=v0, tol=1e-6, maxiter=300, return_eigenvectors=False)
        except ArpackNoConvergence as exc:
            vals = exc.eigenvalues
            out["converged"] = False
        vals = np.sort(np.asarray(vals, dtype=np.float64))
        out[key] = (vals[::-1] if key == "top" else vals).tolist()
    return out


def setting_info(ctx: Context) -> dict:
    """JSON-ready facts about ``ctx``'s setting (memoised on the context)."""
    def make():
        return {
            "n_params": ctx.n_params,
            "n_train": ctx.n_train,
            "train_grad_norm": float(ctx.train_grad_norm),
            "hessian_eigenvalues": hessian_extremes(ctx),
            # select_test_points' order: highest loss, median loss (unless the same point), random
            "test_points": {"highest_loss": int(ctx.test_idx[0]),
                            "median_loss": int(ctx.test_idx[1]) if ctx.n_test > 1 else None,
                            "random": [int(i) for i in ctx.test_idx[2:]]},
            "data_source": ctx.data.source,
        }

    return ctx._memo("setting_info", make)
