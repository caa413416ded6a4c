"""``groundtruth/throughput.py`` (the engine of ``scripts/gpu-tier``), on CPU with a small minibatch
setting: chunk doubling, the numbers it reports, where it stops, and the top-k projection."""

import pytest
import torch
from helpers import blobs, minibatch_setting

from influence_bench.groundtruth import throughput
from influence_bench.spec import catalog
from influence_bench.training import minibatch


def test_doubles_the_chunk_and_reports_rates_on_cpu():
    s = minibatch_setting(replicates=2)
    r = throughput.measure(s, "cpu", steps=2, max_chunk=4, topk=3, test_points=2, data=blobs(96, 24))
    assert [c.models for c in r.chunks] == [1, 2, 4] and r.largest_fit == 4
    assert r.stopped == "reached max_chunk = 4"
    assert r.step_gflop > 0 and r.matmul_gflops > 0 and r.bf16_gflops > 0 and r.recipe_steps == 60
    for c in r.chunks:
        assert c.step_s > 0 and c.gflops > 0
        assert abs(c.models_per_s - c.models / (c.step_s * 60)) <= 1e-9 * c.models_per_s
        assert abs(c.matmul_fraction - c.gflops / r.matmul_gflops) <= 1e-12
    best = max(c.models_per_s for c in r.chunks)
    assert r.topk_models == (3 * 2 + 1) * 2 and abs(r.topk_projected_s - r.topk_models / best) < 1e-9
    text = throughput.format_throughput(r)
    assert "largest chunk that ran: 4" in text and max(len(line) for line in text.splitlines()) <= 100


def test_a_chunk_that_does_not_fit_ends_the_doubling(monkeypatch):
    real = minibatch.train_batched

    def small_memory(fm, theta0, weights, *a, **kw):
        if weights.shape[0] >= 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(fm, theta0, weights, *a, **kw)

    monkeypatch.setattr(minibatch, "train_batched", small_memory)
    r = throughput.measure(minibatch_setting(), "cpu", steps=1, max_chunk=64, data=blobs(96, 24))
    assert r.largest_fit == 2 and [c.models for c in r.chunks] == [1, 2]
    assert r.stopped.startswith("4 models do not fit (CUDA out of memory")


def test_a_setting_without_minibatch_retraining_is_a_clear_error():
    with pytest.raises(ValueError, match="iris-mlp-d1-w16-wd1e-3.*newton-cg.*minibatch"):
        throughput.measure(catalog.get_setting("iris-mlp-d1-w16-wd1e-3"), "cpu")
