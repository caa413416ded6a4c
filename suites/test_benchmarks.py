"""Estimator cost: each selected estimator timed on a small setting of each family (pytest-benchmark).

``pytest suites/ --benchmark-only`` runs just these, ``--benchmark-skip`` everything else,
``--benchmark-json FILE`` keeps the timings with peak memory and machine info. Ids read
``bench-<estimator>-<setting>``.
"""

import pytest

from influence_bench.api.arguments import expand_specs
from influence_bench.api.estimator import EstimatorUnsupported
from influence_bench.api.registry import REGISTRY
from influence_bench.data.datasets import DataUnavailable
from influence_bench.scoring.benchmarking import benchmark_estimator
from influence_bench.spec import catalog

BENCH_SETTINGS = ("iris-logreg-wd1e-3", "iris-mlp-d3-w16-wd1e-3", "mnist5k-logreg-wd1e-3")


def pytest_generate_tests(metafunc):
    if "bench_estimator" in metafunc.fixturenames:
        names = expand_specs(metafunc.config.getoption("--estimator")) or REGISTRY.default_names()
        params = [pytest.param((n, s), id=f"bench-{n}-{s}") for n in names for s in BENCH_SETTINGS]
        metafunc.parametrize("bench_estimator", params)


def test_estimator_cost(benchmark, bench_estimator, influence_bench):
    name, setting = bench_estimator
    benchmark.group = setting
    try:
        influence = benchmark_estimator(benchmark, name, catalog.get_setting(setting), device=influence_bench.device,
                                        rounds=influence_bench.config.getoption("--bench-rounds"))
    except EstimatorUnsupported as exc:
        pytest.skip(f"{name} on {setting}: {exc}")
    except DataUnavailable as exc:
        if influence_bench.config.getoption("--require-data"):
            pytest.fail(f"{setting}: {exc}", pytrace=False)
        pytest.skip(f"{setting}: {exc}")
    info = benchmark.extra_info  # what a cost comparison reads beside the timings
    assert info["setting"] == setting and info["estimator"] == name and info["peak_memory_mb"] is not None
    assert influence.shape[1] == catalog.get_setting(setting).data.n_train
