"""``influence-bench bench ground-truth SETTING``: the batched retraining engine against a plain
sequential per-model loop with the identical recipe, in one process.

Both retrain the same leave-one-out models (plus the control) from theta*; the sequential loop is
``newton_cg_sequential`` (one model at a time, same Newton-CG steps, same preconditioner, same
tolerances), or for minibatch recipes ``minibatch.train_sequential`` (torch.optim, same batches)
against the vmapped ``minibatch.train_batched``. The command checks that both give the same test-loss changes, prints both wall times
and their ratio, and the batched engine's achieved GFLOP/s (matmul/conv FLOPs counted by
``torch.utils.flop_counter``) next to a large matmul's GFLOP/s measured in the same run, so the
ratio can be read against what the machine can do. Timings are noisy on shared machines: read the
ratio, never the absolute time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from influence_bench.groundtruth import engine
from influence_bench.training import minibatch


@dataclass
class GroundTruthBench:
    setting: str
    n_models: int
    batched_s: float
    sequential_s: float
    speedup: float
    max_abs_diff: float  # largest |delta_batched - delta_sequential| over models and test points
    max_abs_delta: float
    batched_gflop: float
    batched_gflops: float  # achieved by the batched engine
    matmul_gflops: float  # a large matmul in the setting's dtype on the same device, same run
    engine_choice: str = "vmap"  # what the engine runs by default for this setting here
    vmap_s: float | None = None  # minibatch recipes: vmap forced, where the engine prefers one at a time

    def to_json(self) -> dict:
        return asdict(self)


def matmul_gflops(device: torch.device, dtype=torch.float64, n: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of an ``n x n`` matmul (best of ``repeats``), CUDA-synchronised."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=dtype).to(device)
    b = torch.randn(n, n, generator=g, dtype=dtype).to(device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_ground_truth(ctx, removed: np.ndarray) -> GroundTruthBench:
    """Retrain ``removed`` (leave-one-out, with the control) batched and sequentially; compare."""
    removed = np.asarray(removed, dtype=np.int64)
    stochastic = engine.stochastic(ctx)
    choice = "one model at a time" if stochastic and minibatch.prefer_sequential(ctx.fm, ctx.device) else "vmap"
    if not stochastic:
        engine.preconditioner(ctx)  # shared set-up (the Hessian at theta*), outside both timings
    fast = "vmap" if stochastic else True  # the batched formulation itself, whatever the engine prefers
    for batched in (fast, False):  # warm-up: one-off lazy imports and kernel set-up (seconds) stay out
        engine.compute(ctx, removed[:1], batched=batched)
    batched, t_b = _timed(lambda: engine.compute(ctx, removed, batched=fast))
    sequential, t_s = _timed(lambda: engine.compute(ctx, removed, batched=False))
    with FlopCounterMode(display=False) as flops:  # a third, untimed run: counting slows dispatch down
        engine.compute(ctx, removed, batched=fast)
    gflop = flops.get_total_flops() / 1e9
    diff = float(np.abs(batched.delta - sequential.delta).max()) if len(removed) else 0.0
    return GroundTruthBench(
        setting=ctx.setting.id, n_models=len(removed) + 1, batched_s=t_b, sequential_s=t_s,
        speedup=t_s / t_b if t_b > 0 else float("inf"), max_abs_diff=diff,
        max_abs_delta=float(np.abs(batched.delta).max()) if len(removed) else 0.0,
        batched_gflop=gflop, batched_gflops=gflop / t_b if t_b > 0 else 0.0,
        matmul_gflops=matmul_gflops(ctx.device, ctx.dtype), engine_choice=choice,
        vmap_s=t_b if stochastic else None)


def format_bench(r: GroundTruthBench) -> str:
    return "\n".join([
        f"{r.setting}: {r.n_models} models (leave-one-out + control), same recipe",
        f"  batched engine     {r.batched_s:9.2f} s   {r.batched_gflops:8.2f} GFLOP/s ({r.batched_gflop:.1f} GFLOP counted)",
        f"  sequential loop    {r.sequential_s:9.2f} s",
        f"  speedup            {r.speedup:9.1f} x",
        f"  large matmul       {r.matmul_gflops:9.2f} GFLOP/s on this device (same run)",
        f"  agreement          max |diff| {r.max_abs_diff:.2e} (max |delta| {r.max_abs_delta:.2e})",
    ] + ([f"  engine default     {r.engine_choice} (minibatch.prefer_sequential)"] if r.vmap_s is not None else []))
