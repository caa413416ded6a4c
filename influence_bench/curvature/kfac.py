"""Kronecker-factored curvature (K-FAC and eigenvalue-corrected EK-FAC) for ``nn.Linear`` models.

Shared by the ``kfac`` and ``ekfac`` estimators, and by the last-layer estimators (``last-layer``,
``representer``) for the layer bookkeeping.

**Layers.** Every parameter of the model must belong to an ``nn.Linear`` that is called once
per forward pass; parameter-free modules (``Tanh``, ``ReLU``, ``Flatten``, ...) may sit in between.
Anything else (``Conv2d``, normalisation layers, ...) raises ``EstimatorUnsupported``. Layer l maps
its input ``a`` to the pre-activation ``s = W a + b``; with the bias column, ``a~ = [a; 1]`` and
``W~ = [W | b]`` (``[out, in+1]``), the per-sample gradient is ``dL/dW~ = delta a~^T`` with
``delta = dL/ds``. The flat layout of theta is the module's ``named_parameters`` order
(``FlatModel.layer_slices``: W row-major, then b); ``to_extended`` / ``from_extended`` convert a
layer's slice of a flat vector to and from ``W~``, whose row-major vectorisation is
``delta (x) a~`` -- so a layer's curvature block is written ``S (x) A`` (output factor first).

**The curvature.** The generalised Gauss-Newton (GGN) matrix of the training objective,
``G = (1/n) sum_i J_i^T Lam_i J_i + weight_decay I``, with ``J_i`` the Jacobian of the model
output of sample i and ``Lam_i`` the Hessian of the loss in the output (softmax cross-entropy:
``diag(p_i) - p_i p_i^T``; squared error: ``I``). It does not depend on the labels. K-FAC keeps
only the diagonal blocks of G (one per layer) and factors each as

    E_i[(S_i) (x) (a~_i a~_i^T)]  ~=  S (x) A,     A = E_i[a~_i a~_i^T],  S = E_i[S_i],

where ``S_i = J_{s,i}^T Lam_i J_{s,i}`` is the GGN of sample i in the layer's pre-activations.
The label-free expectation inside ``S_i`` is taken **exactly**, not by sampling: ``Lam_i`` is
written as ``sum_c u_ic u_ic^T`` (cross-entropy: ``u_ic = sqrt(p_ic) (p_i - e_c)``, i.e. the
loss gradient for label c weighted by the model's probability of c; squared error:
``u_ic = e_c``) and every ``u_ic`` is back-propagated (one backward pass per output), so
``S_i = sum_c g_ic g_ic^T`` with ``g_ic = J_{s,i}^T u_ic``. This is the GGN (= the "true" Fisher for
softmax outputs), never the empirical Fisher of the observed labels.

**EK-FAC** (George et al. 2018; Grosse et al. 2023) keeps the Kronecker eigenbasis
``Q_S (x) Q_A`` of K-FAC and replaces the eigenvalues ``lam_S (x) lam_A`` by the exact second
moments of the per-sample GGN "gradients" in that basis,
``Lam*[o, a] = E_i sum_c ((Q_S^T g_ic)_o)^2 ((Q_A^T a~_i)_a)^2``, which equals
``diag((Q_S (x) Q_A)^T G_l (Q_S (x) Q_A))``: the best diagonal in that basis (in Frobenius norm), so
EK-FAC is never further from the exact GGN block than K-FAC.

Weight decay (and an optional damping) is added to every eigenvalue: the inverse used is
``Q diag(1 / (eigenvalue + weight_decay + damping)) Q^T`` per layer, exact for ``S (x) A + c I``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from influence_bench.curvature.layers import (  # noqa: F401
    _SUGGEST,
    LinearLayer,
    final_features,
    final_linear,
    flat_positions,
    forward_with_layers,
    from_extended,
    linear_layers,
    output_hessian,
    output_hessian_factors,
    output_loss_grad,
    to_extended,
)
from influence_bench.errors import EstimatorUnsupported
from influence_bench.models.flat import FlatModel

# ---- layer bookkeeping -------------------------------------------------------------------------

# ---- the loss in the model output ---------------------------------------------------------------

# ---- statistics and factors ---------------------------------------------------------------------

@dataclass
class LayerStats:
    """Per-layer quantities of one dataset at one theta, all detached."""

    inputs: list[torch.Tensor]  # per layer [n, in+1]: a~ (with the bias column)
    ggn_grads: list[torch.Tensor]  # per layer [C, n, out]: g_ic = J_s^T u_ic (label-free)
    loss_grads: list[torch.Tensor]  # per layer [n, out]: delta_i = dL_i/ds (observed labels)


def layer_stats(fm: FlatModel, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                layers: list[LinearLayer], who: str = "kfac", ggn: bool = True) -> LayerStats:
    theta = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        out, ins, outs = forward_with_layers(fm, theta, x, layers, who)
        if out.dim() != 2:
            raise EstimatorUnsupported(f"`{who}` expects a model output of shape [n, C], got {tuple(out.shape)}")
        o = out.detach()
        ggn_grads = []
        if ggn:
            U = output_hessian_factors(fm.loss, o)
            per_c = [torch.autograd.grad(out, outs, U[c], retain_graph=True) for c in range(U.shape[0])]
            ggn_grads = [torch.stack([g[k] for g in per_c]).detach() for k in range(len(layers))]
        loss_grads = [g.detach() for g in torch.autograd.grad(out, outs, output_loss_grad(fm.loss, o, y))]
    inputs = []
    for l, a in zip(layers, ins):
        a = a.detach()
        if l.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
        inputs.append(a)
    return LayerStats(inputs, ggn_grads, loss_grads)


@dataclass
class LayerFactors:
    """K-FAC factors of one layer and their eigendecompositions (eigenvalues clamped at 0)."""

    layer: LinearLayer
    A: torch.Tensor  # [in+1, in+1]
    S: torch.Tensor  # [out, out]
    lam_A: torch.Tensor
    Q_A: torch.Tensor
    lam_S: torch.Tensor
    Q_S: torch.Tensor
    corrected: torch.Tensor | None = None  # [out, in+1] EK-FAC eigenvalues (None: K-FAC)

    def eigenvalues(self, corrected: bool) -> torch.Tensor:
        """``[out, in+1]`` eigenvalues of the layer's curvature block in the basis ``Q_S (x) Q_A``."""
        if corrected:
            if self.corrected is None:
                raise ValueError("EK-FAC eigenvalues were not computed")
            return self.corrected
        return self.lam_S[:, None] * self.lam_A[None, :]

    def to_basis(self, V: torch.Tensor) -> torch.Tensor:
        """``[k, out, in+1]`` -> coordinates in the Kronecker eigenbasis: ``Q_S^T V Q_A``."""
        return self.Q_S.T @ V @ self.Q_A

    def from_basis(self, V: torch.Tensor) -> torch.Tensor:
        return self.Q_S @ V @ self.Q_A.T

    def dense(self, corrected: bool) -> torch.Tensor:
        """The ``[out(in+1), out(in+1)]`` curvature block (no weight decay), row-major ``W~`` layout."""
        Q = torch.kron(self.Q_S, self.Q_A)
        return Q @ torch.diag(self.eigenvalues(corrected).reshape(-1)) @ Q.T


