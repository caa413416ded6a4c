"""The settings grid: every Iris grid point exists once, tiers as documented, old hashes unchanged."""

import dataclasses

from influence_bench import catalog
from influence_bench.settings import DataSpec, make_id, ModelSpec


def test_iris_grid_is_complete_with_documented_tiers():
    shapes = [(d, 16) for d in (1, 2, 3, 4, 6, 8)] + [(2, w) for w in (8, 32, 50)]
    for wd, label in ((1e-3, "1e-3"), (0.0, "0"), (1e-2, "1e-2")):
        for depth, width in shapes:
            s = catalog.get_setting(f"iris-mlp-d{depth}-w{width}-wd{label}")
            assert (s.model.depth, s.model.width, s.weight_decay) == (depth, width, wd)
            assert s.ground_truth == catalog.MLP_GROUND_TRUTH
    smoke = {s.id for s in catalog.select(["iris-mlp-*"], tier="smoke")}
    assert smoke == ({f"iris-mlp-d{d}-w16-wd1e-3" for d in (1, 2, 3, 4, 6, 8)}
                     | {"iris-mlp-d2-w8-wd1e-3", "iris-mlp-d2-w32-wd1e-3"}
                     | {"iris-mlp-d4-w16-wd0"})
    assert not catalog.select(["*-wd1e-2"], tier="smoke")


def test_existing_setting_hashes_are_unchanged():
    # measured before the grid and the `layout` field were added: shipped ground truth stays valid
    assert catalog.get_setting("iris-logreg-wd1e-3").spec_hash == "405e0245509695d9"
    assert catalog.get_setting("mnist5k-logreg-wd1e-3").spec_hash == "a0c1e7f6a6c40e13"
    assert catalog.get_setting("iris-mlp-d3-w16-wd1e-3").spec_hash == "a1d2180369f8cc3e"
    flat = catalog.get_setting("mnist5k-logreg-wd1e-3")
    image = dataclasses.replace(flat, data=dataclasses.replace(flat.data, layout="image"))
    assert image.spec_hash != flat.spec_hash


def test_image_settings_use_image_layout_and_are_not_smoke():
    for sid in ("mnist5k-cnn-wd1e-3", "mnist5k-cnn-wd0", "mnist5k-lenet5-wd1e-3", "mnist5k-lenet5-wd0",
                "cifar10-5k-cnn-wd1e-3", "cifar10-5k-cnn-wd0"):
        s = catalog.get_setting(sid)
        assert s.data.layout == "image" and s.tier == "standard"
    assert catalog.get_setting("mnist5k-lenet5-wd0").train.newton_steps == 0
    assert make_id("cifar10", ModelSpec("cnn", width=16), 0.0) == "cifar10-cnn-w16-wd0"
    assert make_id("cifar10", ModelSpec("resnet18"), 5e-4) == "cifar10-resnet18-wd5e-4"
    assert DataSpec("cifar10", 10, 10).layout == "flat"
