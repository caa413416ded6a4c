"""The settings grid: every Iris grid point exists once, tiers as documented, old hashes unchanged."""

import dataclasses

from influence_bench.spec import catalog
from influence_bench.spec.settings import DataSpec, ModelSpec, make_id


def test_iris_grid_is_complete_with_documented_tiers():
    shapes = [(d, 16) for d in (1, 2, 3, 4, 6, 8)] + [(2, w) for w in (8, 32, 50)]
    for wd, label in ((1e-3, "1e-3"), (0.0, "0"), (1e-2, "1e-2")):
        for depth, width in shapes:
            s = catalog.get_setting(f"iris-mlp-d{depth}-w{width}-wd{label}")
            assert (s.model.depth, s.model.width, s.weight_decay) == (depth, width, wd)
            assert s.ground_truth == catalog.MLP_GROUND_TRUTH
    smoke = {s.id for s in catalog.select(["iris-mlp-*"], tier="smoke")}
    assert smoke == ({f"iris-mlp-d{d}-w16-wd1e-3" for d in (1, 2, 3, 4, 8)}
                     | {"iris-mlp-d2-w8-wd1e-3", "iris-mlp-d2-w32-wd1e-3"})
    # no minimiser without weight decay on separable Iris: ground truth undefined, not in smoke
    wd0 = catalog.get_setting("iris-mlp-d4-w16-wd0")
    assert wd0.tier == "standard" and "no minimiser" in wd0.description
    assert not catalog.select(["*-wd1e-2"], tier="smoke")
    # theta* of d6 is no minimiser (its polish stalls at ||grad|| 1.1e-6): not in smoke either
    d6 = catalog.get_setting("iris-mlp-d6-w16-wd1e-3")
    assert d6.tier == "standard" and "no minimiser" in d6.description


def test_existing_setting_hashes_are_unchanged():
    # measured before the grid and the `layout` field were added: shipped ground truth stays valid
    assert catalog.get_setting("iris-logreg-wd1e-3").spec_hash == "405e0245509695d9"
    assert catalog.get_setting("mnist5k-logreg-wd1e-3").spec_hash == "a0c1e7f6a6c40e13"
    # the Iris MLPs' ground-truth spec changed (converged warm Newton; their ground truth was re-shipped)
    assert catalog.get_setting("iris-mlp-d4-w16-wd1e-3").spec_hash == "d5a1a6b081b6cde6"
    # ... and d3 is v2 (theta* polished by the adaptive Levenberg-Marquardt pass)
    assert catalog.get_setting("iris-mlp-d3-w16-wd1e-3").spec_hash == "880f9aeb50ec2fae"
    flat = catalog.get_setting("mnist5k-logreg-wd1e-3")
    image = dataclasses.replace(flat, data=dataclasses.replace(flat.data, layout="image"))
    assert image.spec_hash != flat.spec_hash