def _eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lam, Q = torch.linalg.eigh(0.5 * (M + M.T))
    return lam.clamp_min(0.0), Q


def compute_factors(stats: LayerStats, layers: list[LinearLayer]) -> list[LayerFactors]:
    """K-FAC factors ``A = E[a~ a~^T]``, ``S = E_i[sum_c g_ic g_ic^T]`` and their eigenbases."""
    out = []
    for l, a, g in zip(layers, stats.inputs, stats.ggn_grads):
        n = a.shape[0]
        A = a.T @ a / n
        G2 = g.reshape(-1, g.shape[-1])  # [C n, out]
        S = G2.T @ G2 / n
        out.append(LayerFactors(l, A, S, *_eigh(A), *_eigh(S)))
    return out


def eigenvalue_correction(stats: LayerStats, fs: list[LayerFactors]) -> list[LayerFactors]:
    """EK-FAC: the same factors with ``corrected = E_i sum_c (Q_S^T g_ic)^2 (Q_A^T a~_i)^2`` (elementwise)."""
    out = []
    for f, a, g in zip(fs, stats.inputs, stats.ggn_grads):
        gs2 = (g @ f.Q_S).pow(2).sum(0)  # [n, out]: sum_c (Q_S^T g_ic)^2
        as2 = (a @ f.Q_A).pow(2)  # [n, in+1]
        out.append(dataclasses.replace(f, corrected=gs2.T @ as2 / a.shape[0]))
    return out


