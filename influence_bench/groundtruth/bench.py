"""``influence-bench bench ground-truth SETTING``: every batched retraining path against a plain
sequential per-model loop with the identical recipe, in one process.

All retrain the same leave-one-out models (plus the control) from theta*. For warm Newton the
paths are the explicit batched Hessians (``newton_explicit``, where the model is small enough),
vmapped Newton-CG (``newton_cg_batched``) and the sequential loop ``newton_cg_sequential`` (one
model at a time, same stopping rule, damping and preconditioner); for minibatch recipes the
batched ``minibatch.train_batched`` (and, for convolutions on CPU, the engine's default: one model
per core, ``minibatch.model_workers``) against ``minibatch.train_sequential`` (torch.optim, same
batches, one model at a time). For each path the command prints its wall time, its ratio against
the sequential loop, its achieved GFLOP/s (``_count_gflop``) and that as a fraction of a large matmul's GFLOP/s measured
in the same run, and its largest disagreement with the sequential loop over the models that reached
the stopping rule on both (a model that ran out of steps stops wherever its last step left it, so
two paths legitimately differ there: they are counted, per path, instead). Timings are noisy on
shared machines: read the ratios, never the absolute times.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from influence_bench.groundtruth import engine
from influence_bench.training import minibatch, newton_explicit


@dataclass
class PathTiming:
    """One retraining path: wall time, its ratio against the sequential loop, FLOPs and agreement."""

    name: str
    seconds: float
    speedup: float  # sequential seconds / these seconds
    gflop: float
    gflops: float
    matmul_fraction: float  # gflops / the large matmul's
    max_abs_diff: float  # largest |delta - delta_sequential| over models converged on both paths
    default: bool  # the engine's choice for this setting here
    not_converged: int = 0  # models (removals) that ran out of steps on this path: left out of max_abs_diff
    lost: int = 0  # of those, models that converged in the sequential loop


@dataclass
class GroundTruthBench:
    setting: str
    n_models: int
    batched_s: float  # the engine's default batched path
    sequential_s: float
    speedup: float
    max_abs_diff: float  # largest |delta_batched - delta_sequential| over converged models, test points, paths
    max_abs_delta: float
    batched_gflop: float
    batched_gflops: float  # achieved by the batched engine
    matmul_gflops: float  # a large matmul in the setting's dtype on the same device, same run
    engine_choice: str = "vmap"  # what the engine runs by default for this setting here (a path's name)
    vmap_s: float | None = None  # minibatch recipes: the batched path (train_batched), whatever the default
    n_params: int = 0
    paths: list = field(default_factory=list)  # PathTiming per timed path, the sequential loop last

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


def _best(fn, repeats: int = 3, budget_s: float = 2.0):
    """(result, best wall time) of up to ``repeats`` runs, stopping once ``budget_s`` is spent: fast
    paths are timed several times (a shared machine's hiccups are seconds), slow ones once."""
    out, best, spent = None, float("inf"), 0.0
    for _ in range(repeats):
        out, t = _timed(fn)
        best, spent = min(best, t), spent + t
        if spent >= budget_s:
            break
    return out, best


# minibatch.train_batched: all models in one step (closed-form gradients where curvature.linear /
# curvature.mlp apply, vmap otherwise)
BATCHED = "batched (vmap)"


def _paths(ctx) -> tuple[list[tuple[str, object]], str]:
    """(label, ``batched`` argument) of every path to time, the sequential loop last; and the label
    of the engine's default."""
    seq = ("sequential loop", False)
    if engine.stochastic(ctx):
        if minibatch.prefer_sequential(ctx.fm, ctx.device):  # convolutions on CPU: one model per core
            threads = (f"{minibatch.model_workers(ctx.device)} models at once", True)
            return [threads, (BATCHED, "vmap"), seq], threads[0]
        return [(BATCHED, "vmap"), seq], BATCHED
    if engine.recipe_for(ctx).name != "warm-newton":
        return [("batched engine", True), seq], "batched engine"
    cg = ("Newton-CG batched", "cg")
    if not newton_explicit.can_form(ctx.n_params):
        return [cg, seq], cg[0]
    explicit = ("explicit Hessian", "explicit")
    return [explicit, cg, seq], explicit[0] if newton_explicit.applies(ctx.fm, ctx.n_params) else cg[0]


def _count_gflop(ctx, removed: np.ndarray, batched) -> float:
    """Matmul/conv FLOPs of one untimed run (``torch.utils.flop_counter``: the Hessian formation,
    HVPs, gradients, objective evaluations), plus for the explicit path ``P^3/3 + 2 P^2`` per model
    and step (Cholesky and its solves, which the counter does not see). Counting slows dispatch
    down, hence a separate run."""
    if batched is True and engine.stochastic(ctx) and minibatch.prefer_sequential(ctx.fm, ctx.device):
        batched = False  # the same models' FLOPs; the counter does not see the worker threads' kernels
    with FlopCounterMode(display=False) as flops:
        if engine.recipe_for(ctx).compute is not None:
            engine.compute(ctx, removed, batched=batched)
            extra = 0.0
        else:
            res = engine.retrain(ctx, np.concatenate([[-1], removed]), batched=batched)
            extra = newton_explicit.step_flops(ctx.n_params) * float(res.steps.sum()) if batched == "explicit" else 0.0
    return (flops.get_total_flops() + extra) / 1e9


def bench_ground_truth(ctx, removed: np.ndarray) -> GroundTruthBench:
    """Retrain ``removed`` (leave-one-out, with the control) on every path; compare with the
    sequential loop."""
    removed = np.asarray(removed, dtype=np.int64)
    stochastic = engine.stochastic(ctx)
    paths, default = _paths(ctx)
    if not stochastic:
        engine.preconditioner(ctx)  # shared set-up (the Hessian at theta*), outside every timing
    for _, batched in paths:  # warm-up: one-off lazy imports and kernel set-up (seconds) stay out
        engine.compute(ctx, removed[:1], batched=batched)
    runs = [_best(lambda b=batched: engine.compute(ctx, removed, batched=b)) for _, batched in paths]
    gflop = [_count_gflop(ctx, removed, batched) for _, batched in paths]
    mm = matmul_gflops(ctx.device, ctx.dtype)
    ref, t_s = runs[-1]
    timings = []
    for (name, _), (res, t), g in zip(paths, runs, gflop):
        rate = g / t if t > 0 else 0.0
        both = ~(res.unconverged | ref.unconverged)  # a model that ran out of steps is no agreement test
        diff = float(np.abs(res.delta[both] - ref.delta[both]).max()) if both.any() else 0.0
        timings.append(PathTiming(name, t, t_s / t if t > 0 else float("inf"), g, rate, rate / mm, diff,
                                  name == default, int(res.unconverged.sum()),
                                  int((res.unconverged & ~ref.unconverged).sum())))
    main = next(p for p in timings if p.default)
    return GroundTruthBench(
        setting=ctx.setting.id, n_models=len(removed) + 1, batched_s=main.seconds, sequential_s=t_s,
        speedup=main.speedup, max_abs_diff=max(p.max_abs_diff for p in timings),
        max_abs_delta=float(np.abs(ref.delta).max()) if len(removed) else 0.0,
        batched_gflop=main.gflop, batched_gflops=main.gflops, matmul_gflops=mm, engine_choice=default,
        vmap_s=next(p.seconds for p in timings if p.name == BATCHED) if stochastic else None, n_params=ctx.n_params,
        paths=timings)


# a batched path may run out of steps on a model the sequential loop brought to its stopping rule (the
# same iteration, rounded differently, can cross the step budget either side); beyond this share of the
# models it has lost convergence, and the bench fails (``problems``)
LOST_SHARE = 0.05


def problems(r: GroundTruthBench, rtol: float) -> list[str]:
    """Why the paths do not agree (empty: they do): a disagreement above ``rtol`` of the largest
    |delta| over the models converged on both, a path that lost convergence on more than
    ``LOST_SHARE`` of the models, or no model converged anywhere (nothing was compared)."""
    out = []
    tol = rtol * max(r.max_abs_delta, 1e-300)
    if r.max_abs_diff > tol:
        out.append(f"batched and sequential retraining disagree by {r.max_abs_diff:.3g} > {tol:.3g}")
    n = r.n_models - 1
    for p in r.paths:
        p = p if isinstance(p, PathTiming) else PathTiming(**p)
        if p.lost > LOST_SHARE * n:
            out.append(f"{p.name}: {p.lost} of {n} models ran out of steps that converged in the sequential loop "
                       f"(more than {LOST_SHARE:.0%})")
        if n and p.not_converged == n:
            out.append(f"{p.name}: no model converged, nothing to compare")
    return out


def format_bench(r: GroundTruthBench) -> str:
    """At most 100 columns."""
    rows = [f"{r.setting}: {r.n_models} models (leave-one-out + control), same recipe, P = {r.n_params}",
            f"  {'path':<21}{'time s':>9}{'speedup':>10}{'GFLOP':>9}{'GFLOP/s':>9}{'of matmul':>11}"
            f"{'max |diff|':>12}{'unconv':>8}"]
    for p in r.paths:
        p = p if isinstance(p, PathTiming) else PathTiming(**p)
        rows.append(f"  {p.name + (' *' if p.default else ''):<21}{p.seconds:9.2f}{p.speedup:8.1f} x"
                    f"{p.gflop:9.2f}{p.gflops:9.2f}{100 * p.matmul_fraction:9.2f} %{p.max_abs_diff:12.2e}"
                    f"{p.not_converged:8d}")
    return "\n".join(rows + [
        f"  large matmul         {r.matmul_gflops:9.2f} GFLOP/s on this device (same run); * engine default",
        f"  agreement            max |diff| {r.max_abs_diff:.2e} against the sequential loop"
        f" (max |delta| {r.max_abs_delta:.2e})",
        "  unconv               models that ran out of steps (left out of max |diff|: they stop anywhere)",
    ] + ([f"  engine default       {r.engine_choice} (minibatch.prefer_sequential, model_workers)"]
          if r.vmap_s is not None else []))
