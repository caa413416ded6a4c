"""Facts about a trained setting recorded with every result: curvature (the paper's explanation
of fragility), how stationary theta* is, which test points were chosen and why, the data source.

Computed once per context and attached to each case as ``diagnostics["setting_info"]``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from influence_bench.api.context import Context
from influence_bench.groundtruth.engine import EXPLICIT_HESSIAN_MAX, preconditioner
from influence_bench.hashing import hash_json
from influence_bench.paths import (
    UnreadableFile,
    portable,
    read_json,
    report,
    report_write_failure,
    set_aside,
    shipped_gt_dir,
    write_json,
)
from influence_bench.training import shipped as shipped_models
from influence_bench.training.fit import grad_norm_agrees, model_cache_path

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


INFO_FORMAT = 2  # {"format", "theta_sha256", "sha256" (of the record), "info"}; 1: the bare record (before)


class _BadRecord(Exception):
    def __init__(self, path: Path, state: str, why: str):
        super().__init__(f"curvature record {path} is {state} ({why})")
        self.path = path


class _FutureRecord(Exception):
    pass


def _numbers(v, allow_none: bool = False) -> bool:
    if v is None:
        return allow_none
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                       and np.isfinite(x) for x in v)


def info_problem(info, ctx: Context) -> str | None:
    """What in a stored ``setting_info`` record disagrees with ``ctx`` (or is malformed), else None:
    sizes, the test points chosen at theta*, the recorded gradient norm, the eigenvalue block's shape."""
    if not isinstance(info, dict):
        return f"a JSON {type(info).__name__}, not a record"
    if info.get("n_params") != ctx.n_params or info.get("n_train") != ctx.n_train:
        return (f"n_params {info.get('n_params')!r} / n_train {info.get('n_train')!r}, the setting has "
                f"{ctx.n_params} / {ctx.n_train}")
    want = {"highest_loss": int(ctx.test_idx[0]), "median_loss": int(ctx.test_idx[1]) if ctx.n_test > 1 else None,
            "random": [int(i) for i in ctx.test_idx[2:]]}
    if info.get("test_points") != want:
        return "its test points are not the ones chosen at this theta*"
    eig = info.get("hessian_eigenvalues")
    if not isinstance(eig, dict) or not isinstance(eig.get("method"), str) or not _numbers(eig.get("top")) \
            or not _numbers(eig.get("bottom"), allow_none=True):
        return "malformed hessian_eigenvalues"
    g, here = info.get("train_grad_norm"), float(ctx.train_grad_norm)
    agrees = (g is None) if not np.isfinite(here) else (_numbers([g]) and grad_norm_agrees(float(g), here, ctx.dtype))
    if not agrees:
        return f"train_grad_norm {g!r}, theta* records {here:.3e}"
    if not isinstance(info.get("data_source"), str):
        return "no data_source"
    return None


def _read_record(path: Path, ctx: Context) -> dict:
    """The verified record at ``path``: ``_BadRecord`` when unreadable or inconsistent (format 2: the
    theta* it names and its checksum; any format: ``info_problem``), ``_FutureRecord`` when newer."""
    try:
        doc = read_json(path)
    except UnreadableFile as exc:
        raise _BadRecord(path, "unreadable", exc.why) from None
    except OSError as exc:
        raise _BadRecord(path, "unreadable", exc.strerror or str(exc)) from None
    info = doc
    if isinstance(doc, dict) and "format" in doc:
        fmt = doc["format"]
        if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > INFO_FORMAT:
            raise _FutureRecord(f"format {fmt}")
        if fmt != INFO_FORMAT:
            raise _BadRecord(path, "inconsistent", f"format {fmt!r}")
        info = doc.get("info")
        if doc.get("sha256") != hash_json(info):
            raise _BadRecord(path, "inconsistent", "its content does not match its sha256")
        if doc.get("theta_sha256") != ctx.theta_sha256:
            raise _BadRecord(path, "inconsistent", f"it was computed at theta* {str(doc.get('theta_sha256'))[:16]}, "
                                                   f"not {ctx.theta_sha256[:16]}")
    problem = info_problem(info, ctx)
    if problem:
        raise _BadRecord(path, "inconsistent", problem)
    return info


def setting_info(ctx: Context, use_cache: bool = True) -> dict:
    """JSON-ready facts about ``ctx``'s setting (memoised on the context, and on disk beside the
    trained model keyed by theta*; the record shipped beside a shipped theta* is read first). A
    damaged or inconsistent record is reported (one line on stderr), set aside as
    ``<file>.bad-<n>`` and recomputed; one that cannot be written is reported and not kept."""
    path = info_cache_path(ctx)

    def make():
        if use_cache:
            shipped = shipped_models.load_info(ctx.setting, ctx.theta_sha256)
            if shipped is not None:
                problem = info_problem(shipped, ctx)
                if problem is None:
                    return shipped
                where = shipped_models.info_path_for(ctx.setting, shipped_gt_dir())
                warnings.warn(f"shipped curvature record {where} is inconsistent ({problem}); computing the record "
                              f"of {ctx.setting.id!r} here instead (the shipped file is left as it is)",
                              shipped_models.ShippedModelWarning, stacklevel=4)
        keep = use_cache
        if use_cache and (path.exists() or path.is_symlink()):
            try:
                return _read_record(path, ctx)
            except _FutureRecord as exc:
                report(f"curvature record {path} was written by a newer influence-bench ({exc}); it is left as it "
                       "is, and the record is computed here without caching")
                keep = False
            except _BadRecord as bad:
                try:
                    aside = set_aside(path)
                except OSError as exc:
                    report(f"{bad}; it could not be set aside ({exc.strerror or exc}), so it is recomputed without "
                           "caching")
                    keep = False
                else:
                    report(f"{bad}; set aside as {aside} and recomputed")
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
        if keep:
            try:
                write_json(path, {"format": INFO_FORMAT, "theta_sha256": ctx.theta_sha256, "sha256": hash_json(info),
                                  "info": info})
            except OSError as exc:
                report_write_failure(path.parent, exc, f"could not write the curvature record {path} "
                                                       f"({exc.strerror or exc}); it is not cached")
        return info

    return ctx.cached("setting_info", make)
