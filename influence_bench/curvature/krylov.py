"""Krylov methods on a symmetric curvature operator: Arnoldi (Lanczos with full
re-orthogonalisation) for Ritz pairs, and a few Lanczos steps for the top eigenvalues."""

from __future__ import annotations

import torch


def arnoldi(matvec, dim: int, n_iters: int, *, v0: torch.Tensor | None = None,
            generator: torch.Generator | None = None, dtype=torch.float64, device=None,
            breakdown_tol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Arnoldi iteration for a symmetric operator (Lanczos with full re-orthogonalisation).

    ``matvec`` maps a ``[dim]`` vector to ``[dim]``. Runs ``m = min(n_iters, dim)`` steps from
    ``v0`` (default: a Gaussian vector from ``generator``) and returns ``(Q, T, beta)``: ``Q``
    ``[m, dim]`` orthonormal rows spanning the Krylov space, ``T = Q A Q^T`` ``[m, m]``
    (symmetrised; tridiagonal up to rounding) and ``beta``, the norm of the residual after the last
    step (the Ritz pair ``(lam, s)`` of ``T`` has residual ``||A Q^T s - lam Q^T s|| = beta |s[-1]|``).
    On an invariant subspace (breakdown) the iteration continues from a fresh random vector
    orthogonal to ``Q``, so ``m = dim`` steps always give the whole space.
    """
    m = min(int(n_iters), int(dim))
    if m < 1:
        raise ValueError(f"arnoldi needs n_iters >= 1 and dim >= 1, got n_iters={n_iters}, dim={dim}")

    def rand():
        return torch.randn(dim, generator=generator, dtype=dtype, device="cpu").to(device)

    Q = torch.zeros(m, dim, dtype=dtype, device=device)
    Hm = torch.zeros(m, m, dtype=dtype, device=device)
    q = rand() if v0 is None else v0.detach().to(device, dtype).clone()
    Q[0] = q / q.norm()
    beta = 0.0
    scale = 0.0
    for k in range(m):
        w = matvec(Q[k])
        h = Q[:k + 1] @ w
        w = w - Q[:k + 1].T @ h
        h2 = Q[:k + 1] @ w  # second Gram-Schmidt pass ("twice is enough")
        w = w - Q[:k + 1].T @ h2
        Hm[:k + 1, k] = h + h2
        beta = float(w.norm())
        scale = max(scale, float(Hm[:k + 1, k].abs().max()))
        if k + 1 == m:
            break
        if beta <= breakdown_tol * max(scale, 1e-300):  # invariant subspace: restart orthogonally
            for _ in range(3):
                w = rand()
                w = w - Q[:k + 1].T @ (Q[:k + 1] @ w)
                w = w - Q[:k + 1].T @ (Q[:k + 1] @ w)
                if float(w.norm()) > 1e-8:
                    break
            beta_next = 0.0
        else:
            beta_next = beta
        Hm[k + 1, k] = beta_next
        Q[k + 1] = w / w.norm()
    T = 0.5 * (Hm + Hm.T)
    return Q, T, beta


def lanczos_top_eigenvalues(matvec, dim: int, k: int = 1, n_iters: int | None = None, *,
                            which: str = "LA", generator: torch.Generator | None = None,
                            dtype=torch.float64, device=None, return_eigenvectors: bool = False):
    """Top-``k`` eigenvalues of a symmetric operator given only ``matvec`` (e.g. an HVP), by Lanczos.

    ``which="LA"``: largest algebraic (the curvature diagnostic, top Hessian eigenvalue first);
    ``"LM"``: largest magnitude; ``"SA"``: smallest algebraic. ``n_iters`` defaults to
    ``min(dim, max(2k + 20, 40))``; with ``n_iters >= dim`` the result is exact up to rounding.
    Returns the eigenvalues ([k], ordered as selected) or ``(eigenvalues, eigenvectors [k, dim])``.
    The random start comes from ``generator`` (seed it for reproducible numbers; none is global).
    """
    if k < 1 or k > dim:
        raise ValueError(f"need 1 <= k <= dim, got k={k}, dim={dim}")
    if n_iters is None:
        n_iters = min(dim, max(2 * k + 20, 40))
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    Q, T, _ = arnoldi(matvec, dim, max(n_iters, k), generator=generator, dtype=dtype, device=device)
    evals, evecs = torch.linalg.eigh(T)
    if which == "LA":
        order = torch.argsort(evals, descending=True)
    elif which == "SA":
        order = torch.argsort(evals)
    elif which == "LM":
        order = torch.argsort(evals.abs(), descending=True)
    else:
        raise ValueError(f"which must be 'LA', 'LM' or 'SA', got {which!r}")
    order = order[:k]
    if not return_eigenvectors:
        return evals[order]
    return evals[order], evecs[:, order].T @ Q
