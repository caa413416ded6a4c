"""What an estimator receives: the trained model and everything derived from it.

One ``Context`` per (setting, device) per process (``loading.get_context``). Derived quantities
(per-sample gradients, the Hessian, ...) are computed lazily and kept in the context's cache,
reached only through ``ctx.cached(key, make)`` with a declared key (``declare_cache_key``; the
built-in keys are declared below). A key's scope says how long a value lives:

* ``"setting"``: a fact of theta* and the data (their hashes, the evaluated test points, the
  modelled Hessian-vector-product cost, ground truth's preconditioner): kept for the context's life;
* ``"estimator"``: a quantity an estimator computes (gradients, Hessian, GGN, K-FAC factors): the
  harness gives every fidelity case ``ctx.fresh()``, a context without them, so each case pays for
  what it uses (its wall time does not depend on which estimator ran before) and an estimator that
  edits a cached tensor in place cannot change the next one's numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import numpy as np
import torch

from influence_bench.curvature import products as curvature
from influence_bench.data.datasets import Dataset
from influence_bench.errors import EstimatorUnsupported
from influence_bench.hashing import sha256_tensors
from influence_bench.models.flat import FlatModel
from influence_bench.spec.settings import Setting

SCOPES = ("setting", "estimator")


@dataclass(frozen=True)
class CacheKey:
    name: str
    meaning: str
    scope: str  # "setting" or "estimator" (module docstring)


CACHE_KEYS: dict[str, CacheKey] = {}


def declare_cache_key(name: str, meaning: str, scope: str = "estimator") -> str:
    """Declare a context cache key (a plug-in declares its own, e.g. ``"my-estimator:factors"``);
    returns the name. Declaring a name twice with another scope is an error."""
    if scope not in SCOPES:
        raise ValueError(f"cache key {name!r}: scope must be one of {SCOPES}, got {scope!r}")
    old = CACHE_KEYS.get(name)
    if old is not None and old.scope != scope:
        raise ValueError(f"cache key {name!r} is already declared with scope {old.scope!r} ({old.meaning})")
    CACHE_KEYS[name] = CacheKey(name, meaning, scope)
    return name


for _name, _meaning, _scope in [
    ("theta-sha256", "sha256 of theta* (ground-truth store keys, curvature record)", "setting"),
    ("data-sha256", "sha256 of the train and test arrays", "setting"),
    ("x_test", "the evaluated test inputs", "setting"),
    ("y_test", "the evaluated test targets", "setting"),
    ("hvp_flops", "counted FLOPs of one Hessian-vector product over the training set", "setting"),
    ("hvp_seconds", "modelled time of one Hessian-vector product (cost budgets)", "setting"),
    ("setting_info", "the curvature and test-point record of the setting", "setting"),
    ("gt-initial-theta", "the setting's seeded initialisation (scratch ground truth)", "setting"),
    ("gt-precond", "ground truth's factorised H* + damping, keyed by damping", "setting"),
    ("pbrf-precond", "the PBRF's factorised damped GGN, keyed by damping", "setting"),
    ("train_grads", "[n_train, P] per-sample training-loss gradients at theta*", "estimator"),
    ("test_grads", "[n_test, P] loss gradients of the evaluated test points", "estimator"),
    ("hessian", "[P, P] Hessian of the training objective at theta*", "estimator"),
    ("ggn", "[P, P] Gauss-Newton matrix of the training objective at theta*", "estimator"),
    ("checkpoints", "training checkpoints with their learning-rate weights", "estimator"),
    ("kfac:layers", "the nn.Linear layers K-FAC factors", "estimator"),
    ("kfac:train-stats", "K-FAC activation and output-gradient statistics", "estimator"),
    ("kfac:factors", "K-FAC Kronecker factors and their eigendecompositions", "estimator"),
    ("kfac:ekfac-factors", "EK-FAC eigenvalue corrections", "estimator"),
]:
    declare_cache_key(_name, _meaning, _scope)


# (seconds of overhead per product, FLOP/s) by device type. CPU: measured on the 2 cores of these
# machines, idle, one product over the training set: 1.9 s for the MNIST CNN (1.33e10 FLOP, 6.9
# GFLOP/s), 1.3 s for the 2k CIFAR-10 CNN (9.6 GFLOP/s), 5 ms for the Iris MLPs (overhead-bound);
# 5 GFLOP/s keeps the model at or above those. CUDA: a conservative 1 TFLOP/s for these small layers.
HVP_COST_MODEL = {"cpu": (5e-3, 5e9), "cuda": (2e-3, 1e12)}


def _key_name(key: Hashable) -> str:
    return key[0] if isinstance(key, tuple) else key


@dataclass
class Context:
    setting: Setting
    data: Dataset  # the full train / test split of the setting
    fm: FlatModel  # the model as a function of a flat parameter vector
    theta: torch.Tensor  # theta*, flat, detached
    test_idx: np.ndarray  # which test-set points are evaluated (rows of the influence matrix)
    device: torch.device
    train_grad_norm: float = float("nan")
    train_steps: int = -1  # optimiser steps theta* took (-1: unknown)
    theta_source: str = "trained"  # where theta* came from: "trained", "cache" or "shipped"
    _cache: dict = field(default_factory=dict, repr=False)
    #: shared by every ``fresh()`` copy: ``"poisoned"``, why the context must not be used any more
    _flags: dict = field(default_factory=dict, repr=False)

    @property
    def poisoned(self) -> str:
        """Why this context must not be used any more (an estimator edited its data in place); "" if clean."""
        return self._flags.get("poisoned", "")

    def poison(self, reason: str) -> None:
        """Mark this context and every copy of it unusable (``scoring.isolation``): nothing is scored
        or retrained from it."""
        self._flags["poisoned"] = reason

    # ---- plain facts -----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.theta.dtype

    @property
    def model(self) -> torch.nn.Module:
        return self.fm.module

    @property
    def weight_decay(self) -> float:
        return self.setting.weight_decay

    @property
    def n_train(self) -> int:
        return int(self.data.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return len(self.test_idx)

    @property
    def n_params(self) -> int:
        return self.fm.n_params

    @property
    def theta_sha256(self) -> str:
        """sha256 of theta* (dtype, shape, bytes): part of every ground-truth store key and of the
        cached curvature record, so nothing computed from one theta* is served for another."""
        return self.cached("theta-sha256", lambda: sha256_tensors(self.theta))

    @property
    def data_sha256(self) -> str:
        """sha256 of the train and test arrays as the context holds them (``Dataset.fingerprint``)."""
        return self.cached("data-sha256", self.data.fingerprint)

    @property
    def x_train(self) -> torch.Tensor:
        return self.data.x_train

    @property
    def y_train(self) -> torch.Tensor:
        return self.data.y_train

    @property
    def x_test(self) -> torch.Tensor:
        """The evaluated test points only (``len(test_idx)`` rows)."""
        return self.cached("x_test", lambda: self.data.x_test[torch.as_tensor(self.test_idx)])

    @property
    def y_test(self) -> torch.Tensor:
        return self.cached("y_test", lambda: self.data.y_test[torch.as_tensor(self.test_idx)])

    # ---- shared derived quantities -----------------------------------------------------------
    def loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample (unregularised) losses at ``theta``."""
        return curvature.per_sample_loss(self.fm, theta, x, y)

    def objective(self, theta: torch.Tensor) -> torch.Tensor:
        """Training objective: mean loss + weight_decay/2 ||theta||^2."""
        return curvature.objective(self.fm, theta, self.x_train, self.y_train, self.weight_decay)

    def train_grads(self) -> torch.Tensor:
        """``[n_train, P]`` per-sample loss gradients at theta* (computed once, shared)."""
        return self.cached("train_grads", lambda: curvature.per_sample_grads(self.fm, self.theta, self.x_train, self.y_train))

    def test_grads(self) -> torch.Tensor:
        """``[n_test, P]`` loss gradients of the evaluated test points at theta*."""
        return self.cached("test_grads", lambda: curvature.per_sample_grads(self.fm, self.theta, self.x_test, self.y_test))

    def hessian(self) -> torch.Tensor:
        """``[P, P]`` Hessian of the training objective (incl. weight decay) at theta* (computed once)."""
        return self.cached("hessian", lambda: curvature.hessian(self.fm, self.theta, self.x_train, self.y_train, self.weight_decay))

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        return curvature.hvp(self.fm, self.theta, self.x_train, self.y_train, self.weight_decay, v)

    def hvp_flops(self) -> float:
        """Floating-point operations of one Hessian-vector product over the training set at theta*,
        counted (``torch.utils.flop_counter``: matrix products and convolutions) on a product over
        the first 16 training points and scaled to all of them. Deterministic: the code and the
        setting decide it, not the machine."""
        def make() -> float:
            from torch.utils.flop_counter import FlopCounterMode

            m = min(16, self.n_train)
            with FlopCounterMode(display=False) as counter:
                curvature.hvp(self.fm, self.theta, self.x_train[:m], self.y_train[:m], self.weight_decay,
                              torch.ones_like(self.theta))
            return float(counter.get_total_flops()) * self.n_train / m

        return self.cached("hvp_flops", make)

    def hvp_seconds(self) -> float:
        """Modelled time of one Hessian-vector product over the whole training set on this device
        class: a fixed overhead plus ``hvp_flops()`` at a fixed rate (``HVP_COST_MODEL``). What
        cost-bounded estimators and diagnostics budget with. A model, not a timing: whether a case
        runs depends on the code, the setting and the device class, never on how loaded the
        machine is (a timing of the Iris MLP's product ranged from 0.005 s idle to 0.28 s with two
        jobs on the 2 cores, enough to refuse ``cg`` there)."""
        def make() -> float:
            overhead, rate = HVP_COST_MODEL.get(self.device.type, HVP_COST_MODEL["cpu"])
            return overhead + self.hvp_flops() / rate

        return self.cached("hvp_seconds", make)

    def check_hvp_budget(self, n_hvps: float, who: str, max_seconds: float, what: str) -> None:
        """Refuse (``EstimatorUnsupported``) when ``n_hvps`` Hessian-vector products would take longer
        than ``max_seconds`` here; the message gives the estimate and the ways out."""
        if self.setting.model.family in ("logreg", "linear"):  # closed-form / linear fast paths
            return
        est = n_hvps * self.hvp_seconds()
        if est > max_seconds:
            raise EstimatorUnsupported(
                f"{who} on {self.setting.id!r}: {what} needs ~{n_hvps:.0f} Hessian-vector products over "
                f"{self.n_train} training points, ~{est / 60:.0f} min at the {self.hvp_seconds():.2f} s modelled "
                f"for one on {self.device} > max_seconds={max_seconds:g}. Run it on a GPU (--device cuda) or "
                "raise max_seconds.")

    def curvature_operator(self, kind: str = "hessian", chunk_size: int | None = None) -> curvature.CurvatureOperator:
        """A callable ``V [k, P] -> [k, P]`` of batched ``H v`` (``kind="hessian"``) or Gauss-Newton ``G v``
        (``"ggn"``) products at theta*, reusing one autograd graph over calls (iterative solvers)."""
        return curvature.CurvatureOperator(self.fm, self.theta, self.x_train, self.y_train, self.weight_decay,
                                           kind, chunk_size)

    def ggn(self) -> torch.Tensor:
        """``[P, P]`` Gauss-Newton matrix of the training objective (incl. weight decay), computed once;
        for a model linear in theta (logistic regression, ridge) it is the Hessian (shared with ``hessian()``)."""
        if self.setting.model.family in ("logreg", "linear"):
            return self.hessian()
        return self.cached("ggn", lambda: curvature.ggn(self.fm, self.theta, self.x_train, self.y_train, self.weight_decay))

    def checkpoints(self) -> list[tuple[torch.Tensor, float]]:
        """Training checkpoints ``[(theta_k, lr_k), ...]``, oldest first, theta* last: evenly spaced
        L-BFGS iterates with their gradient-descent-equivalent learning-rate weights (definition in
        ``training.Checkpoints``), from the model cache (replayed once if the entry predates them)."""
        from influence_bench.training import fit as training  # the model cache and the shipped models

        return self.cached("checkpoints", lambda: training.checkpoints(
            self.setting, self.data, self.fm, self.theta).as_list(self.theta))

    # ---- the cache ---------------------------------------------------------------------------
    def cached(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """``make()`` once per context (per ``fresh()`` copy for estimator-scoped keys). ``key`` is a
        declared name, or a tuple whose first item is one (``("gt-precond", damping)``)."""
        name = _key_name(key)
        if name not in CACHE_KEYS:
            raise KeyError(f"context cache key {name!r} is not declared; declare it first with "
                           f"influence_bench.api.context.declare_cache_key({name!r}, meaning, scope)")
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def cache_items(self) -> list[tuple[Hashable, Any]]:
        """(key, value) of everything cached now (the harness fingerprints it around each estimator call)."""
        return list(self._cache.items())

    def is_cached(self, key: Hashable) -> bool:
        return key in self._cache

    def fresh(self) -> "Context":
        """The same context without the estimator-scoped cache (what each fidelity case receives)."""
        keep = {k: v for k, v in self._cache.items() if CACHE_KEYS[_key_name(k)].scope == "setting"}
        return dataclasses.replace(self, _cache=keep)

    def with_cached(self, key: Hashable, value: Any) -> "Context":
        """A copy whose cache holds ``value`` under ``key`` (tests and checks: e.g. a product time)."""
        if _key_name(key) not in CACHE_KEYS:
            raise KeyError(f"context cache key {_key_name(key)!r} is not declared")
        return dataclasses.replace(self, _cache={**self._cache, key: value})


