"""User-supplied initial weights (init_weights.py): where they are found, safe loading, the sha256
that keys the caches, and errors that say what does not fit."""

import numpy as np
import pytest
import torch

from influence_bench.models.flat import FlatModel, build_model
from influence_bench.models.init_weights import (
    InitWeightsError,
    env_var,
    find_init_weights,
    init_weights_sha256,
    load_init_weights,
    sha256_file,
    tagged_cache_path,
)
from influence_bench.spec.settings import DataSpec, ModelSpec, Setting, TrainSpec

SETTING = Setting(id="iris-mlp-d2-w8-wd1e-3", tier="smoke", data=DataSpec("iris", 120, 30),
                  model=ModelSpec("mlp", depth=2, width=8), train=TrainSpec(weight_decay=1e-3))


def _module(seed=0):
    return build_model(SETTING.model, 4, 3, seed=seed)


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_BENCH_DATA", str(tmp_path))
    monkeypatch.delenv(env_var(SETTING.id), raising=False)
    return tmp_path


def test_env_var_name():
    assert env_var("imagenet10k-resnet50-wd1e-4") == "INFLUENCE_BENCH_INIT_WEIGHTS_IMAGENET10K_RESNET50_WD1E_4"


def test_without_weights_nothing_changes(data_root, tmp_path):
    m = _module()
    before = FlatModel(m).flat().clone()
    assert find_init_weights(SETTING) is None and init_weights_sha256(SETTING) is None
    assert load_init_weights(SETTING, m) == (False, None)
    assert torch.equal(FlatModel(m).flat(), before)
    p = tmp_path / "models" / "x-abc.npz"
    assert tagged_cache_path(p, None) == p


@pytest.mark.parametrize("fmt", ["pt", "npz"])
def test_weights_file_under_data_root_is_loaded_and_hashed(data_root, fmt):
    src = _module(seed=7)
    path = data_root / "weights" / f"{SETTING.id}.{fmt}"
    path.parent.mkdir()
    sd = {k: v.float() for k, v in src.state_dict().items()}  # another dtype: cast on load
    if fmt == "pt":
        torch.save({"state_dict": sd}, path)
    else:
        np.savez(path, **{k: v.numpy() for k, v in sd.items()})
    m = _module(seed=0)
    applied, sha = load_init_weights(SETTING, m)
    assert applied and sha == sha256_file(path) == init_weights_sha256(SETTING)
    assert torch.allclose(FlatModel(m).flat(), FlatModel(src).flat().float().double())
    assert FlatModel(m).flat().dtype == torch.float64
    p = data_root / "models" / "iris-mlp-d2-w8-wd1e-3-405e.npz"
    assert tagged_cache_path(p, sha).name == f"iris-mlp-d2-w8-wd1e-3-405e-init{sha[:16]}.npz"


def test_env_var_wins_and_missing_file_is_an_error(data_root, monkeypatch):
    path = data_root / "mine.pt"
    torch.save(_module(seed=3).state_dict(), path)
    monkeypatch.setenv(env_var(SETTING.id), str(path))
    assert find_init_weights(SETTING) == path
    monkeypatch.setenv(env_var(SETTING.id), str(data_root / "nope.pt"))
    with pytest.raises(InitWeightsError, match="no such file"):
        find_init_weights(SETTING)


def test_weights_that_do_not_fit_are_refused(data_root):
    (data_root / "weights").mkdir()
    other = build_model(ModelSpec("mlp", depth=2, width=16), 4, 3, seed=0)
    torch.save(other.state_dict(), data_root / "weights" / f"{SETTING.id}.pt")
    with pytest.raises(InitWeightsError, match="wrong shape"):
        load_init_weights(SETTING, _module())


def test_pickled_objects_are_not_loaded(data_root):
    (data_root / "weights").mkdir()
    torch.save({"weights": object()}, data_root / "weights" / f"{SETTING.id}.pt")
    with pytest.raises(InitWeightsError, match="weights-only"):
        load_init_weights(SETTING, _module())
