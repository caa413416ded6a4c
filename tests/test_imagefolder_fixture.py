"""The ImageNet code path (ImageFolder loading, ResNet-50 with frozen BatchNorm, training steps)
on a tiny generated ImageFolder fixture: 3 made-up classes of coloured squares. A fixture for the
code path only, never reported as ImageNet."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from influence_bench.curvature.products import objective
from influence_bench.data.datasets import DataUnavailable, load_imagefolder
from influence_bench.models.flat import FlatModel, build_model
from influence_bench.spec.settings import DataSpec, ModelSpec, Setting, TrainSpec
from influence_bench.training.fit import fit


@pytest.fixture
def fixture_imagefolder(tmp_path):
    """``<tmp>/imagenet/train/<class>/<k>.png``: 3 classes x 4 seeded 40x48 RGB images."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["fixture-0-red", "fixture-1-green", "fixture-2-blue"]):
        d = tmp_path / "imagenet" / "train" / name
        d.mkdir(parents=True)
        for k in range(4):
            img = rng.integers(0, 60, size=(40, 48, 3), dtype=np.uint8)
            img[8:32, 8:40, c] = 220
            Image.fromarray(img).save(d / f"{k}.png")
    return tmp_path


def test_imagefolder_resnet50_path(fixture_imagefolder):
    spec = DataSpec("imagenet", n_train=6, n_test=3, layout="image", image_size=32)
    ds = load_imagefolder(spec, fixture_imagefolder)
    assert ds.x_train.shape == (6, 3, 32, 32) and ds.n_classes == 3
    assert np.bincount(ds.y_train.numpy()).tolist() == [2, 2, 2]
    assert ds.source.startswith("imagefolder:")
    assert ds.x_train[ds.y_train == 0][:, 0].mean() > ds.x_train[ds.y_train == 0][:, 2].mean()  # red is red
    module = build_model(ModelSpec("resnet50"), 0, 3, seed=0, in_shape=(3, 32, 32))
    fm = FlatModel(module)
    assert not module.training and fm.n_params == 23_514_179
    setting = Setting(id="fixture-imagefolder-resnet50", tier="paper", data=spec, model=ModelSpec("resnet50"),
                      train=TrainSpec(weight_decay=1e-4, max_steps=1, newton_steps=0))
    theta0 = fm.flat()
    theta, gnorm, steps = fit(fm, theta0, ds, setting)
    assert steps == 1 and np.isfinite(gnorm)
    with torch.no_grad():
        before, after = (float(objective(fm, t, ds.x_train, ds.y_train, 1e-4)) for t in (theta0, theta))
    assert after < before


def test_missing_imagefolder_says_where(tmp_path):
    with pytest.raises(DataUnavailable, match=str(tmp_path / "imagenet" / "train")):
        load_imagefolder(DataSpec("imagenet", 4, 2, layout="image"), tmp_path)


def test_image_size_keeps_existing_hashes():
    s = Setting(id="x", tier="paper", data=DataSpec("imagenet", 4, 2), model=ModelSpec("resnet50"),
                train=TrainSpec(weight_decay=0.0))
    assert "image_size" not in s.spec_dict()["data"]
    assert dataclasses.replace(s, data=dataclasses.replace(s.data, image_size=32)).spec_hash != s.spec_hash
