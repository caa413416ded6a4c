"""Estimator cost (time and peak memory), one benchmark per (estimator, setting).

    pytest suites/test_benchmarks.py --benchmark-only          # run them
    pytest suites --benchmark-skip                             # everything else (the README's test run)

Only the estimator's own work is timed: the context (trained model, per-sample gradients of the
training and test sets, which every estimator shares) is built before the clock starts. On CUDA
the block is synchronised at both ends. Peak memory is the block's own (RSS high-water mark on
Linux CPUs, ``max_memory_allocated`` on CUDA); it goes to the benchmark JSON's ``extra_info``.
"""

import pytest
import torch

from influence_bench.catalog import get_setting
from influence_bench.context import get_context
from influence_bench.data import DataUnavailable
from influence_bench.estimator import EstimatorUnsupported
from influence_bench.measure import measure
from influence_bench.registry import REGISTRY

BENCH_SETTINGS = ("iris-mlp-d2-w16-wd1e-3", "iris-mlp-d8-w16-wd1e-3", "mnist5k-logreg-wd1e-3")


@pytest.mark.parametrize("setting_id", BENCH_SETTINGS)
def test_estimator_cost(benchmark, estimator_name, setting_id, request):
    device = request.config.getoption("--device")
    try:
        ctx = get_context(get_setting(setting_id), device)
    except DataUnavailable as exc:
        if request.config.getoption("--require-data"):
            pytest.fail(f"{setting_id}: {exc}", pytrace=False)
        pytest.skip(f"{setting_id}: {exc}")
    ctx.train_grads(), ctx.test_grads()  # shared by all estimators: not part of any one's cost
    seen = {}

    def run():
        est = REGISTRY.create(estimator_name)
        with measure(ctx.device) as m:
            try:
                out = est.influence(ctx)
            except EstimatorUnsupported as exc:
                seen["unsupported"] = str(exc)
                return None
        seen["m"] = m
        return out

    out = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    if "unsupported" in seen:
        pytest.skip(f"{estimator_name} on {setting_id}: {seen['unsupported']}")
    assert out.shape == (ctx.n_test, ctx.n_train) and torch.isfinite(out).all()
    m = seen["m"]
    benchmark.extra_info.update(
        estimator=estimator_name, setting=setting_id, n_params=ctx.n_params, device=str(ctx.device),
        peak_memory_mb=m.peak_memory_mb, extra_memory_mb=m.extra_memory_mb, memory_scope=m.memory_scope,
        torch=torch.__version__, cuda=torch.version.cuda,
        device_name=torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu")
