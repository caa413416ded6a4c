"""Facts about a trained setting recorded with every result: curvature (the paper's explanation
of fragility), how stationary theta* is, which test points were chosen and why, the data source.

Computed once per context and attached to each case as ``diagnostics["setting_info"]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from influence_bench.api.context import Context
from influence_bench.groundtruth.engine import EXPLICIT_HESSIAN_MAX, preconditioner
from influence_bench.paths import portable, write_json
from influence_bench.training import shipped as shipped_models
from influence_bench.training.fit import model_cache_path

# Up to DENSE_EIG_MAX parameters all eigenvalues come from the explicit Hessian (eigvalsh,
# seconds). Up to the engine's EXPLICIT_HESSIAN_MAX the Hessian and ground truth's factorisation
# of H + damping I exist anyway: Lanczos (ARPACK) on H for the top, on the inverse for the bottom
# (plain Lanczos for the smallest of a 7850-parameter MNIST Hessian took minutes). Above it,
# Lanczos on Hessian-vector products. Beyond the dense range only the single smallest eigenvalue,
# to BOTTOM_TOL: MNIST's logistic-regression Hessian has a large eigenspace at exactly the weight
# decay (constant border pixels), where Lanczos converges slowly (measured: top 3 in 2 s, the
# smallest to 1e-4 in 30 s, the smallest 3 to 1e-6 in > 7 min on the shared cores).
DENSE_EIG_MAX = 3000
BOTTOM_TOL = 1e-4
# Above this many seconds for the explicit Hessian (n_params x the measured HVP time), only the top
# eigenvalues, by Lanczos on HVPs (``_top_only``).
HESSIAN_BUDGET_S = 300.0
TOP_ONLY_HVPS = 10


def hessian_extremes(ctx: Context, k: int = 3) -> dict:
    """The ``k`` largest and the smallest (most negative) Hessian eigenvalues of the training
    objective (incl. weight decay) at theta*, with the method used: ``bottom`` holds ``k`` values
    from the dense route, one otherwise. Lanczos finds the extreme ones reliably; beyond them it
    can miss the multiplicity of a repeated eigenvalue."""
    if ctx.setting.model.family not in ("logreg", "linear") \
            and ctx.n_params * ctx.hvp_seconds() > HESSIAN_BUDGET_S:
        return _top_only(ctx, k)
    if ctx.n_params <= DENSE_EIG_MAX:
        ev = torch.linalg.eigvalsh(ctx.hessian()).cpu().numpy()
        return {"top": ev[::-1][:k].tolist(), "bottom": ev[:k].tolist(), "method": "dense eigvalsh",
                "n_negative": int((ev < 0).sum())}
    v0 = np.random.default_rng(0).standard_normal(ctx.n_params)
    out: dict = {"method": "lanczos (scipy eigsh)"}
    if ctx.n_params <= EXPLICIT_HESSIAN_MAX:  # formed for ground truth anyway
        H = ctx.hessian()
        out["top"] = _lanczos(lambda v: H @ v, ctx, v0, k, out)[::-1][:k]
        damping = ctx.setting.ground_truth.damping
        pre = preconditioner(ctx)  # ground truth's factorisation of H + damping I
        if pre.chol is not None:  # positive definite: the smallest eigenvalue is the largest of the inverse
            mu = _lanczos(lambda v: pre.solve(v[None])[0], ctx, v0, 1, out, tol=BOTTOM_TOL)
            out["bottom"] = sorted((1.0 / np.asarray(mu) - damping).tolist())
            out["method"] += ", bottom by Lanczos on the inverse (Cholesky factor)"
        else:  # indefinite: all of them, once (ground truth has paid for an eigendecomposition too)
            ev = torch.linalg.eigvalsh(H).cpu().numpy()
            out.update(top=ev[::-1][:k].tolist(), bottom=ev[:k].tolist(), method="dense eigvalsh",
                       n_negative=int((ev < 0).sum()))
        return out
    out["top"] = _lanczos(ctx.hvp, ctx, v0, k, out)[::-1][:k]
    out["bottom"] = _lanczos(ctx.hvp, ctx, v0, 1, out, which="SA", tol=BOTTOM_TOL)
    return out


def _top_only(ctx: Context, k: int) -> dict:
    """Where the explicit Hessian would cost more than ``HESSIAN_BUDGET_S`` (CNNs on CPU): the top
    ``k`` eigenvalues by ``TOP_ONLY_HVPS`` Lanczos iterations on Hessian-vector products (the
    extreme eigenvalues converge first); the bottom of the spectrum is not computed (each product
    costs seconds, and the smallest eigenvalues converge slowly)."""
    from influence_bench.curvature.products import lanczos_top_eigenvalues

    gen = torch.Generator().manual_seed(0)
    top = lanczos_top_eigenvalues(ctx.hvp, ctx.n_params, k=k, n_iters=min(TOP_ONLY_HVPS, ctx.n_params),
                                  generator=gen, dtype=ctx.dtype, device=ctx.device)
    return {"top": [float(v) for v in top], "bottom": None,
            "method": f"lanczos on HVPs, top only ({TOP_ONLY_HVPS} products of {ctx.hvp_seconds():.2f} s each)"}


def _lanczos(apply, ctx: Context, v0: np.ndarray, k: int, out: dict, which: str = "LA",
             tol: float = 1e-6) -> list[float]:
    """Sorted (ascending) ``k`` extreme eigenvalues of the symmetric map ``apply`` (torch -> torch)."""
    def matvec(v):
        t = torch.as_tensor(np.ravel(v), dtype=ctx.dtype, device=ctx.device)
        return apply(t).detach().cpu().numpy()

    op = LinearOperator((ctx.n_params, ctx.n_params), matvec=matvec, dtype=np.float64)
    try:
        vals = eigsh(op, k=k, which=which, v0=v0, tol=tol, maxiter=1000, return_eigenvectors=False)
    except ArpackNoConvergence as exc:
        vals = exc.eigenvalues
        out["converged"] = False
    return np.sort(np.asarray(vals, dtype=np.float64)).tolist()


def info_cache_path(ctx: Context) -> Path:
    """The cached record of ``ctx``: beside the trained model, keyed by theta*'s sha256 (the record
    describes one theta*; another one, e.g. trained on another machine, gets its own)."""
    path = model_cache_path(ctx.setting)
    return path.with_name(f"{path.stem}-theta{ctx.theta_sha256[:16]}.info.json")


def setting_info(ctx: Context, use_cache: bool = True) -> dict:
    """JSON-ready facts about ``ctx``'s setting (memoised on the context, and on disk beside the
    trained model keyed by theta*; the record shipped beside a shipped theta* is read first)."""
    path = info_cache_path(ctx)

    def make():
        if use_cache:
            shipped = shipped_models.load_info(ctx.setting, ctx.theta_sha256)
            if shipped is not None:
                return shipped
        if use_cache and path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                pass  # unreadable: recompute and overwrite
        info = {
            "n_params": ctx.n_params,
            "n_train": ctx.n_train,
            "train_grad_norm": float(ctx.train_grad_norm) if np.isfinite(ctx.train_grad_norm) else None,
            "hessian_eigenvalues": hessian_extremes(ctx),
            # select_test_points' order: highest loss, median loss (unless the same point), random
            "test_points": {"highest_loss": int(ctx.test_idx[0]),
                            "median_loss": int(ctx.test_idx[1]) if ctx.n_test > 1 else None,
                            "random": [int(i) for i in ctx.test_idx[2:]]},
            "data_source": portable(ctx.data.source),
        }
        if use_cache:
            write_json(path, info)
        return info

    return ctx.cached("setting_info", make)
