"""The ``nn.Linear`` layers of a flat model, as K-FAC, EK-FAC and the last-layer estimators see
them: where each layer's weights sit in theta, a forward pass that records layer inputs and output
gradients, and the output-space loss gradient and Hessian (and its square-root factors)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from influence_bench.errors import EstimatorUnsupported
from influence_bench.models.flat import FlatModel

_SUGGEST = "Use `exact` (explicit Hessian) or `cg` (Hessian-vector products) for this model instead."


@dataclass(frozen=True)
class LinearLayer:
    """One ``nn.Linear`` of the model and where its parameters sit in theta."""

    name: str  # module name ("" for a model that is itself a Linear)
    module: nn.Linear
    weight: slice
    bias: slice | None

    @property
    def n_out(self) -> int:
        return self.module.out_features

    @property
    def n_in(self) -> int:
        """Input size including the bias column."""
        return self.module.in_features + (1 if self.bias is not None else 0)

    @property
    def n_params(self) -> int:
        return self.n_out * self.n_in


def linear_layers(fm: FlatModel, who: str = "kfac") -> list[LinearLayer]:
    """The model's ``nn.Linear`` layers in ``named_modules`` order; raises ``EstimatorUnsupported``
    (naming the layer type) if any parameter belongs to something else."""
    slices = fm.layer_slices()
    layers, covered = [], set()
    for mname, m in fm.module.named_modules():
        own = [n for n, _ in m.named_parameters(recurse=False)]
        if not own:
            continue
        where = f"layer {mname!r}" if mname else "the model"
        if not isinstance(m, nn.Linear):
            raise EstimatorUnsupported(
                f"`{who}` supports nn.Linear layers only; {where} is a {type(m).__name__}. {_SUGGEST}")
        prefix = f"{mname}." if mname else ""
        names = [prefix + "weight"] + ([prefix + "bias"] if m.bias is not None else [])
        if any(n not in slices for n in names):  # shared (tied) parameters are deduplicated
            raise EstimatorUnsupported(f"`{who}`: {where} shares parameters with another layer. {_SUGGEST}")
        covered.update(names)
        layers.append(LinearLayer(mname, m, slices[names[0]], slices[names[1]] if m.bias is not None else None))
    if set(slices) - covered:
        raise EstimatorUnsupported(f"`{who}`: parameters {sorted(set(slices) - covered)} are not in an nn.Linear. {_SUGGEST}")
    if not layers:
        raise EstimatorUnsupported(f"`{who}`: the model has no nn.Linear layer. {_SUGGEST}")
    return layers


def final_linear(fm: FlatModel, who: str) -> LinearLayer:
    """The ``nn.Linear`` whose output is the model output (the last layer), checked on a forward
    pass; other layer types may come before it. Raises ``EstimatorUnsupported`` otherwise."""
    slices = fm.layer_slices()
    cands = [(n, m) for n, m in fm.module.named_modules() if isinstance(m, nn.Linear)]
    if not cands:
        raise EstimatorUnsupported(f"`{who}` needs a final nn.Linear layer; the model has none. {_SUGGEST}")
    mname, m = cands[-1]
    prefix = f"{mname}." if mname else ""
    if prefix + "weight" not in slices:
        raise EstimatorUnsupported(f"`{who}`: the last nn.Linear shares its weight with another layer. {_SUGGEST}")
    return LinearLayer(mname, m, slices[prefix + "weight"], slices[prefix + "bias"] if m.bias is not None else None)


def final_features(fm: FlatModel, theta: torch.Tensor, x: torch.Tensor, who: str
                   ) -> tuple[LinearLayer, torch.Tensor, torch.Tensor]:
    """``(layer, features, output)``: the final ``nn.Linear``, its inputs with the bias column
    (``[n, in+1]``) and the model output (``[n, C]``), checking that the model output *is* that
    layer's output (no activation or other module after it)."""
    layer = final_linear(fm, who)
    with torch.no_grad():
        out, ins, outs = forward_with_layers(fm, theta, x, [layer], who)
    if outs[0].shape != out.shape or not torch.equal(outs[0], out):
        raise EstimatorUnsupported(f"`{who}`: the model output is not the output of its last nn.Linear "
                                   f"({layer.name or '<model>'}); something follows it. {_SUGGEST}")
    a = ins[0]
    if layer.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
    return layer, a, out