def test_cnn_settings_train_with_sgd_and_score_fixed_removals():
    smoke = {s.id for s in catalog.select(["*-cnn-*", "*-lenet5-*"], tier="smoke")}
    assert smoke == {"mnist5k-cnn-wd1e-3", "mnist5k-cnn-wd0", "cifar10-2k-cnn-wd1e-3", "cifar10-2k-cnn-wd0"}
    for sid in smoke | {"mnist5k-lenet5-wd1e-3", "cifar10-5k-cnn-wd0"}:
        s = catalog.get_setting(sid)
        assert s.data.layout == "image" and s.train.optimizer == "sgd" and s.train.dtype == "float32"
        gt = s.ground_truth
        assert (gt.mode, gt.retrain, gt.replicates) == ("warm", "sgd", 2)
        assert gt.steps == 10 * (s.data.n_train // gt.batch_size)  # 10 epochs of warm retraining
        assert s.protocol.default == ("loo-fixed",)
    assert catalog.get_setting("mnist5k-lenet5-wd0").tier == "standard"
    assert catalog.get_setting("cifar10-2k-cnn-wd0").data.n_train == 2000
    assert make_id("cifar10", ModelSpec("cnn", width=16), 0.0) == "cifar10-cnn-w16-wd0"
    assert make_id("cifar10", ModelSpec("resnet18"), 5e-4) == "cifar10-resnet18-wd5e-4"
    assert DataSpec("cifar10", 10, 10).layout == "flat"


PAPER_IDS = {"mnist-cnn-wd1e-3", "mnist-cnn-wd0", "mnist-lenet5-wd1e-3", "mnist-lenet5-wd0",
             "cifar10-resnet18-wd5e-4", "cifar10-resnet18-wd0", "cifar10-vgg13-wd5e-4", "cifar10-vgg13-wd0",
             "imagenet10k-resnet50-wd1e-4"}


def test_paper_tier_settings_ids_tiers_and_specs():
    from influence_bench.spec.catalog_paper import paper_settings

    paper = {s.id: s for s in catalog.select(tier="paper")}
    assert set(paper) == PAPER_IDS
    for s in paper_settings():
        assert s.id == make_id(s.id.split(f"-{s.model.family}-")[0], s.model, s.weight_decay)  # the naming scheme
        assert s.data.layout == "image" and s.description and catalog.get_setting(s.id) == s
    assert {s.id for s in catalog.select(["mnist6k-*"], tier="standard")} == {
        "mnist6k-cnn-wd1e-3", "mnist6k-cnn-wd0", "mnist6k-lenet5-wd1e-3", "mnist6k-lenet5-wd0"}
    assert (paper["mnist-cnn-wd0"].data.n_train, paper["mnist-cnn-wd0"].data.n_test) == (60_000, 10_000)
    assert (paper["cifar10-vgg13-wd0"].data.n_train, paper["cifar10-vgg13-wd0"].data.n_test) == (50_000, 10_000)
    img = paper["imagenet10k-resnet50-wd1e-4"]
    assert (img.data.name, img.data.image_size, img.model.family, img.weight_decay) == ("imagenet", 224, "resnet50", 1e-4)
    for sid in ("cifar10-resnet18-wd5e-4", "cifar10-vgg13-wd0", "imagenet10k-resnet50-wd1e-4", "mnist-lenet5-wd0"):
        s = catalog.get_setting(sid)  # minibatch SGD, stochastic ground truth with 3 replicates
        assert s.train.optimizer == "sgd" and s.ground_truth.retrain == "sgd" and s.ground_truth.replicates == 3


def test_paper_model_parameter_counts():
    import torch

    from influence_bench.models.flat import FlatModel, build_model
    from influence_bench.spec.catalog_paper import PARAMS

    def n(family, shape, classes):
        return FlatModel(build_model(ModelSpec(family), 0, classes, 0, torch.float32, in_shape=shape)).n_params

    # torchvision's resnet18(num_classes=10) has 11,181,642; the 3x3 stem replaces 9,408 weights by 1,728
    assert n("resnet18", (3, 32, 32), 10) == PARAMS["resnet18"] == 11_173_962
    assert n("vgg13", (3, 32, 32), 10) == PARAMS["vgg13"] == 9_416_010
    assert n("resnet50", (3, 224, 224), 1000) == PARAMS["resnet50"] == 25_557_032  # torchvision's ResNet-50
    assert n("resnet50", (3, 224, 224), 10) == 23_528_522
    assert n("cnn", (1, 28, 28), 10) == PARAMS["cnn"] and n("lenet5", (1, 28, 28), 10) == PARAMS["lenet5"]


def test_full_dataset_settings_use_the_official_split(tmp_path):
    import numpy as np

    from influence_bench.data.datasets import load_mnist

    rng = np.random.default_rng(0)
    y_tr, y_te = np.arange(60) % 10, np.arange(20) % 10
    np.savez(tmp_path / "mnist.npz", x_train=rng.integers(0, 255, (60, 28, 28), dtype=np.uint8), y_train=y_tr,
             x_test=rng.integers(0, 255, (20, 28, 28), dtype=np.uint8), y_test=y_te)
    full = load_mnist(DataSpec("mnist", 60, 20, layout="image"), tmp_path)
    assert full.x_train.shape == (60, 1, 28, 28) and full.x_test.shape == (20, 1, 28, 28)
    assert full.y_train.tolist() == y_tr.tolist() and full.y_test.tolist() == y_te.tolist()
    part = load_mnist(DataSpec("mnist", 60, 10), tmp_path)  # a stratified subset of the official test set
    assert np.bincount(part.y_test.numpy()).tolist() == [1] * 10
    sub = load_mnist(DataSpec("mnist", 40, 10), tmp_path)  # smaller n_train: both from the training images
    assert sub.x_train.shape == (40, 784) and sub.x_test.shape == (10, 784)
