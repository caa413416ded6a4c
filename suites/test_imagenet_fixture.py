"""The ImageNet code path end to end on CPU, on a tiny GENERATED ImageFolder fixture.

``pytest suites -k imagenet`` runs this: ImageFolder loading at ``<root>/imagenet/train``,
torchvision's ResNet-50 (frozen BatchNorm, 23.5M parameters), full-batch training, three
gradient-only estimators scored through the runner (``runner.evaluate_context``) against
warm-start leave-one-out ground truth from the retraining engine. The images are made-up
coloured squares (2 classes, 3 images each, 32x32), NOT ImageNet: the setting id says
``fixture``, it is not in the catalog, and its cases are not added to the session's results file.
The real ImageNet setting (``imagenet10k-resnet50-wd1e-4``, tier ``paper``) needs the ILSVRC-2012
training images and a GPU.

Ground truth comes from ``engine.compute(ctx, removed, batched=False)``: the engine's sequential
path (the same Newton-CG iteration with plain autograd, one model at a time, no per-model Woodbury
preconditioner). The batched ``vmap`` path holds every model's ResNet-50 at once: measured here on
one CPU thread, 5 models took 93 s and 11.5 GB of memory against 29 s and 3.5 GB sequentially. The
result is saved in the test's own ground-truth store, where the runner then reads it (a test
checks that the runner computes nothing itself).

Budget (measured on one shared CPU thread): about 70 s. Training takes 3 L-BFGS steps and the
ground truth one Newton-CG step of 2 CG iterations: enough to exercise every piece, not to
converge, so the scores themselves mean nothing and are only checked to be well-formed.
"""

import dataclasses
import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from influence_bench.api.loading import build_context
from influence_bench.curvature import products as curvature
from influence_bench.data.datasets import Dataset, load_imagefolder
from influence_bench.groundtruth import GroundTruthStore, engine, ground_truth, store_key
from influence_bench.metrics import METRICS
from influence_bench.scoring.runner import PROTOCOLS, evaluate_context
from influence_bench.spec import catalog
from influence_bench.spec.settings import DataSpec, GroundTruthSpec, ModelSpec, Setting, TrainSpec

pytestmark = pytest.mark.slow

# the module (``influence_bench.groundtruth.builder`` the attribute is its ``build`` function)
gt_build = importlib.import_module("influence_bench.groundtruth.builder")

CLASSES = ("fixture-0-red", "fixture-1-green")
ESTIMATORS = ("gradient-dot", "tracin", "representer")

FIXTURE_SETTING = Setting(
    id="imagenet-fixture-resnet50-wd1e-4", tier="paper",
    data=DataSpec("imagenet", n_train=4, n_test=2, layout="image", image_size=32),
    model=ModelSpec("resnet50"),
    train=TrainSpec(weight_decay=1e-4, max_steps=3, newton_steps=0, dtype="float32"),
    ground_truth=GroundTruthSpec(max_steps=1, damping=1e-3, cg_iters=2),
    description="GENERATED fixture (coloured squares in ImageNet's folder layout), not ImageNet",
)


def make_fixture_imagefolder(root, per_class: int = 3, seed: int = 0):
    """``<root>/imagenet/train/<class>/<k>.png``: seeded 40x48 RGB noise with a bright square in
    the class's colour channel."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        d = root / "imagenet" / "train" / name
        d.mkdir(parents=True)
        for k in range(per_class):
            img = rng.integers(0, 60, size=(40, 48, 3), dtype=np.uint8)
            img[8:32, 8:40, c] = 220
            Image.fromarray(img).save(d / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def imagenet_fixture_context(tmp_path_factory):
    """(context, ground-truth store) of the fixture setting; model and ground truth are cached in
    the test's own temporary folder, never in the user cache."""
    tmp = tmp_path_factory.mktemp("imagenet-fixture")
    mp = pytest.MonkeyPatch()
    mp.setenv("INFLUENCE_BENCH_CACHE", str(tmp / "cache"))
    try:
        torch.manual_seed(0)
        ds = load_imagefolder(FIXTURE_SETTING.data, make_fixture_imagefolder(tmp / "data"))
        assert ds.source.startswith("imagefolder:") and ds.x_train.shape == (4, 3, 32, 32)
        # use_cache=True inside the temporary cache: the checkpoints TracIn needs come from there
        ctx = build_context(FIXTURE_SETTING, ds, use_cache=True)
        store = GroundTruthStore(root=tmp / "ground-truth", shipped=None)
        key = store_key(ctx, "loo")
        store.save_chunk(key, engine.compute(ctx, np.arange(ctx.n_train), batched=False), engine.CEILING_METHOD)
        store.compact(key)
        yield ctx, store
    finally:
        mp.undo()


