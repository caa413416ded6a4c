"""Minibatch training (SGD, SGD with momentum, Adam) of many models at once.

Every model ``b`` minimises the same weighted objective as the full-batch engine, on minibatches:
at step ``t`` it takes one optimiser step on

    J_t(theta; w_b) = (1 / batch_size) sum_{k in batch_t} w_b[k] loss_k(theta) + weight_decay/2 ||theta||^2

so a removed point (weight 0) simply contributes nothing to the batches it falls in; the
normalisation stays ``1/batch_size``, as the full-batch objective keeps ``1/n``. The batches come
from a seeded **data order**: one permutation of the training set per epoch, cut into
``n // batch_size`` batches (the remainder of an epoch is left out), derived from the seed alone,
so a model's trajectory does not depend on which other models share its chunk. Models that share
a seed see the same batches (the paired design of leave-one-out ground truth: a removed model and
its control differ only where the removed point was drawn).

``train_batched`` steps all models together with ``torch.func.vmap``; ``train_sequential`` is the
same recipe one model at a time through ``torch.optim`` (the reference the batched engine is tested
against, and the fallback for models that cannot be vmapped, e.g. BatchNorm in training mode).
Optimiser semantics are PyTorch's (``torch.optim.SGD`` with ``dampening=0``, ``torch.optim.Adam``),
with the weight decay in the objective (L2), not in the optimiser.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import grad, vmap

from influence_bench import progress
from influence_bench.curvature import products as curvature
from influence_bench.curvature.closed_form import closed_form
from influence_bench.models.flat import FlatModel

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Recipe:
    """``steps`` optimiser steps of ``optimizer`` (``sgd``: with ``momentum``; ``adam``: betas 0.9,
    0.999, eps 1e-8) at learning rate ``lr`` on batches of ``batch_size``."""

    optimizer: str
    lr: float
    batch_size: int
    steps: int
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown minibatch optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if self.lr <= 0 or self.batch_size < 1 or self.steps < 0:
            raise ValueError(f"a minibatch recipe needs lr > 0, batch_size >= 1 and steps >= 0; got {self}")


def data_order(n: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """``[steps, batch_size]`` training indices: per epoch a seeded permutation, cut into batches."""
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} training points")
    per_epoch = n // batch_size
    rng = np.random.default_rng(seed)
    epochs = -(-steps // per_epoch) if steps else 0
    order = [rng.permutation(n)[:per_epoch * batch_size].reshape(per_epoch, batch_size) for _ in range(epochs)]
    out = np.concatenate(order)[:steps] if order else np.zeros((0, batch_size), dtype=np.int64)
    return torch.as_tensor(out, dtype=torch.long)


class _State:
    """Optimiser state of ``B`` models as ``[B, P]`` tensors (PyTorch's update rules)."""

    def __init__(self, recipe: Recipe, theta: torch.Tensor):
        self.r = recipe
        self.t = 0
        self.buf = torch.zeros_like(theta) if recipe.optimizer == "sgd" and recipe.momentum else None
        self.m = torch.zeros_like(theta) if recipe.optimizer == "adam" else None
        self.v = torch.zeros_like(theta) if recipe.optimizer == "adam" else None

    def step(self, theta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        r = self.r
        self.t += 1
        if r.optimizer == "sgd":
            if self.buf is not None:
                self.buf = g.clone() if self.t == 1 else self.buf * r.momentum + g
                g = self.buf
            return theta - r.lr * g
        b1, b2 = r.betas
        self.m = self.m * b1 + (1 - b1) * g
        self.v = self.v * b2 + (1 - b2) * g * g
        denom = (self.v / (1 - b2 ** self.t)).sqrt() + r.eps
        return theta - (r.lr / (1 - b1 ** self.t)) * self.m / denom


def _batch_objective(fm: FlatModel, theta, xb, yb, wb, weight_decay: float, batch_size: int) -> torch.Tensor:
    losses = curvature.per_sample_loss(fm, theta, xb, yb)
    return (wb * losses).sum() / batch_size + 0.5 * weight_decay * (theta * theta).sum()


def train_batched(fm: FlatModel, theta0: torch.Tensor, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  weight_decay: float, recipe: Recipe, seed: int, on_step=None) -> torch.Tensor:
    """``[B, P]`` parameters after ``recipe.steps`` steps from ``theta0`` (``[P]`` or ``[B, P]``), every
    model on the batches of ``seed`` with its own per-point ``weights`` (``[B, n]``).

    ``on_step(t, thetas)`` (optional) is called after every step ``t`` = 1..steps. Raises
    ``NotBatchable`` when the model cannot be vmapped (see ``train``)."""
    B = weights.shape[0]
    theta = (theta0.expand(B, -1) if theta0.dim() == 1 else theta0).clone()
    order = data_order(x.shape[0], recipe.batch_size, recipe.steps, seed).to(x.device)
    state = _State(recipe, theta)
    fast = closed_form(fm)  # one chain of matmuls for all models (~10x fewer launches than vmap's graphs)
    if fast is None:
        g = vmap(grad(_batch_objective, argnums=1), in_dims=(None, 0, None, None, 0, None, None))
    else:  # the batch's mean over batch_size rows is the closed form's mean over its n rows
        def g(fm, theta, xb, yb, wb, weight_decay, batch_size):
            return fast.grads(fm, theta, wb, xb, yb, weight_decay)
    for t, idx in enumerate(order, start=1):
        try:
            grads = g(fm, theta, x[idx], y[idx], weights[:, idx], weight_decay, recipe.batch_size)
        except RuntimeError as exc:
            msg = str(exc).lower()
            if t == 1 and ("vmap" in msg or "batched" in msg):
                raise NotBatchable(str(exc).strip().splitlines()[0]) from exc
            raise
        theta = state.step(theta, grads)
        if on_step is not None:
            on_step(t, theta)
    return theta


def train_sequential(fm: FlatModel, theta0: torch.Tensor, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     weight_decay: float, recipe: Recipe, seed: int, on_step=None, workers: int = 1) -> torch.Tensor:
    """The same recipe one model at a time with ``torch.optim`` and plain autograd (``on_step(t,
    theta[None])`` as in ``train_batched``, for a single model). ``workers`` > 1 trains that many
    models at once, one per thread (``_in_threads``): each model's own computation is unchanged, so
    the result is bitwise the same as with one worker."""
    if on_step is not None and weights.shape[0] != 1:
        raise ValueError("train_sequential reports steps for a single model only")
    order = data_order(x.shape[0], recipe.batch_size, recipe.steps, seed).to(x.device)

    def one(model: FlatModel, b: int, stop: threading.Event | None = None) -> torch.Tensor:
        start = theta0 if theta0.dim() == 1 else theta0[b]
        w = weights[b]
        p = start.detach().clone().requires_grad_(True)
        if recipe.optimizer == "sgd":
            opt = torch.optim.SGD([p], lr=recipe.lr, momentum=recipe.momentum)
        else:
            opt = torch.optim.Adam([p], lr=recipe.lr, betas=recipe.betas, eps=recipe.eps)
        for t, idx in enumerate(order, start=1):
            if stop is not None and stop.is_set():
                raise _Stopped
            opt.zero_grad()
            _batch_objective(model, p, x[idx], y[idx], w[idx], weight_decay, recipe.batch_size).backward()
            opt.step()
            if on_step is not None:
                on_step(t, p.detach()[None])
        return p.detach()

    B = weights.shape[0]
    if workers > 1 and B > 1:
        out = _in_threads(fm, one, B, workers)
    else:
        out = [one(fm, b) for b in range(B)]
    return torch.stack(out) if out else theta0.new_zeros(0, fm.n_params)


def _in_threads(fm: FlatModel, one, B: int, workers: int) -> list[torch.Tensor]:
    """``[one(model, b) for b in range(B)]`` on ``workers`` threads. torch kernels release the GIL, so
    on a CPU with one intra-op thread each (``fit.reproducible_threads``, as ground truth runs) the
    models train side by side on separate cores. ``functional_call`` swaps a module's parameters
    while it runs, so every thread works on its own copy of the module."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    local, stop = threading.local(), threading.Event()

    def run(b: int) -> torch.Tensor:
        if not hasattr(local, "fm"):
            local.fm = FlatModel(copy.deepcopy(fm.module), fm.loss)
        return one(local.fm, b, stop)

    pool = ThreadPoolExecutor(min(workers, B))
    futures = [pool.submit(run, b) for b in range(B)]
    try:
        for f in as_completed(futures):
            if f.exception() is not None:  # the first model that failed: its error is the caller's
                raise f.exception()
        return [f.result() for f in futures]
    except BaseException:  # that error, Ctrl-C, SIGTERM: the other threads stop at their next step
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Stopped(Exception):
    """A worker thread stopped because another thread, or the caller, failed (never escapes)."""


def model_workers(device: torch.device) -> int:
    """Models trained at once by ``train`` where it trains one model at a time: one per usable CPU
    core on CPU (each on one intra-op thread); on CUDA one (kernels already fill the device)."""
    if device.type != "cpu":
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class NotBatchable(RuntimeError):
    """The model cannot be trained under ``vmap`` (e.g. BatchNorm updating running statistics)."""


def train(fm: FlatModel, theta0: torch.Tensor, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
          weight_decay: float, recipe: Recipe, seed: int, what: str = "model") -> torch.Tensor:
    """``train_batched``; ``train_sequential`` where one model at a time is faster (``prefer_sequential``:
    convolutions on CPU; one model per core, ``model_workers``), or, with a warning saying why, where
    the model cannot be vmapped (BatchNorm in training mode). Every path runs the same recipe."""
    if prefer_sequential(fm, theta0.device):
        return train_sequential(fm, theta0, weights, x, y, weight_decay, recipe, seed,
                                workers=model_workers(theta0.device))
    if not _batchable(fm):
        warnings.warn(f"{what}: {_unbatchable_reason(fm)}; retraining one model at a time (same recipe, slower)",
                      stacklevel=2)
        return train_sequential(fm, theta0, weights, x, y, weight_decay, recipe, seed)
    try:
        return train_batched(fm, theta0, weights, x, y, weight_decay, recipe, seed)
    except NotBatchable as exc:
        warnings.warn(f"{what}: the model cannot be batched with vmap ({exc}); retraining one model at a "
                      "time (same recipe, slower)", stacklevel=2)
        return train_sequential(fm, theta0, weights, x, y, weight_decay, recipe, seed)


def prefer_sequential(fm: FlatModel, device: torch.device) -> bool:
    """Convolutional models on CPU are retrained one at a time: vmap turns a convolution with
    per-model weights into a grouped convolution, which on CPU is slower than the models' plain
    convolutions one after another (measured on the small MNIST CNN, batches of 100 images, 2 cores:
    18-27 ms per model-step under vmap for 16-101 models, 6-8 ms one model at a time). ``train`` then
    trains one model per core side by side (``model_workers``; ``bench ground-truth
    mnist5k-cnn-wd1e-3 --n 7``, 2 cores: 1.9x the one-after-another loop, bitwise the same models,
    and 1.9x vmap). On CUDA, and for MLPs and linear models, vmap batching is the faster path."""
    return device.type == "cpu" and any(isinstance(m, torch.nn.Conv2d) for m in fm.module.modules())


def _unbatchable_reason(fm: FlatModel) -> str | None:
    for name, m in fm.module.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training:
            return (f"layer {name!r} is a BatchNorm in training mode: its batch statistics couple the samples and "
                    "its running statistics are updated in place, which vmap cannot batch over models")
    return None


def _batchable(fm: FlatModel) -> bool:
    return _unbatchable_reason(fm) is None


def fit(fm: FlatModel, theta0: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight_decay: float,
        recipe: Recipe, seed: int, steps_per_epoch: int, max_keep: int = 10):
    """Train one model (theta*): returns (theta, kept checkpoints ``[K, P]``, their step numbers ``[K]``).

    Checkpoints are the parameters at the end of evenly spaced epochs (every ``ceil(epochs /
    max_keep)``-th epoch, the last one excluded since it is theta* itself), as TracInCP keeps them."""
    epochs = -(-recipe.steps // steps_per_epoch)
    every = max(1, -(-epochs // max_keep)) * steps_per_epoch
    kept, at = [], []

    def keep(t: int, theta: torch.Tensor) -> None:
        if t % steps_per_epoch == 0:
            progress.advance("training theta*", t, recipe.steps)
        if t % every == 0 and t < recipe.steps:
            kept.append(theta[0].detach().clone())
            at.append(t)

    w = torch.ones(1, x.shape[0], dtype=theta0.dtype, device=theta0.device)
    if _batchable(fm) and not prefer_sequential(fm, theta0.device):
        theta = train_batched(fm, theta0, w, x, y, weight_decay, recipe, seed, on_step=keep)[0]
    else:  # the same trajectory (tested), faster for convolutions on CPU
        theta = train_sequential(fm, theta0, w, x, y, weight_decay, recipe, seed, on_step=keep)[0]
    thetas = torch.stack(kept) if kept else theta0.new_zeros(0, theta0.numel())
    return theta, thetas, np.asarray(at, dtype=np.int64)
