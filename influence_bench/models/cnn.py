"""Convolutional models of the grid, all as plain ``nn.Module``s that ``FlatModel`` can call
functionally and ``vmap`` over samples (no batch-coupled state).

* ``AllConvCNN`` — the small all-convolutional network of Koh & Liang (2017), used by Basu et al.
  for MNIST: five 3x3 VALID tanh conv layers (strides 1, 2, 1, 2, 1; ``width`` channels, 8 in the
  paper), a 1x1 tanh conv to 10 maps, global average pooling, a linear softmax layer. For
  1x28x28 inputs and width 8: 2,616 parameters (80 + 4 x 584 + 90 + 110). Unlike the original, weight decay
  also applies to biases (our objective regularises all of theta).
* ``LeNet5`` — LeNet-5 with tanh and average pooling: conv5x5(6) - pool - conv5x5(16) - pool -
  fc120 - fc84 - fc; 28x28 inputs are zero-padded by 2 (the original 32x32 input).
  61,706 parameters on MNIST, 62,006 on CIFAR-10.
* ``resnet18`` / ``vgg13`` — torchvision's models adapted to 32x32 inputs (3x3 stride-1 stem and no
  max-pool for ResNet; global average pooling and one linear classifier for VGG-13-BN).
* ``resnet50`` — torchvision's ResNet-50 as is, for ImageNet-layout data.

BatchNorm treatment (ResNet, VGG): the models are kept in eval mode with their running statistics
frozen at initialisation (mean 0, variance 1), so each BatchNorm is a learnable per-channel affine
map. The loss then stays a sum of independent per-sample terms, which per-sample gradients,
leave-one-out weights and the vmapped retraining engine all require; batch statistics would couple
samples and make "remove point i" ill-defined for a full-batch objective.
"""

from __future__ import annotations

import torch
from torch import nn


class AllConvCNN(nn.Module):
    def __init__(self, in_channels: int, n_out: int, width: int = 8, last_units: int = 10):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, stride=1), nn.Tanh(),
            nn.Conv2d(w, w, 3, stride=2), nn.Tanh(),
            nn.Conv2d(w, w, 3, stride=1), nn.Tanh(),
            nn.Conv2d(w, w, 3, stride=2), nn.Tanh(),
            nn.Conv2d(w, w, 3, stride=1), nn.Tanh(),
            nn.Conv2d(w, last_units, 1, stride=1), nn.Tanh(),
        )
        self.classifier = nn.Linear(last_units, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(-2, -1)))


class LeNet5(nn.Module):
    def __init__(self, in_channels: int, side: int, n_out: int):
        super().__init__()
        pad = max(0, (32 - side) // 2)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
        )
        out_side = ((side + 2 * pad - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(start_dim=-3),
            nn.Linear(16 * out_side * out_side, 120), nn.Tanh(),
            nn.Linear(120, 84), nn.Tanh(),
            nn.Linear(84, n_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resnet18_32(in_channels: int, n_out: int) -> nn.Module:
    from torchvision.models import resnet18

    m = resnet18(weights=None, num_classes=n_out)
    m.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


def vgg13_32(in_channels: int, n_out: int) -> nn.Module:
    from torchvision.models import vgg13_bn

    m = vgg13_bn(weights=None, num_classes=n_out)
    if in_channels != 3:
        m.features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
    m.avgpool = nn.AdaptiveAvgPool2d(1)
    m.classifier = nn.Linear(512, n_out)
    return m


def resnet50(in_channels: int, n_out: int) -> nn.Module:
    """torchvision's ResNet-50 unchanged (ImageNet stem), ``n_out`` classes; frozen BatchNorm."""
    from torchvision.models import resnet50 as tv_resnet50

    m = tv_resnet50(weights=None, num_classes=n_out)
    if in_channels != 3:
        m.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return m


def build_cnn(family: str, in_shape: tuple[int, ...], n_out: int, width: int = 0) -> nn.Module:
    """The module of a convolutional ``family`` for inputs of shape ``in_shape`` = (C, H, W)."""
    if len(in_shape) != 3:
        raise ValueError(f"model family {family!r} needs image inputs [C, H, W]; got feature shape "
                         f"{tuple(in_shape)} (use a DataSpec with layout='image')")
    c, h, _ = in_shape
    if family == "cnn":
        return AllConvCNN(c, n_out, width or 8)
    if family == "lenet5":
        return LeNet5(c, h, n_out)
    if family == "resnet18":
        return resnet18_32(c, n_out)
    if family == "vgg13":
        return vgg13_32(c, n_out)
    if family == "resnet50":
        return resnet50(c, n_out)
    raise ValueError(f"unknown convolutional family {family!r}")


CNN_FAMILIES = ("cnn", "lenet5", "resnet18", "vgg13", "resnet50")