def flat_positions(layer: LinearLayer) -> torch.Tensor:
    """``[out * (in+1)]``: the index in theta of each entry of the row-major extended ``W~ = [W | b]``."""
    pos = torch.arange(layer.weight.start, layer.weight.stop).reshape(layer.n_out, -1)
    if layer.bias is not None:
        pos = torch.cat([pos, torch.arange(layer.bias.start, layer.bias.stop)[:, None]], dim=1)
    return pos.reshape(-1)


def to_extended(v: torch.Tensor, layer: LinearLayer) -> torch.Tensor:
    """``[k, P]`` flat vectors -> ``[k, out, in+1]`` extended weight matrices ``[W | b]`` of ``layer``."""
    return v[:, flat_positions(layer).to(v.device)].reshape(v.shape[0], layer.n_out, layer.n_in)


def from_extended(V: torch.Tensor, layer: LinearLayer, n_params: int) -> torch.Tensor:
    """Inverse of ``to_extended``: ``[k, out, in+1]`` -> ``[k, P]`` (zero outside the layer)."""
    out = V.new_zeros(V.shape[0], n_params)
    out[:, flat_positions(layer).to(V.device)] = V.reshape(V.shape[0], -1)
    return out


def forward_with_layers(fm: FlatModel, theta: torch.Tensor, x: torch.Tensor, layers: list[LinearLayer],
                        who: str = "kfac") -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Model output plus, per layer, its input ``a`` ([n, in]) and pre-activation output ``s``
    ([n, out]) from one forward pass (forward hooks; ``s`` stays in the autograd graph)."""
    seen: list[list] = [[] for _ in layers]
    handles = [l.module.register_forward_hook(lambda m, args, out, k=k: seen[k].append((args[0], out)))
               for k, l in enumerate(layers)]
    try:
        out = fm(theta, x)
    finally:
        for h in handles:
            h.remove()
    for l, s in zip(layers, seen):
        if len(s) != 1:
            raise EstimatorUnsupported(f"`{who}`: layer {l.name!r} ran {len(s)} times in one forward pass "
                                       f"(expected once). {_SUGGEST}")
    return out, [s[0][0].reshape(x.shape[0], -1) for s in seen], [s[0][1] for s in seen]


def output_loss_grad(loss: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[n, C]``: dL_i/d(output_i) of the per-sample loss (softmax cross-entropy or 0.5||out - y||^2)."""
    if loss == "cross_entropy":
        g = torch.softmax(out, dim=-1)
        g[torch.arange(out.shape[0], device=out.device), y] -= 1.0
        return g
    if loss == "mse":
        return out - y.reshape(out.shape)
    raise EstimatorUnsupported(f"unknown loss {loss!r}")


def output_hessian(loss: str, out: torch.Tensor) -> torch.Tensor:
    """``[n, C, C]``: the Hessian of the per-sample loss in the model output (label-free)."""
    n, C = out.shape
    if loss == "cross_entropy":
        p = torch.softmax(out, dim=-1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    if loss == "mse":
        return torch.eye(C, dtype=out.dtype, device=out.device).expand(n, C, C).clone()
    raise EstimatorUnsupported(f"unknown loss {loss!r}")


def output_hessian_factors(loss: str, out: torch.Tensor) -> torch.Tensor:
    """``[C, n, C]`` vectors ``u_c`` (one per output c) with ``sum_c u_ic u_ic^T`` = the output
    Hessian of sample i: cross-entropy ``sqrt(p_ic) (p_i - e_c)``, squared error ``e_c``."""
    n, C = out.shape
    eye = torch.eye(C, dtype=out.dtype, device=out.device)
    if loss == "cross_entropy":
        p = torch.softmax(out, dim=-1)
        return p.T.sqrt()[:, :, None] * (p[None, :, :] - eye[:, None, :])
    if loss == "mse":
        return eye[:, None, :].expand(C, n, C).clone()
    raise EstimatorUnsupported(f"unknown loss {loss!r}")