def train_stats(ctx, who: str = "kfac") -> tuple[list[LinearLayer], LayerStats]:
    """The layers and the training set's layer statistics at theta*, once per context."""
    layers = ctx.cached(("kfac:layers",), lambda: linear_layers(ctx.fm, who))
    return layers, ctx.cached(("kfac:train-stats",),
                             lambda: layer_stats(ctx.fm, ctx.theta, ctx.x_train, ctx.y_train, layers, who))


def factors(ctx, corrected: bool, who: str = "kfac") -> list[LayerFactors]:
    """K-FAC (``corrected=False``) or EK-FAC factors of the context's training set at theta*,
    computed once per context (the layer statistics are shared by both)."""
    layers, stats = train_stats(ctx, who)
    fs = ctx.cached(("kfac:factors",), lambda: compute_factors(stats, layers))
    if not corrected:
        return fs
    return ctx.cached(("kfac:ekfac-factors",), lambda: eigenvalue_correction(stats, fs))


def inverse_apply(fs: list[LayerFactors], V: list[torch.Tensor], shift: float, corrected: bool) -> list[torch.Tensor]:
    """Apply ``(block + shift I)^-1`` layer by layer to extended matrices ``V[l]`` ([k, out, in+1])."""
    return [f.from_basis(f.to_basis(v) / (f.eigenvalues(corrected) + shift)) for f, v in zip(fs, V)]


def dense_curvature(fs: list[LayerFactors], n_params: int, corrected: bool, shift: float = 0.0) -> torch.Tensor:
    """The block-diagonal ``[P, P]`` approximation in theta's flat layout (for tests / small models)."""
    M = fs[0].A.new_zeros(n_params, n_params)
    for f in fs:
        pos = flat_positions(f.layer).to(M.device)
        M[pos[:, None], pos[None, :]] = f.dense(corrected)
    M.diagonal().add_(shift)
    return M


def factored_dot(M: torch.Tensor, delta: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``[k, n]``: ``<M_j, delta_i a_i^T> = delta_i^T M_j a_i`` for ``M`` ``[k, out, in]``, ``delta``
    ``[n, out]``, ``a`` ``[n, in]`` -- dot products with per-sample gradients never materialised."""
    k, o, _ = M.shape
    Ma = (a @ M.reshape(k * o, -1).T).reshape(a.shape[0], k, o)  # [n, k, out]
    return (Ma * delta[:, None, :]).sum(-1).T


def kfac_influence(ctx, corrected: bool, damping: float, diagnostics: dict, who: str) -> torch.Tensor:
    """``I[j, i] = (1/n) g_j^T (G~ + (weight_decay + damping) I)^-1 g_i`` with the block-diagonal
    (EK-)FAC ``G~``. Per-sample gradients are used in factored form, ``dL_i/dW~ = delta_i a~_i^T``,
    so no ``[n, P]`` gradient matrix is built."""
    fs = factors(ctx, corrected, who)
    layers, train = train_stats(ctx, who)
    test = layer_stats(ctx.fm, ctx.theta, ctx.x_test, ctx.y_test, layers, who, ggn=False)
    shift = ctx.weight_decay + damping
    top = max(float(f.eigenvalues(corrected).max()) for f in fs)
    floor = 0.0
    if shift <= 0.0:  # no weight decay and no damping: keep the inverse finite
        floor = 1e-8 * max(top, 1e-30)
        shift = floor
    test_ext = [d[:, :, None] * a[:, None, :] for d, a in zip(test.loss_grads, test.inputs)]  # [n_test, out, in+1]
    solved = inverse_apply(fs, test_ext, shift, corrected)
    infl = sum(factored_dot(s, d, a) for s, d, a in zip(solved, train.loss_grads, train.inputs))
    diagnostics.update({
        "curvature": "EK-FAC" if corrected else "K-FAC",
        "expectation": "exact over the model's output distribution (GGN), not sampled",
        "layers": [f"{l.name or '<model>'}: {l.n_out}x{l.n_in}" for l in layers],
        "shift": shift, "weight_decay": ctx.weight_decay, "damping": damping,
        "relative_floor_used": floor > 0.0,
        "top_eigenvalue": top,
        "min_eigenvalue": min(float(f.eigenvalues(corrected).min()) for f in fs),
    })
    return infl / ctx.n_train
