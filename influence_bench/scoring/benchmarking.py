"""Estimator cost benchmarks through pytest-benchmark.

``benchmark_estimator(benchmark, "exact", setting)`` times one estimator's ``influence(ctx)`` on a
trained setting (training and ground truth are outside the timing):

* one untimed warm-up round absorbs one-off process costs (lazy imports, kernel set-up);
* every round gets a fresh copy of the context's cache, so shared quantities (per-sample gradients,
  the Hessian) are paid for by the estimator being timed, not by whoever ran before;
* on CUDA, each round ends with ``torch.cuda.synchronize`` (so the pytest-benchmark timer sees the
  GPU work) and the time between two CUDA events is kept in ``extra_info["cuda_event_ms"]``;
* ``extra_info`` records estimator, hyperparameters, setting id/version/hash, device, and the last
  round's peak memory (``measure.py``): ``torch.cuda.max_memory_allocated`` on GPU, the RSS
  high-water mark of the round on Linux CPUs, and ``extra_memory_mb`` = peak minus the start.

pytest-benchmark itself provides ``--benchmark-only`` / ``--benchmark-skip`` / ``--benchmark-json``
and disables benchmarks under pytest-xdist (the timed function then runs once, unchecked timing).
The plugin adds torch/CUDA versions and device names to the benchmark JSON's ``machine_info``.
"""

from __future__ import annotations

import torch

from influence_bench.api.estimator import check_output
from influence_bench.api.registry import REGISTRY
from influence_bench.reporting.runfiles import machine_info
from influence_bench.scoring.measure import measure
from influence_bench.scoring.runner import _jsonable
from influence_bench.spec.settings import Setting


def update_machine_info(machine_info_dict: dict) -> None:
    """pytest-benchmark hook body: torch, CUDA and device facts next to its own CPU info."""
    machine_info_dict["influence_bench"] = machine_info()


def benchmark_estimator(benchmark, estimator: str, setting: Setting, device: str = "cpu", rounds: int = 3):
    """Benchmark ``estimator`` on ``setting``; returns the validated influence matrix of the last round."""
    from influence_bench.api.loading import get_context

    ctx = get_context(setting, device)
    est = REGISTRY.create(estimator)
    cuda = ctx.device.type == "cuda"
    state: dict = {"event_ms": []}

    def setup():
        state["ctx"] = ctx.fresh()  # each round pays for the gradients and curvature it uses
        if cuda:
            torch.cuda.synchronize(ctx.device)
            torch.cuda.reset_peak_memory_stats(ctx.device)
        return (), {}

    def target():
        with measure(ctx.device) as m:  # synchronises CUDA at both ends; block-scoped peak memory
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            out = est.influence(state["ctx"])
            if cuda:
                end.record()
        if cuda:
            state["event_ms"].append(start.elapsed_time(end))
        state["memory"] = m
        return out

    out = benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    influence = check_output(out, est.name, setting.id, (ctx.n_test, ctx.n_train))
    benchmark.extra_info.update(
        estimator=est.name, hyperparameters=_jsonable(est.hyperparameters()), setting=setting.id,
        setting_version=setting.version, spec_hash=setting.spec_hash, device=str(ctx.device),
        peak_memory_mb=state["memory"].peak_memory_mb, extra_memory_mb=state["memory"].extra_memory_mb,
        memory_kind="cuda_max_allocated" if cuda else f"rss ({state['memory'].memory_scope})")
    if cuda:
        benchmark.extra_info["cuda_event_ms"] = state["event_ms"][-rounds:]  # without the warm-up
    return influence
