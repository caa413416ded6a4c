"""Convolutional models: documented parameter counts, seeded init, per-sample gradients by vmap
equal to a plain autograd loop, BatchNorm models independent of the batch (frozen statistics)."""

import pytest
import torch

from influence_bench.curvature import products as curvature
from influence_bench.models.flat import FlatModel, build_model
from influence_bench.spec.settings import ModelSpec


def _fm(family, shape, seed=0):
    return FlatModel(build_model(ModelSpec(family), 0, 10, seed, in_shape=shape))


@pytest.mark.parametrize("family,shape,n_params", [
    ("cnn", (1, 28, 28), 2616), ("cnn", (3, 32, 32), 2760),
    ("lenet5", (1, 28, 28), 61706), ("lenet5", (3, 32, 32), 62006),
])
def test_parameter_counts_and_seeded_init(family, shape, n_params):
    a, b, c = _fm(family, shape, 0), _fm(family, shape, 0), _fm(family, shape, 1)
    assert a.n_params == n_params
    assert torch.equal(a.flat(), b.flat()) and not torch.equal(a.flat(), c.flat())
    assert a.flat().dtype == torch.float64


@pytest.mark.parametrize("family,shape", [("cnn", (1, 28, 28)), ("lenet5", (3, 32, 32))])
def test_per_sample_grads_match_autograd_loop(family, shape):
    fm = _fm(family, shape)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, *shape, dtype=torch.float64, generator=gen)
    y = torch.tensor([0, 3, 7])
    theta = fm.flat()
    G = curvature.per_sample_grads(fm, theta, x, y)
    for i in range(3):
        t = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(curvature.per_sample_loss(fm, t, x[i:i + 1], y[i:i + 1])[0], t)
        torch.testing.assert_close(G[i], g, rtol=1e-10, atol=1e-12)


def test_image_model_rejects_flat_inputs():
    with pytest.raises(ValueError, match="layout='image'"):
        build_model(ModelSpec("cnn"), 784, 10, 0, in_shape=(784,))


@pytest.mark.parametrize("family", ["resnet18", "vgg13"])
def test_batchnorm_models_are_per_sample(family):
    fm = _fm(family, (3, 32, 32))
    assert not fm.module.training
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole, one = fm(fm.flat(), x), fm(fm.flat(), x[:1])
    torch.testing.assert_close(whole[:1], one)