def test_imagenet_fixture_resnet50_estimators_through_runner(imagenet_fixture_context, monkeypatch):
    ctx, store = imagenet_fixture_context

    def no_retraining(*args, **kw):
        raise AssertionError("the runner retrained: the fixture's stored ground truth was not found")

    monkeypatch.setattr(gt_build, "compute", no_retraining)
    assert FIXTURE_SETTING.id not in catalog.SETTINGS and "fixture" in FIXTURE_SETTING.id
    assert ctx.n_params == 23_512_130 and ctx.n_train == 4 and ctx.n_test == 2  # 2-class ResNet-50
    assert np.isfinite(ctx.train_grad_norm)
    info = {"n_params": ctx.n_params, "hessian_eigenvalues": None, "data_source": ctx.data.source,
            "note": "generated fixture: curvature diagnostics skipped"}
    for name in ESTIMATORS:
        cases = evaluate_context(name, ctx, store=store, info=info)
        assert len(cases) == len(PROTOCOLS) * len(METRICS)
        for c in cases:
            assert c.status == "ok", c.message
            assert "fixture" in c.setting and c.n_test + c.n_undefined == 2
            # one Newton step from a theta* trained 3 steps converges nothing: every removal is left
            # out of the scores and the case says so, instead of scoring unconverged retraining
            assert c.n_unconverged_excluded == 4 and c.n_test == 0 and not np.isfinite(c.value), c
    # the runner's ground truth (every training point removed, as loo-fixed asks for n <= 200)
    gt = ground_truth(ctx, np.arange(4), store, cols=ctx.test_idx)
    assert gt.shape == (4, 2) and np.isfinite(gt).all() and np.abs(gt).max() > 0


@pytest.fixture(scope="module")
def own_loss_retraining(imagenet_fixture_context):
    """Leave-one-out retraining of the first point of each class, scored on the training images
    themselves (the "test set" = the training set, so each delta includes the removed point's own
    loss): (removed indices, entries), shared by the two tests below."""
    ctx, _ = imagenet_fixture_context
    own = Dataset(ctx.data.x_train, ctx.data.y_train, ctx.data.x_train, ctx.data.y_train, ctx.data.n_classes,
                  ctx.data.source)
    ctx_own = dataclasses.replace(ctx, data=own, test_idx=np.arange(ctx.n_train), _cache={})
    removed = np.flatnonzero(np.diff(ctx.y_train.cpu().numpy(), prepend=-1))  # the first point of each class
    return removed, engine.compute(ctx_own, removed, batched=False)


@pytest.mark.xfail(strict=True, reason="known failure since warm-newton takes adaptive Levenberg-Marquardt "
                   "steps (warm-newton-cg/3): one step on the barely trained ResNet-50 fixture raises a removed "
                   "point's own loss less than the others' on average (0.049 vs 0.051; Armijo steps did)")
def test_imagenet_fixture_one_step_raises_own_loss_most(own_loss_retraining):
    removed, entries = own_loss_retraining
    own_change = entries.delta[np.arange(2), removed]
    others = np.array([np.delete(row, i).mean() for row, i in zip(entries.delta, removed)])
    assert own_change.mean() > others.mean(), (own_change, others)


def test_imagenet_fixture_groundtruth_raises_own_loss(imagenet_fixture_context, own_loss_retraining):
    """Control-matched warm retraining is meaningful: without point i, i's own loss goes up
    (measured against the control model trained the same step, not against theta*)."""
    ctx, _ = imagenet_fixture_context
    removed, entries = own_loss_retraining
    assert len(removed) == 2
    assert entries.delta.shape == (2, ctx.n_train) and np.isfinite(entries.delta).all()
    assert np.isfinite(entries.grad_norm).all() and (entries.steps == 1).all()
    own_change = entries.delta[np.arange(2), removed]
    assert (own_change > 0).all(), own_change
    with torch.no_grad():  # and theta* itself was trained: the objective fell from the initialisation
        init = ctx.fm.flat().to(ctx.theta)
        before = float(curvature.objective(ctx.fm, init, ctx.x_train, ctx.y_train, ctx.weight_decay))
        assert float(ctx.objective(ctx.theta)) < before
