"""Throughput of the batched minibatch retraining engine on one device (``scripts/gpu-tier``).

For a minibatch setting it times ``minibatch.train_batched`` (vmap over models) on chunks of
1, 2, 4, ... models, a few steps each, until a chunk does not fit in memory (or ``max_chunk``):
per chunk, models per second for the setting's whole recipe (``steps`` optimiser steps),
achieved GFLOP/s (matmul/conv FLOPs of one step, ``torch.utils.flop_counter``) and that as a
fraction of a large matmul in the setting's dtype and in bf16, measured in the same run, and the
peak memory. From the best chunk it projects the wall time of top-k leave-one-out ground truth:
``(k x test points + 1) x replicates`` models (an upper bound: test points share removals).

No theta* is needed (throughput does not depend on where the models start): the models start
from the setting's seeded initialisation. CUDA-synchronised on CUDA; runs on CPU too (the test).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from influence_bench.data.datasets import Dataset, load
from influence_bench.groundtruth.bench import matmul_gflops
from influence_bench.groundtruth.recipes import minibatch_spec
from influence_bench.models.flat import FlatModel
from influence_bench.spec.settings import Setting
from influence_bench.training import fit as training
from influence_bench.training import minibatch


@dataclass
class Chunk:
    models: int
    step_s: float  # one optimiser step of all ``models``
    models_per_s: float  # whole-recipe retrainings per second
    gflops: float
    matmul_fraction: float  # of the large matmul in the setting's dtype
    bf16_fraction: float
    peak_gib: float


@dataclass
class Throughput:
    setting: str
    device: str
    dtype: str
    n_params: int
    recipe_steps: int
    step_gflop: float  # per model and step
    matmul_gflops: float  # setting's dtype
    bf16_gflops: float
    chunks: list = field(default_factory=list)
    largest_fit: int = 0  # largest chunk that ran
    stopped: str = ""  # why the doubling stopped
    topk_models: int = 0
    topk_projected_s: float = float("nan")

    def to_json(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _recipe(setting: Setting, n_train: int) -> minibatch.Recipe:
    gt = setting.ground_truth
    if gt.mode != "scratch" and not gt.minibatch:
        raise ValueError(f"setting {setting.id!r}: its ground truth is retrained by {gt.retrain!r}, not by the "
                         "minibatch engine; throughput measures minibatch settings (e.g. mnist5k-cnn-wd1e-3)")
    return minibatch_spec(setting, n_train)


def measure(setting: Setting, device: str = "cuda", steps: int = 3, max_chunk: int = 1024, topk: int = 40,
            test_points: int = 10, data: Dataset | None = None) -> Throughput:
    """Time ``steps`` steps of the batched engine per chunk size (module docstring)."""
    dev = torch.device(device)
    dtype = training.DTYPES[setting.train.dtype]
    ds = (data if data is not None else load(setting.data)).to(dev, dtype)
    x, y = ds.x_train, ds.y_train
    recipe, replicates = _recipe(setting, x.shape[0]), setting.ground_truth.replicates
    fm = FlatModel(training.initial_module(setting, ds, dtype, dev))
    theta0 = fm.flat()
    short = replace(recipe, steps=steps)
    wd = setting.train.weight_decay

    def run(B: int) -> None:
        w = torch.ones(B, x.shape[0], dtype=dtype, device=dev)
        w[torch.arange(B, device=dev), torch.arange(B, device=dev) % x.shape[0]] = 0.0
        minibatch.train_batched(fm, theta0, w, x, y, wd, short, setting.ground_truth.seed)

    with FlopCounterMode(display=False) as fc:
        minibatch.train_batched(fm, theta0, torch.ones(1, x.shape[0], dtype=dtype, device=dev), x, y, wd,
                                replace(recipe, steps=1), 0)
    step_gflop = fc.get_total_flops() / 1e9
    mm, bf = matmul_gflops(dev, dtype), matmul_gflops(dev, torch.bfloat16)
    out = Throughput(setting.id, str(dev), setting.train.dtype, fm.n_params, recipe.steps, step_gflop, mm, bf)
    B = 1
    while True:
        if B > max_chunk:
            out.stopped = f"reached max_chunk = {max_chunk}"
            break
        try:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            run(B)  # warm-up (kernel selection, allocator)
            _sync(dev)
            t0 = time.perf_counter()
            run(B)
            _sync(dev)
            t = (time.perf_counter() - t0) / steps
        except torch.cuda.OutOfMemoryError as exc:
            out.stopped = f"{B} models do not fit ({str(exc).splitlines()[0][:80]})"
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            break
        rate = B * step_gflop / t
        peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else float("nan")
        out.chunks.append(Chunk(B, t, B / (t * recipe.steps), rate, rate / mm, rate / bf, peak))
        out.largest_fit = B
        B *= 2
    if out.chunks:
        best = max(out.chunks, key=lambda c: c.models_per_s)
        out.topk_models = (topk * test_points + 1) * replicates
        out.topk_projected_s = out.topk_models / best.models_per_s
    return out


def format_throughput(r: Throughput) -> str:
    """At most 100 columns."""
    rows = [f"{r.setting} on {r.device} ({r.dtype}), P = {r.n_params}, recipe {r.recipe_steps} steps, "
            f"{r.step_gflop:.3f} GFLOP per model-step",
            f"  {'models':>7}{'step s':>10}{'models/s':>10}{'GFLOP/s':>10}{'of matmul':>11}{'of bf16':>10}"
            f"{'peak GiB':>10}"]
    for c in r.chunks:
        c = c if isinstance(c, Chunk) else Chunk(**c)
        rows.append(f"  {c.models:7d}{c.step_s:10.4f}{c.models_per_s:10.3f}{c.gflops:10.1f}"
                    f"{100 * c.matmul_fraction:9.1f} %{100 * c.bf16_fraction:8.1f} %{c.peak_gib:10.2f}")
    rows += [f"  large matmul {r.matmul_gflops:.1f} GFLOP/s ({r.dtype}), {r.bf16_gflops:.1f} GFLOP/s (bf16), same run",
             f"  largest chunk that ran: {r.largest_fit} models; stopped: {r.stopped}",
             f"  top-k ground truth: {r.topk_models} models -> {r.topk_projected_s / 60:.1f} min projected "
             "at the best chunk's rate"]
    return "\n".join(rows)
