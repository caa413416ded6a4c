"""The built-in grid of settings."""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Iterable

from influence_bench.spec.catalog_iris_paper import iris_paper_settings, with_horizon
from influence_bench.spec.catalog_paper import SMALL_CNN, minibatch_setting, paper_settings
from influence_bench.spec.settings import DataSpec, GroundTruthSpec, ModelSpec, Setting, TrainSpec, make_id

IRIS = DataSpec("iris", n_train=120, n_test=30, split_seed=0)
MNIST5K = DataSpec("mnist", n_train=4000, n_test=1000, split_seed=0)
MNIST5K_IMAGES = DataSpec("mnist", n_train=4000, n_test=1000, split_seed=0, layout="image")
# A class-balanced CIFAR-10 subset (500 per class for training), drawn from the official training
# images like the MNIST subsets. The offline copy is JPEG-decoded; see shared/data/README.md.
CIFAR5K_IMAGES = DataSpec("cifar10", n_train=5000, n_test=1000, split_seed=0, layout="image")

# Deep tanh nets have near-flat directions (Hessian eigenvalues far below the weight decay), where
# an undamped Newton step jumps to a far-away basin. Warm retraining there takes adaptive
# Levenberg-Marquardt steps (damping starting at 1e-3 and following the gain ratio, <= 10 CG
# iterations each) until the gradient norm is 1e-6 of its start (recipes.GRAD_RTOL), within
# 100 steps; a removal that needs more is recorded as not converged and is not scored. (The earlier
# fixed 10 steps at fixed damping 1e-3 converged none: on iris d4 wd 1e-3, 0/120.)
MLP_GROUND_TRUTH = GroundTruthSpec(max_steps=100, damping=1e-3, cg_iters=10, grad_tol=1e-12)


def _setting(dataset_label: str, data: DataSpec, model: ModelSpec, wd: float, tier="smoke", **kw) -> Setting:
    kw.setdefault("train", TrainSpec(weight_decay=wd))
    return Setting(id=make_id(dataset_label, model, wd), tier=tier, data=data, model=model, **kw)


# The Iris grid (Basu et al. Sec. 4): a depth sweep at width 16 and a width sweep at depth 2, each
# at weight decay 1e-3, 0 and 1e-2. `smoke` runs on every CI on 2 cores with every estimator, so
# it holds the full depth sweep at 1e-3 plus a few width and weight-decay points; the rest of the grid
# is `standard`. Measured (pytest, `exact`, fresh cache, training + ground truth, shared 2 cores):
# d2-w8 6 s, d2-w32 23 s, d1/d2/d4 without decay 3 / 5 / 8 s; the existing depth sweep 7-59 s.
IRIS_DEPTHS = (1, 2, 3, 4, 6, 8)
IRIS_WIDTHS = (8, 16, 32, 50)
IRIS_WEIGHT_DECAYS = (1e-3, 0.0, 1e-2)
# Width 50 is `standard`: 54 s training + 94 s ground truth on the shared 2 cores, alone more than
# the whole depth sweep. (Before the adaptive Levenberg-Marquardt polish of `training.fit` its theta*
# stopped at ||grad|| 4e-6; with it, 5.5e-9, and 115 of its 120 removals converge.)
# Without decay the nets saturate and most test points have exactly zero loss change, so their
# correlations are undefined (d1 and d2 at wd 0 are scored on 1 of 10 test points, d4 on 9).
# Without weight decay there is no leave-one-out ground truth to compare with: Iris is separable, so
# the unregularised objective has no minimiser (the loss falls forever as the weights grow and the
# units saturate; the Hessian is singular: on d4 its top eigenvalue is 8.7e-5, its lowest -2e-7).
# Retraining then stops wherever its criterion says, not at an optimum (measured on d4: 28% of the
# loss changes exactly 0, 11/120 removals not within 1e-6 of their start gradient in 100 steps), so
# no wd-0 setting is in smoke; they stay in the catalog (`standard`) for the weight-decay study.
# v2: theta* polished by the adaptive Levenberg-Marquardt pass of `training.fit` (v1 stopped at
# ||grad|| 5.8e-6 on d3, so no removal's retraining could converge from it: 0 of 120; v2 1.1e-8).
# d6 (wd 1e-3) is `standard`: its theta* stops at ||grad|| 1.1e-6 under every polish (like width
# 50's at 4e-6), it is no minimiser to compare leave-one-out optima with (0/120 converged).
IRIS_VERSIONS = {(3, 16, 1e-3): 2}
UNPOLISHED = {(6, 16, 1e-3): " (standard: theta* stops at ||grad|| 1.1e-6, no minimiser to retrain to)"}
IRIS_SMOKE = {(d, 16, 1e-3) for d in IRIS_DEPTHS if d != 6} | {(2, w, 1e-3) for w in (8, 32)}
NO_MINIMISER = " (no weight decay: no minimiser on separable Iris, so its leave-one-out ground truth is undefined)"


