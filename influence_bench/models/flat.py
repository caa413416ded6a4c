"""Models as plain ``nn.Module``s plus a functional view over one flat parameter vector.

Everything downstream (training, curvature, retraining, estimators) works on a flat ``theta``
so that many models can be trained at once with ``torch.func.vmap``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from influence_bench.models.cnn import CNN_FAMILIES, build_cnn
from influence_bench.spec.settings import ModelSpec


class LogisticRegression(nn.Linear):
    """Multinomial logistic regression: a linear map to class logits (softmax in the loss)."""


def mlp(n_in: int, n_out: int, depth: int, width: int, activation: str = "tanh") -> nn.Sequential:
    act = {"tanh": nn.Tanh}[activation]
    layers: list[nn.Module] = []
    d = n_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, n_out))
    return nn.Sequential(*layers)


def build_model(spec: ModelSpec, n_in: int, n_out: int, seed: int, dtype=torch.float64,
                in_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Build the model with a seeded initialisation (PyTorch's default init distribution, own
    generator). Convolutional families need ``in_shape`` = (C, H, W) of one input."""
    if spec.family in CNN_FAMILIES:
        model: nn.Module = build_cnn(spec.family, tuple(in_shape or (n_in,)), n_out, spec.width)
    elif spec.family == "logreg":
        model: nn.Module = LogisticRegression(n_in, n_out)
    elif spec.family == "linear":
        model = nn.Linear(n_in, n_out)
    elif spec.family == "mlp":
        if spec.depth < 1 or spec.width < 1:
            raise ValueError(f"mlp needs depth >= 1 and width >= 1, got {spec}")
        model = mlp(n_in, n_out, spec.depth, spec.width, spec.activation)
    else:
        raise ValueError(f"unknown model family {spec.family!r}")
    model = model.to(dtype).eval()  # eval: BatchNorm uses (frozen) running statistics, see cnn.py
    model.loss_name = spec.loss  # read by FlatModel: which per-sample loss the model is trained on
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound, generator=gen)
                m.bias.uniform_(-bound, bound, generator=gen)
            elif isinstance(m, nn.Conv2d):  # PyTorch's default: U(+-1/sqrt(fan_in)) for both
                bound = 1.0 / math.sqrt(m.weight[0].numel())
                m.weight.uniform_(-bound, bound, generator=gen)
                if m.bias is not None:
                    m.bias.uniform_(-bound, bound, generator=gen)
    return model


class FlatModel:
    """A module seen as a function of one flat parameter vector ``theta``."""

    def __init__(self, module: nn.Module, loss: str | None = None):
        self.module = module
        self.loss = loss or getattr(module, "loss_name", "cross_entropy")
        if self.loss not in ("cross_entropy", "mse"):
            raise ValueError(f"unknown loss {self.loss!r}; known: cross_entropy, mse")
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [p.shape for _, p in module.named_parameters()]
        self.numels = [p.numel() for _, p in module.named_parameters()]
        self.n_params = sum(self.numels)

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(theta, self.numels)
        return {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes)}

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.unflatten(theta), (x,))

    def layer_slices(self) -> dict[str, slice]:
        """Parameter name -> its slice of ``theta`` (estimators restrict to layers with this)."""
        out, start = {}, 0
        for n, k in zip(self.names, self.numels):
            out[n] = slice(start, start + k)
            start += k
        return out
