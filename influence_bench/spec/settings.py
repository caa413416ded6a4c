"""A setting: one frozen, versioned experimental spec (data, model, training, ground truth).

Every result records ``Setting.id``, ``Setting.version`` and ``Setting.spec_hash``; results of
different versions or hashes are never compared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

Tier = Literal["smoke", "standard", "paper"]
TIERS: tuple[str, ...] = ("smoke", "standard", "paper")


@dataclass(frozen=True)
class DataSpec:
    """Which dataset, how much of it, and the seed of the (stratified) subset and split.

    ``layout``: ``flat`` gives ``[n, features]`` rows (logreg, MLPs), ``image`` gives ``[n, C, H, W]``
    (CNNs) of the same standardised pixels. ``image_size``: side length images are resized and
    centre-cropped to (ImageFolder datasets; 0 = 224).
    """

    name: Literal["iris", "mnist", "cifar10", "imagenet"]
    n_train: int
    n_test: int
    split_seed: int = 0
    layout: Literal["flat", "image"] = "flat"
    image_size: int = 0


@dataclass(frozen=True)
class ModelSpec:
    """``logreg`` (multinomial logistic regression), ``mlp`` (``depth`` hidden layers of ``width``),
    ``linear`` (a linear map; with ``loss="mse"`` that is ridge regression), or a convolutional
    family of ``cnn.py``: ``cnn`` (Koh & Liang's all-conv net, ``width`` channels, 0 = 8),
    ``lenet5``, ``resnet18``, ``vgg13`` (32x32 stems), ``resnet50`` (torchvision's, ImageNet stem)."""

    family: Literal["logreg", "mlp", "linear", "cnn", "lenet5", "resnet18", "vgg13", "resnet50"]
    depth: int = 0
    width: int = 0
    activation: Literal["tanh"] = "tanh"
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"


@dataclass(frozen=True)
class TrainSpec:
    """Training of the mean loss + ``weight_decay/2 * ||theta||^2``.

    ``lbfgs+newton`` (full batch): L-BFGS (strong Wolfe) for at most ``max_steps`` iterations or
    until ``||grad|| < lbfgs_tol``, then at most ``newton_steps`` Newton steps (exact Hessian at the
    L-BFGS point) down to ``grad_tol``, so theta* is a stationary point to near machine precision.

    ``sgd`` / ``adam`` (minibatch, ``minibatch.py``): ``epochs`` epochs of ``batch_size`` batches at
    learning rate ``lr`` (``momentum`` for SGD), data order seeded by ``seed``; theta* is where the
    run ends, so it is a stationary point only up to the minibatch noise.
    """

    weight_decay: float
    optimizer: Literal["lbfgs+newton", "sgd", "adam"] = "lbfgs+newton"
    max_steps: int = 3000
    lbfgs_tol: float = 1e-6
    newton_steps: int = 20
    grad_tol: float = 1e-10
    seed: int = 0
    dtype: Literal["float64", "float32"] = "float64"
    lr: float = 0.0
    momentum: float = 0.0
    batch_size: int = 0
    epochs: int = 0

    @property
    def minibatch(self) -> bool:
        return self.optimizer in ("sgd", "adam")


@dataclass(frozen=True)
class GroundTruthSpec:
    """How leave-one-out retraining is done.

    ``warm``: every retrained model starts at theta*, with the removed point's weight set to zero
    (normalisation stays 1/n), and takes at most ``max_steps`` Newton steps on its own objective
    (``retrain="newton-cg"``: each step solved by CG with exact HVPs, preconditioned by the Hessian
    at theta*; ``damping`` > 0 makes them Levenberg-Marquardt steps). A control model trained
    identically without removal is subtracted. With ``damping = 0`` on a convex model this reaches
    the exact leave-one-out optimum to ``grad_tol``.

    ``retrain="sgd"`` / ``"adam"`` (minibatch, ``minibatch.py``): ``warm`` takes ``steps`` steps of
    that optimiser from theta* (``lr``, ``momentum``, ``batch_size``); ``scratch`` repeats the
    setting's own minibatch training from the same initialisation without the point. Minibatch
    retraining is stochastic (the data order): ``replicates`` ground truths are built with data-order
    seeds ``seed, seed + 1, ...`` (the removed models and their control share a replicate's seed),
    the ground truth is their mean and the noise ceiling their split-half agreement.

    ``pbrf``: the proximal Bregman response function (Bae et al. 2022) from theta*, see
    ``groundtruth/pbrf.py``; ``damping`` is its proximity term.
    """

    mode: Literal["warm", "scratch", "pbrf"] = "warm"
    retrain: Literal["newton-cg", "sgd", "adam"] = "newton-cg"
    max_steps: int = 20
    grad_tol: float = 1e-11
    damping: float = 0.0
    cg_iters: int = 30
    lr: float = 0.0
    momentum: float = 0.0
    batch_size: int = 0
    steps: int = 0
    replicates: int = 1
    seed: int = 0

    @property
    def minibatch(self) -> bool:
        return self.retrain in ("sgd", "adam")


@dataclass(frozen=True)
class TestPointSpec:
    """The paper's highest- and median-loss test points plus ``n_random`` seeded random ones."""

    n_random: int = 8
    seed: int = 0


@dataclass(frozen=True)
class ProtocolSpec:
    """Which training points are removed: ``loo-fixed`` (all if n <= ``fixed_all_below``, else a
    seeded random ``fixed_n``) and ``loo-topk`` (the estimator's ``topk`` largest |I| per test point)."""

    fixed_all_below: int = 200
    fixed_n: int = 100
    fixed_seed: int = 0
    topk: int = 40
    # what the suites score by default. loo-topk retrains up to topk x n_test models per estimator;
    # settings where one retraining is expensive (CNNs on CPU) default to loo-fixed alone, whose
    # removals are shared by every estimator.
    default: tuple[str, ...] = ("loo-fixed", "loo-topk")


# Fields added after the first settings shipped: left out of the hash at their default value, so
# the ids, hashes and cached ground truth of existing settings stay valid.
HASH_NEUTRAL_DEFAULTS: dict[tuple[str, str], object] = {
    ("data", "layout"): "flat", ("data", "image_size"): 0,
    ("train", "lr"): 0.0, ("train", "momentum"): 0.0, ("train", "batch_size"): 0, ("train", "epochs"): 0,
    ("ground_truth", "lr"): 0.0, ("ground_truth", "momentum"): 0.0, ("ground_truth", "batch_size"): 0,
    ("ground_truth", "steps"): 0, ("ground_truth", "replicates"): 1, ("ground_truth", "seed"): 0,
    ("protocol", "default"): ("loo-fixed", "loo-topk"),
}


def part_dict(part: str, spec) -> dict:
    """``dataclasses.asdict(spec)`` without the hash-neutral fields at their defaults."""
    d = dataclasses.asdict(spec)
    for (p, key), default in HASH_NEUTRAL_DEFAULTS.items():
        if p == part and d.get(key) == default:
            del d[key]
    return d


@dataclass(frozen=True)
class Setting:
    id: str
    tier: Tier
    data: DataSpec
    model: ModelSpec
    train: TrainSpec
    ground_truth: GroundTruthSpec = field(default_factory=GroundTruthSpec)
    test_points: TestPointSpec = field(default_factory=TestPointSpec)
    protocol: ProtocolSpec = field(default_factory=ProtocolSpec)
    version: int = 1
    description: str = ""

    def spec_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("description")
        for part in {p for p, _ in HASH_NEUTRAL_DEFAULTS}:
            d[part] = part_dict(part, getattr(self, part))
        return d

    @property
    def spec_hash(self) -> str:
        """Content hash of everything that determines the numbers (not the description)."""
        blob = json.dumps(self.spec_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def training_hash(self) -> str:
        """Hash of what determines theta* (data, model, training, version): settings that differ only
        in their ground truth or protocols share a trained model."""
        d = {k: v for k, v in self.spec_dict().items() if k in ("data", "model", "train", "version")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def weight_decay(self) -> float:
        return self.train.weight_decay

    def with_mode(self, mode: str) -> "Setting":
        """The same setting scored against another ground-truth mode (``warm``, ``scratch``, ``pbrf``).

        ``pbrf`` keeps the setting's ``damping`` as its proximity term and gets a Newton budget that
        converges (at least 50 steps of at most 30 CG iterations, ``grad_tol`` 1e-10): unlike warm
        leave-one-out its optimum is close to theta*, but the proximity is small."""
        modes = ("warm", "scratch", "pbrf")
        if mode not in modes:
            raise ValueError(f"setting {self.id!r}: unknown ground-truth mode {mode!r}; known: {', '.join(modes)}")
        gt = self.ground_truth
        if mode == gt.mode:
            return self
        if mode == "pbrf":
            gt = dataclasses.replace(gt, retrain="newton-cg", max_steps=max(gt.max_steps, 50),
                                     cg_iters=max(gt.cg_iters, 30), grad_tol=max(gt.grad_tol, 1e-10))
        return dataclasses.replace(self, ground_truth=dataclasses.replace(gt, mode=mode))


def format_wd(wd: float) -> str:
    """``1e-3`` -> ``"1e-3"``, ``0`` -> ``"0"``, ``5e-4`` -> ``"5e-4"``."""
    if wd == 0:
        return "0"
    mant, exp = f"{wd:e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def make_id(dataset: str, model: ModelSpec, weight_decay: float) -> str:
    if model.family == "logreg":
        shape = "logreg"
    elif model.family == "linear":
        shape = "ridge" if model.loss == "mse" else "linear"
    elif model.family == "mlp":
        shape = f"mlp-d{model.depth}-w{model.width}"
    elif model.family == "cnn" and model.width not in (0, 8):
        shape = f"cnn-w{model.width}"
    else:
        shape = model.family
    return f"{dataset}-{shape}-wd{format_wd(weight_decay)}"