def _iris_grid() -> list[Setting]:
    shapes = [(d, 16) for d in IRIS_DEPTHS] + [(2, w) for w in IRIS_WIDTHS if w != 16]
    out = []
    for wd in IRIS_WEIGHT_DECAYS:
        for depth, width in shapes:
            tier = "smoke" if (depth, width, wd) in IRIS_SMOKE else "standard"
            sweep = "depth" if width == 16 else "width"
            out.append(_setting("iris", IRIS, ModelSpec("mlp", depth=depth, width=width), wd, tier=tier,
                                ground_truth=MLP_GROUND_TRUTH, version=IRIS_VERSIONS.get((depth, width, wd), 1),
                                description=f"Basu et al. {sweep} sweep: tanh MLP, depth {depth}, width {width}"
                                + (NO_MINIMISER if wd == 0 else "") + UNPOLISHED.get((depth, width, wd), "")))
    return out


# CNNs are trained the way the paper trains them, with minibatch SGD (momentum 0.9, batch 100, lr
# 0.05, float32), and their ground truth is `warm` minibatch retraining: from theta*, 10 more epochs
# of the same SGD at a tenth of its learning rate without the removed point, minus a control run on
# the same batches, in 2
# replicates with different data orders (their agreement is the noise ceiling). A full-batch
# Newton ground truth is out of reach on CPU: one Hessian-vector product of the 2.6k-parameter CNN
# over 4000 MNIST images takes ~5 s on 2 cores, the explicit Hessian ~35 min even on 1000 images.
# Only the fixed removals are scored by default (loo-topk would retrain up to 400 models per
# estimator). Smoke: the small CNN on the 5k MNIST subset and on a class-balanced 2k CIFAR-10
# subset, each with weight decay 1e-3 and 0; LeNet-5 and the 5k CIFAR subset are `standard`.
CIFAR2K_IMAGES = DataSpec("cifar10", n_train=2000, n_test=500, split_seed=0, layout="image")


def _cnn(label: str, data: DataSpec, model: ModelSpec, wd: float, tier: str, description: str) -> Setting:
    return minibatch_setting(label, data, model.family, wd, SMALL_CNN, description, tier=tier, warm_epochs=10,
                             replicates=2)


def _image_settings() -> list[Setting]:
    out = []
    for wd in (1e-3, 0.0):
        out.append(_cnn("mnist5k", MNIST5K_IMAGES, ModelSpec("cnn"), wd, "smoke",
                        "Koh & Liang's all-conv tanh CNN (2,616 parameters) on 5k real MNIST digits, SGD"))
        out.append(_cnn("mnist5k", MNIST5K_IMAGES, ModelSpec("lenet5"), wd, "standard",
                        "LeNet-5 (tanh, average pooling; 61,706 parameters) on 5k real MNIST digits, SGD"))
        out.append(_cnn("cifar10-2k", CIFAR2K_IMAGES, ModelSpec("cnn"), wd, "smoke",
                        "small all-conv tanh CNN (2,760 parameters) on a class-balanced 2k CIFAR-10 subset, SGD"))
        out.append(_cnn("cifar10-5k", CIFAR5K_IMAGES, ModelSpec("cnn"), wd, "standard",
                        "small all-conv tanh CNN (2,760 parameters) on a class-balanced 5k CIFAR-10 subset, SGD"))
    return out


def _build() -> dict[str, Setting]:
    out: list[Setting] = [
        _setting("iris", IRIS, ModelSpec("logreg"), 1e-3,
                 description="convex baseline: multinomial logistic regression on Iris"),
        _setting("mnist5k", MNIST5K, ModelSpec("logreg"), 1e-3,
                 description="convex baseline: multinomial logistic regression on 5k real MNIST digits"),
    ]
    out += _iris_grid()
    out += iris_paper_settings(IRIS)
    out += _image_settings()
    out += paper_settings()
    settings = {s.id: s for s in out}
    assert len(settings) == len(out), "duplicate setting ids in the catalog"
    return settings


SETTINGS: dict[str, Setting] = _build()


class UnknownSetting(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


HORIZON = re.compile(r"(?P<base>iris-.+)-h(?P<epochs>[1-9][0-9]*)")


def get_setting(setting_id: str) -> Setting:
    """The catalog's setting of that id; ``<iris setting>-h<N>`` is that Iris setting with its
    leave-one-out retrained for N epochs of the paper's Adam (``catalog_iris_paper.with_horizon``)."""
    try:
        return SETTINGS[setting_id]
    except KeyError:
        m = HORIZON.fullmatch(setting_id)
        if m and m["base"] in SETTINGS and not SETTINGS[m["base"]].train.minibatch:
            return with_horizon(SETTINGS[m["base"]], int(m["epochs"]))
        close = difflib.get_close_matches(setting_id, SETTINGS, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownSetting(
            f"unknown setting {setting_id!r}.{hint} (`influence-bench list settings` shows all)"
        ) from None


def select(patterns: Iterable[str] | None = None, tier: str | None = None) -> list[Setting]:
    """Settings whose id matches any glob in ``patterns`` (all if None) and, if given, ``tier``.

    A pattern without glob characters must name an existing setting exactly.
    """
    pats = list(patterns) if patterns else ["*"]
    chosen = []
    for p in pats:
        if not any(c in p for c in "*?[") and p not in SETTINGS:
            derived = get_setting(p)  # raises with suggestions; a horizon setting is derived, not listed
            if tier is None or derived.tier == tier:
                chosen.append(derived)
    for s in SETTINGS.values():
        if tier is not None and s.tier != tier:
            continue
        if any(fnmatch.fnmatchcase(s.id, p) for p in pats):
            chosen.append(s)
    return chosen
