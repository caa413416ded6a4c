"""Batched objective, gradients and Hessian-vector products for tanh MLPs, written out by hand.

``torch.func.vmap`` over models of a small MLP (Iris: P = 403, n = 120) spends most of its time
dispatching tiny kernels and building the double-backward graph. Here all B models run as one
chain of batched matmuls: the forward pass, its backward pass and, for Hessian-vector products,
Pearlmutter's R-forward and R-backward passes (exact second derivatives, tanh'' included). Same
numbers as the generic path to rounding (tests compare them).

Applies to ``nn.Sequential(Linear, Tanh, ..., Linear, Tanh, Linear)`` (``models.flat.mlp``) with
cross-entropy or ``0.5 ||out - y||^2`` loss. Flat layout as ``nn.Linear``: per layer ``W``
(out x in, row-major) then ``b``. The objective is ``J(theta; w) = sum_i w_i l_i / n +
wd / 2 ||theta||^2`` (``products.objective``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from influence_bench.models.flat import FlatModel


def applies(fm: FlatModel) -> bool:
    """A ``Sequential`` of ``Linear`` layers with ``Tanh`` between them (and not after the last)."""
    mods = list(fm.module.children()) if isinstance(fm.module, nn.Sequential) else []
    if len(mods) < 3 or len(mods) % 2 == 0 or fm.loss not in ("cross_entropy", "mse"):
        return False
    return all(isinstance(m, nn.Linear) if i % 2 == 0 else isinstance(m, nn.Tanh) for i, m in enumerate(mods))


def _layers(fm: FlatModel, thetas: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(W [B, out, in], b [B, out])``, views of ``thetas`` [B, P]."""
    out, start, B = [], 0, thetas.shape[0]
    for i in range(0, len(fm.shapes), 2):
        (o, n_in), k = fm.shapes[i], fm.numels[i]
        W = thetas[:, start:start + k].reshape(B, o, n_in)
        out.append((W, thetas[:, start + k:start + k + o]))
        start += k + o
    return out


def _flat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    B = parts[0][0].shape[0]
    return torch.cat([t for W, b in parts for t in (W.reshape(B, -1), b)], dim=1)


def _linear(a: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``a W^T + b`` per model: ``a`` [B, n, in] (or [n, in], shared), ``W`` [B, out, in]."""
    z = torch.matmul(a, W.transpose(1, 2))
    return z if b is None else z + b[:, None, :]


def _forward(layers, x) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(inputs of every layer: x, then each hidden activation [B, n, width]; output [B, n, C])."""
    acts, a = [x], x
    for i, (W, b) in enumerate(layers):
        z = _linear(a, W, b)
        if i == len(layers) - 1:
            return acts, z
        a = torch.tanh(z)
        acts.append(a)
    raise AssertionError("unreachable")


def _losses(loss: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    B, n, C = out.shape
    if loss == "cross_entropy":
        return F.cross_entropy(out.reshape(B * n, C), y.repeat(B), reduction="none").reshape(B, n)
    return 0.5 * (out - y.reshape(n, C)).pow(2).sum(-1)


def _dloss(loss: str, out: torch.Tensor, y: torch.Tensor, scale: torch.Tensor):
    """(d objective / d out [B, n, C], softmax probabilities or None for mse); ``scale`` = w / n [B, n]."""
    if loss == "cross_entropy":
        p = torch.softmax(out, -1)
        return (p - F.one_hot(y, out.shape[-1]).to(out.dtype)) * scale[:, :, None], p
    return (out - y.reshape(out.shape[1:])) * scale[:, :, None], None


def _backward(layers, acts, e) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer gradients ``(gW, gb)``, backpropagating ``e`` = d objective / d output."""
    grads, d = [], e
    for i in range(len(layers) - 1, -1, -1):
        grads.append((torch.matmul(d.transpose(1, 2), acts[i]), d.sum(1)))
        if i:
            d = (d @ layers[i][0]) * (1 - acts[i] ** 2)
    return grads[::-1]


def objective(fm: FlatModel, thetas, weights, x, y, weight_decay: float) -> torch.Tensor:
    """``[B]`` objectives."""
    _, out = _forward(_layers(fm, thetas), x)
    return (weights * _losses(fm.loss, out, y)).sum(1) / x.shape[0] + 0.5 * weight_decay * thetas.pow(2).sum(1)


def grads(fm: FlatModel, thetas, weights, x, y, weight_decay: float) -> torch.Tensor:
    """``[B, P]`` gradients."""
    layers = _layers(fm, thetas)
    acts, out = _forward(layers, x)
    e, _ = _dloss(fm.loss, out, y, weights / x.shape[0])
    return _flat(_backward(layers, acts, e)) + weight_decay * thetas


def hvps(fm: FlatModel, thetas, weights, vs, x, y, weight_decay: float) -> torch.Tensor:
    """``[B, P]`` exact Hessian-vector products ``H_b v_b`` (Pearlmutter's R-operator)."""
    return hvp_operator(fm, thetas, weights, x, y, weight_decay)(vs)


def hvp_operator(fm: FlatModel, thetas, weights, x, y, weight_decay: float):
    """``vs [B, P] -> H_b v_b`` at fixed ``thetas`` / ``weights``: the forward pass, the loss
    derivative and the backpropagated ``d`` of every layer do not depend on ``v``, so they are
    computed once here, and each call (a CG iteration) runs only the R-passes. The same operations
    on the same values as computing everything per call, so the same numbers bit for bit."""
    layers = _layers(fm, thetas)
    acts, out = _forward(layers, x)
    scale = weights / x.shape[0]
    e, p = _dloss(fm.loss, out, y, scale)
    slopes = [None] + [1 - a ** 2 for a in acts[1:]]  # tanh' of each hidden layer, a = tanh(z)
    # the plain backward pass, per layer i > 0: d at layer i's output, da = d W_i, 2 da a_i (for R)
    back, d = {}, e
    for i in range(len(layers) - 1, 0, -1):
        da = d @ layers[i][0]
        back[i] = (d, da, 2 * da * acts[i])
        d = da * slopes[i]
    first_d = d

    def apply(vs: torch.Tensor) -> torch.Tensor:
        dirs = _layers(fm, vs)
        # R-forward: Ra_l (directional derivative of each layer's input), Rz of the output
        Racts, Ra = [None], None
        for i, ((W, _), (V, c)) in enumerate(zip(layers, dirs)):
            Rz = _linear(acts[i], V, c) + (0 if Ra is None else _linear(Ra, W, None))
            if i == len(layers) - 1:
                break
            Ra = slopes[i + 1] * Rz
            Racts.append(Ra)
        if p is not None:  # R of (p - onehot) * s: s (diag(p) - p p^T) Rz
            Re = (p * Rz - p * (p * Rz).sum(-1, keepdim=True)) * scale[:, :, None]
        else:
            Re = Rz * scale[:, :, None]
        # R-backward
        out_grads, Rd = [], Re
        for i in range(len(layers) - 1, -1, -1):
            W, _ = layers[i]
            V, _ = dirs[i]
            d = back[i][0] if i else first_d
            a, Ra = acts[i], Racts[i]
            RgW = torch.matmul(Rd.transpose(1, 2), a)
            if Ra is not None:
                RgW = RgW + d.transpose(1, 2) @ Ra
            out_grads.append((RgW, Rd.sum(1)))
            if i:
                _, da, two_da_a = back[i]
                Rda = Rd @ W + d @ V
                Rd = Rda * slopes[i] - two_da_a * Ra
        return _flat(out_grads[::-1]) + weight_decay * vs

    return apply
