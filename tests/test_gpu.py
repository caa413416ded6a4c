"""The CUDA paths against the CPU ones (skipped without a GPU; run them with `pytest -m gpu`)."""

import numpy as np
import pytest
import torch

from influence_bench.api.loading import build_context
from influence_bench.api.registry import REGISTRY
from influence_bench.data.datasets import load
from influence_bench.groundtruth import engine
from influence_bench.spec import catalog

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def contexts():
    s = catalog.get_setting("iris-mlp-d1-w16-wd1e-3")
    data = load(s.data)
    return build_context(s, data, "cpu", use_cache=False), build_context(s, data, "cuda", use_cache=False)


@pytest.mark.parametrize("name", ["exact", "cg", "gradient-dot", "kfac"])
def test_estimators_agree_on_cuda_and_cpu(contexts, name):
    cpu, cuda = contexts
    cuda = type(cuda)(**{**cuda.__dict__, "theta": cpu.theta.to("cuda"), "test_idx": cpu.test_idx, "_cache": {}})
    a = REGISTRY.create(name).influence(cpu.fresh())
    b = REGISTRY.create(name).influence(cuda).cpu()
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-9 * float(a.abs().max()))


def test_warm_newton_ground_truth_agrees_on_cuda_and_cpu(contexts):
    cpu, cuda = contexts
    cuda = type(cuda)(**{**cuda.__dict__, "theta": cpu.theta.to("cuda"), "test_idx": cpu.test_idx, "_cache": {}})
    removed = np.arange(8)
    a = engine.compute(cpu, removed).delta
    b = engine.compute(cuda, removed).delta
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9 * np.abs(a).max())
    assert torch.cuda.max_memory_allocated() > 0
