"""Losses, per-sample gradients, Hessian-vector products and explicit Hessians on a flat theta.

Conventions: the training objective is
``J(theta; w) = (1/n) * sum_i w_i * loss_i(theta) + (weight_decay / 2) * ||theta||^2``
with ``w = 1`` for the trained model; removing point i sets ``w_i = 0`` (normalisation stays 1/n),
which is exactly what the first-order influence ``(1/n) g_test^T H^-1 g_i`` linearises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, jvp, vmap

from influence_bench.curvature import linear as linear_fastpath
from influence_bench.curvature.krylov import arnoldi, lanczos_top_eigenvalues  # noqa: F401
from influence_bench.models.flat import FlatModel, LogisticRegression


def loss_from_outputs(loss: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample loss: softmax cross-entropy on class labels, or ``0.5 * ||out - y||^2``."""
    if loss == "cross_entropy":
        return F.cross_entropy(out, y, reduction="none")
    return 0.5 * (out - y.reshape(out.shape)).pow(2).sum(-1)


def per_sample_loss(fm: FlatModel, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return loss_from_outputs(fm.loss, fm(theta, x), y)


def objective(fm: FlatModel, theta, x, y, weight_decay: float, w=None) -> torch.Tensor:
    losses = per_sample_loss(fm, theta, x, y)
    data = losses.mean() if w is None else (w * losses).sum() / losses.shape[0]
    return data + 0.5 * weight_decay * theta.pow(2).sum()


def per_sample_grads(fm: FlatModel, theta, x, y, chunk_size: int = 1024) -> torch.Tensor:
    """``[n, P]`` gradients of each unregularised per-sample loss (vectorised, chunked)."""

    def one(xi, yi):
        return grad(lambda t: per_sample_loss(fm, t, xi[None], yi[None])[0])(theta)

    return torch.cat([vmap(one)(x[i:i + chunk_size], y[i:i + chunk_size])
                      for i in range(0, x.shape[0], chunk_size)])


def hvp(fm: FlatModel, theta, x, y, weight_decay: float, v: torch.Tensor) -> torch.Tensor:
    """Hessian-vector product of the training objective (forward-over-reverse)."""
    g = grad(lambda t: objective(fm, t, x, y, weight_decay))
    return jvp(g, (theta,), (v,))[1]


def hessian(fm: FlatModel, theta, x, y, weight_decay: float, chunk_size: int = 256) -> torch.Tensor:
    """Explicit ``[P, P]`` Hessian of the training objective (incl. weight decay)."""
    if isinstance(fm.module, LogisticRegression) and fm.loss == "cross_entropy":
        return _softmax_linear_hessian(fm, theta, x, weight_decay)
    P = theta.numel()
    eye = torch.eye(P, dtype=theta.dtype, device=theta.device)
    cols = [vmap(lambda v: hvp(fm, theta, x, y, weight_decay, v))(eye[i:i + chunk_size])
            for i in range(0, P, chunk_size)]
    H = torch.cat(cols)
    return 0.5 * (H + H.T)


def _softmax_linear_hessian(fm: FlatModel, theta, x, weight_decay: float, parts: int | None = None) -> torch.Tensor:
    """Closed form for logits = W x + b: H = (1/n) sum_i (diag(p_i) - p_i p_i^T) kron [x_i;1][x_i;1]^T.

    Same numbers as the generic HVP route (a unit test checks), ~20x faster on MNIST. The flat
    layout is (W row-major [C, D], then b [C]). H is symmetric and so is each of its C x C blocks
    ``(c, d) = xt^T diag(a_cd) xt`` (``xt = [x, 1]``, ``a_cd = p_c (1[c = d] - p_d) / n``). So only the
    blocks with c <= d are formed, and of each only the ``parts`` x ``parts`` sub-blocks on and above
    its diagonal: (parts + 1) / (2 parts) of the products (5/8 at MNIST's 4 parts; narrower products
    run slower, so it measured 1.4x faster than whole blocks, not 1.6x). Each block is mirrored, so
    H is exactly symmetric, and written straight into the flat layout (no permuted copies of H).
    """
    n, D = x.shape
    E = D + 1
    parts = max(1, min(4, E // 128)) if parts is None else max(1, min(int(parts), E))
    bounds = [round(k * E / parts) for k in range(parts + 1)]
    cuts = [slice(bounds[k], bounds[k + 1]) for k in range(parts)]
    with torch.no_grad():
        p = torch.softmax(fm(theta, x), dim=1)  # [n, C]
        C = p.shape[1]
        xt = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], dim=1)  # [n, D+1]
        H = torch.empty(C * E, C * E, dtype=x.dtype, device=x.device)
        blk = torch.empty(E, E, dtype=x.dtype, device=x.device)
        ax = torch.empty_like(xt)
        for c in range(C):
            for d in range(c, C):
                torch.mul(((p[:, c] * (float(c == d) - p[:, d])) / n)[:, None], xt, out=ax)
                for i, rows in enumerate(cuts):
                    for cols in cuts[i:]:
                        S = xt[:, rows].T @ ax[:, cols]
                        if cols is rows:  # a diagonal sub-block: its upper triangle, mirrored
                            S = S.triu() + S.triu(1).T
                        else:
                            blk[cols, rows] = S.T
                        blk[rows, cols] = S
                _put_block(H, blk, c, d, C, D)
                if d != c:
                    _put_block(H, blk, d, c, C, D)
        H.diagonal().add_(weight_decay)
    return H


def _put_block(H: torch.Tensor, blk: torch.Tensor, c: int, d: int, C: int, D: int) -> None:
    """Block ``(c, d)`` ([D+1, D+1], over ``[W_c, b_c] x [W_d, b_d]``) into the flat layout [W (C*D), b (C)]."""
    rows, cols = slice(c * D, (c + 1) * D), slice(d * D, (d + 1) * D)
    H[rows, cols] = blk[:D, :D]
    H[rows, C * D + d] = blk[:D, D]
    H[C * D + c, cols] = blk[D, :D]
    H[C * D + c, C * D + d] = blk[D, D]


def solve_rows(M: torch.Tensor, rows: torch.Tensor, semidefinite: bool = False) -> tuple[torch.Tensor, str]:
    """``(X, solver)`` with ``X[j] = M^-1 rows[j]`` for a symmetric ``M``: Cholesky when ``M`` is positive
    definite; otherwise the pseudo-inverse for a matrix known to be semi-definite (a GGN without
    weight decay), else LU (an indefinite Hessian at a saddle), and the pseudo-inverse if LU fails
    (exactly singular). ``solver`` says which was used, for the estimator's diagnostics."""
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return torch.cholesky_solve(rows.T, L).T, "cholesky"
    if not semidefinite:
        try:
            return torch.linalg.solve(M, rows.T).T, "lu (not positive definite)"
        except torch.linalg.LinAlgError:
            pass
    return (torch.linalg.pinv(M, hermitian=True) @ rows.T).T, "pseudo-inverse (singular)"



# ---- batched curvature-vector products -------------------------------------------------------

class CurvatureOperator:
    """Batched curvature-vector products of the training objective at a fixed point.

    ``kind="hessian"``: ``H v`` (Hessian of the mean loss + weight decay) by double backward;
    ``kind="ggn"``: ``G v`` with ``G = (1/n) sum_i J_i^T A_i J_i + weight_decay I`` (see ``ggn``), by
    one Jacobian-vector and one vector-Jacobian product. The autograd graph is built once in the
    constructor and reused by every call, and each call handles a whole block of vectors with one
    batched backward (``is_grads_batched``, i.e. ``vmap`` over the cotangents), ``chunk_size``
    vectors at a time (memory).

    Replicated form (LiSSA's independent mini-batches): ``theta`` ``[r, P]``, ``x`` ``[r, b, ...]``,
    ``y`` ``[r, b]``; then ``V`` is ``[r, k, P]`` and row block ``s`` is multiplied by the curvature of
    replica ``s`` (its own parameters and batch). Plain form: ``theta`` ``[P]``, ``V`` ``[k, P]``.

    Softmax logistic regression (where G = H) takes neither graph unless ``closed_form=False``: a
    block is two matrix products with the data, ``J V`` and ``J^T (diag(p) - p p^T) J V`` (the
    probabilities are computed once). On MNIST (4000 x 784, a block of 10 vectors) that measured
    2-3x faster than the double backward (32-35 ms against 60-112 ms on one thread), with the same
    numbers to rounding (a test compares them).
    """

    def __init__(self, fm: FlatModel, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                 weight_decay: float, kind: str = "hessian", chunk_size: int | None = None,
                 closed_form: bool = True):
        if kind not in ("hessian", "ggn"):
            raise ValueError(f"kind must be 'hessian' or 'ggn', got {kind!r}")
        self.kind, self.weight_decay, self.chunk_size, self.loss = kind, weight_decay, chunk_size, fm.loss
        self.replicated = theta.dim() == 2
        self._closed = None
        if closed_form and linear_fastpath.applies(fm):
            self._closed = _softmax_linear_products(fm, theta.detach(), x, weight_decay, self.replicated)
            return
        with torch.enable_grad():
            self._t = theta.detach().clone().requires_grad_(True)
            if self.replicated:
                z = vmap(fm.__call__)(self._t, x)  # [r, b, C]
            else:
                z = fm(self._t, x)  # [n, C]
            if kind == "hessian":
                lead = z.shape[:-1]  # [n] or [r, b]
                losses = loss_from_outputs(fm.loss, z.reshape(-1, z.shape[-1]),
                                           y.reshape(lead.numel(), *y.shape[len(lead):])).reshape(lead)
                self._g = torch.autograd.grad(losses.mean(-1).sum(), self._t, create_graph=True)[0]
            else:
                self._z = z
                self._p = torch.softmax(z.detach(), dim=-1) if fm.loss == "cross_entropy" else None
                self._n = z.shape[-2]
                self._u0 = torch.zeros_like(z, requires_grad=True)
                # J^T u0, linear in u0: differentiating it in u0 gives Jacobian-vector products
                self._jtu = torch.autograd.grad(z, self._t, self._u0, create_graph=True)[0]

    def _block(self, V: torch.Tensor) -> torch.Tensor:
        """Products for ``V``: [k, P] (plain) or [k, r, P] (replicated, already transposed)."""
        if self._closed is not None:
            return self._closed(V)
        if self.kind == "hessian":
            out = torch.autograd.grad(self._g, self._t, V, retain_graph=True, is_grads_batched=True)[0]
        else:
            jv = torch.autograd.grad(self._jtu, self._u0, V, retain_graph=True, is_grads_batched=True)[0]
            u = _output_hessian_apply(self._p, jv) / self._n
            out = torch.autograd.grad(self._z, self._t, u, retain_graph=True, is_grads_batched=True)[0]
        return out + self.weight_decay * V

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        V = V.detach()
        if self.replicated:
            V = V.transpose(0, 1)  # [k, r, P]: the batched (vmapped) dimension leads
        k = V.shape[0]
        if k == 0:
            out = torch.empty_like(V)
        else:
            step = k if not self.chunk_size else int(self.chunk_size)
            out = torch.cat([self._block(V[i:i + step]) for i in range(0, k, step)])
        return out.transpose(0, 1) if self.replicated else out


def _softmax_linear_products(fm: FlatModel, theta: torch.Tensor, x: torch.Tensor, weight_decay: float,
                             replicated: bool):
    """``CurvatureOperator``'s block for logits ``W x + b`` (flat layout ``[W (C*D), b (C)]``):
    ``V -> (1/m) J^T (diag(p) - p p^T) J V + weight_decay V`` over each replica's ``m`` samples, with
    ``J V`` the logits of ``V``'s own ``(W, b)``. ``V``: [k, P] (plain) or [k, r, P] (replicated)."""
    thetas, xs = (theta, x) if replicated else (theta[None], x[None])
    xs = xs.reshape(xs.shape[0], xs.shape[1], -1)  # [r, m, D]
    r, m, D = xs.shape
    C = fm.shapes[0][0]
    p = torch.softmax(xs @ thetas[:, :C * D].reshape(r, C, D).transpose(1, 2) + thetas[:, None, C * D:], -1)

    def block(V: torch.Tensor) -> torch.Tensor:
        Vr = V.transpose(0, 1) if replicated else V[None]  # [r, k, P]
        k = Vr.shape[1]
        u = (xs @ Vr[..., :C * D].reshape(r, k * C, D).transpose(1, 2)).reshape(r, m, k, C)
        u = u + Vr[:, None, :, C * D:]  # J_i v for every sample and vector: [r, m, k, C]
        a = p[:, :, None] * (u - (p[:, :, None] * u).sum(-1, keepdim=True)) / m
        gW = a.reshape(r, m, k * C).transpose(1, 2) @ xs  # [r, k*C, D]
        out = torch.cat([gW.reshape(r, k, C * D), a.sum(1)], dim=-1) + weight_decay * Vr
        return out.transpose(0, 1) if replicated else out[0]

    return block


def hvps(fm: FlatModel, theta, x, y, weight_decay: float, V: torch.Tensor,
         chunk_size: int | None = None) -> torch.Tensor:
    """``[k, P]``: ``H v`` for every row ``v`` of ``V`` (the training-objective Hessian incl. weight
    decay) in one batched double backward; ``chunk_size`` rows at a time (memory). Use
    ``CurvatureOperator`` directly to reuse the graph over many calls."""
    return CurvatureOperator(fm, theta, x, y, weight_decay, "hessian", chunk_size)(V)


# ---- generalised Gauss-Newton (GGN) ------------------------------------------------------------
#
# With outputs z_i = f(theta, x_i) the GGN of the training objective is
#     G = (1/n) sum_i J_i^T A_i J_i + weight_decay * I,
# J_i = dz_i/dtheta ([C, P]) and A_i the Hessian of the loss in the outputs: diag(p_i) - p_i p_i^T
# (p_i = softmax(z_i)) for softmax cross-entropy, the identity for the squared error 0.5||z - y||^2.
# It drops the second-derivative-of-the-network term of the Hessian, so it is positive
# semi-definite (+ weight decay); for a model that is linear in theta (logistic regression, ridge)
# that term is zero and G equals the Hessian.

def _output_hessian_apply(p: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """``A u`` over the last dimension: ``(diag(p) - p p^T) u`` (cross-entropy, ``p`` broadcasts
    against ``u``), or ``u`` itself (squared error, ``p=None``)."""
    if p is None:
        return u
    return p * u - p * (p * u).sum(-1, keepdim=True)


def ggn_vps(fm: FlatModel, theta, x, y, weight_decay: float, V: torch.Tensor,
            chunk_size: int | None = None) -> torch.Tensor:
    """``[k, P]``: ``G v`` for every row of ``V`` (batched Jacobian-vector product, output Hessian,
    vector-Jacobian product); ``chunk_size`` rows at a time."""
    return CurvatureOperator(fm, theta, x, y, weight_decay, "ggn", chunk_size)(V)



def per_sample_jacobians(fm: FlatModel, theta, x) -> torch.Tensor:
    """``[n, C, P]``: the Jacobian of each sample's logits with respect to theta (vmapped)."""
    return vmap(lambda xi: jacrev(lambda t: fm(t, xi[None])[0])(theta))(x)


def ggn(fm: FlatModel, theta, x, y, weight_decay: float, chunk_size: int = 256,
        closed_form: bool = True) -> torch.Tensor:
    """Explicit ``[P, P]`` GGN of the training objective (incl. weight decay), for small models.

    Built from per-sample Jacobians, ``chunk_size`` samples at a time (each chunk holds a
    ``[chunk, C, P]`` Jacobian). For softmax logistic regression, where G equals the Hessian, the
    Kronecker closed form of ``hessian`` is used unless ``closed_form=False``.
    """
    if closed_form and isinstance(fm.module, LogisticRegression) and fm.loss == "cross_entropy":
        return _softmax_linear_hessian(fm, theta, x, weight_decay)
    n, P = x.shape[0], theta.numel()
    G = torch.zeros(P, P, dtype=theta.dtype, device=theta.device)
    with torch.no_grad():
        for i in range(0, n, chunk_size):
            xc = x[i:i + chunk_size]
            J = per_sample_jacobians(fm, theta, xc)  # [m, C, P]
            if fm.loss == "cross_entropy":
                p = torch.softmax(fm(theta, xc), dim=-1)  # [m, C]
                AJ = p[:, :, None] * J - p[:, :, None] * torch.einsum("mc,mcp->mp", p, J)[:, None, :]
            else:  # squared error: A = I
                AJ = J
            G += J.reshape(-1, P).T @ AJ.reshape(-1, P)
        G /= n
        G = 0.5 * (G + G.T)
        G.diagonal().add_(weight_decay)
    return G


# ---- Krylov methods: Arnoldi / Lanczos ------------------------------------------------------

def output_curvature_factors(fm: FlatModel, theta, x, y) -> torch.Tensor:
    """``[k, P, C]`` factors F_i with F_i F_i^T = J_i^T Lambda_i J_i, the per-sample Gauss-Newton
    curvature (J_i: output Jacobian, Lambda_i: Hessian of the loss w.r.t. the outputs).

    Cross-entropy: Lambda = diag(p) - p p^T = L L^T with L = diag(sqrt p) - p sqrt(p)^T.
    Squared error: Lambda = I.
    """
    from torch.func import jacrev

    J = vmap(lambda xi: jacrev(lambda t: fm(t, xi[None])[0])(theta))(x)  # [k, C, P]
    if fm.loss == "mse":
        return J.transpose(1, 2)
    with torch.no_grad():
        p = torch.softmax(fm(theta, x), dim=1)  # [k, C]
        sq = p.sqrt()
        L = torch.diag_embed(sq) - p[:, :, None] * sq[:, None, :]
    return J.transpose(1, 2) @ L
