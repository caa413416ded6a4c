"""Image data: CIFAR-10 / MNIST loaders on small fake copies (seeded, no network), the image
layout, class balance, per-channel standardisation, `data prepare` from torchvision layouts."""

import pickle

import numpy as np
import pytest
import torch

from influence_bench.cli.main import main
from influence_bench.data.datasets import DataUnavailable, load_cifar10, load_mnist
from influence_bench.data.prepare import prepare
from influence_bench.spec.settings import DataSpec


def fake_arrays(n_train, n_test, shape, seed=0):
    """Random uint8 images with balanced labels (a fixture, not a real dataset)."""
    rng = np.random.default_rng(seed)
    x_tr = rng.integers(0, 256, size=(n_train, *shape), dtype=np.uint8)
    x_te = rng.integers(0, 256, size=(n_test, *shape), dtype=np.uint8)
    return x_tr, np.arange(n_train) % 10, x_te, np.arange(n_test) % 10


def write_npz(root, name, arrays):
    x_tr, y_tr, x_te, y_te = arrays
    np.savez(root / f"{name}.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)


def test_cifar10_subset_is_balanced_seeded_and_standardised_per_channel(tmp_path):
    write_npz(tmp_path, "cifar10", fake_arrays(300, 50, (32, 32, 3)))
    spec = DataSpec("cifar10", n_train=100, n_test=40, layout="image")
    ds = load_cifar10(spec, tmp_path)
    assert ds.x_train.shape == (100, 3, 32, 32) and ds.x_test.shape == (40, 3, 32, 32)
    assert np.bincount(ds.y_train.numpy()).tolist() == [10] * 10
    assert np.bincount(ds.y_test.numpy()).tolist() == [4] * 10
    torch.testing.assert_close(ds.x_train.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(ds.x_train.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64))
    assert ds.source == str(tmp_path / "cifar10.npz")
    again = load_cifar10(spec, tmp_path)
    assert torch.equal(again.x_train, ds.x_train)
    other = load_cifar10(DataSpec("cifar10", 100, 40, split_seed=1, layout="image"), tmp_path)
    assert not torch.equal(other.y_train, ds.y_train) or not torch.equal(other.x_train, ds.x_train)
    flat = load_cifar10(DataSpec("cifar10", 100, 40), tmp_path)
    torch.testing.assert_close(flat.x_train, ds.x_train.reshape(100, -1), rtol=0, atol=0)


def test_cifar10_pixels_keep_channel_order(tmp_path):
    x_tr, y_tr, x_te, y_te = fake_arrays(20, 10, (32, 32, 3))
    x_tr[..., 1] //= 2
    x_tr[..., 0] = 2 * x_tr[..., 1]  # red = 2 x green in HWC storage: equal after per-channel standardising
    write_npz(tmp_path, "cifar10", (x_tr, y_tr, x_te, y_te))
    ds = load_cifar10(DataSpec("cifar10", 10, 10, layout="image"), tmp_path)
    torch.testing.assert_close(ds.x_train[:, 0], ds.x_train[:, 1])
    assert not torch.allclose(ds.x_train[:, 1], ds.x_train[:, 2])


def test_mnist_image_layout_is_the_flat_pixels_reshaped(tmp_path):
    write_npz(tmp_path, "mnist", fake_arrays(200, 20, (28, 28)))
    flat = load_mnist(DataSpec("mnist", 60, 20), tmp_path)
    image = load_mnist(DataSpec("mnist", 60, 20, layout="image"), tmp_path)
    assert image.x_train.shape == (60, 1, 28, 28)
    assert torch.equal(image.x_train.reshape(60, -1), flat.x_train) and torch.equal(image.y_test, flat.y_test)


@pytest.mark.parametrize("loader,name", [(load_cifar10, "cifar10"), (load_mnist, "mnist")])
def test_missing_dataset_says_where_and_how(tmp_path, loader, name):
    with pytest.raises(DataUnavailable) as info:
        loader(DataSpec(name, 10, 10), tmp_path)
    msg = str(info.value)
    assert str(tmp_path / f"{name}.npz") in msg and f"influence-bench data prepare {name}" in msg


def _idx(path, arr, magic):
    with open(path, "wb") as f:
        f.write(np.array([magic, *arr.shape], dtype=">i4").tobytes())
        f.write(arr.astype(np.uint8).tobytes())


def fake_torchvision_mnist(root, arrays):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    x_tr, y_tr, x_te, y_te = arrays
    _idx(raw / "train-images-idx3-ubyte", x_tr, 2051)
    _idx(raw / "train-labels-idx1-ubyte", y_tr, 2049)
    _idx(raw / "t10k-images-idx3-ubyte", x_te, 2051)
    _idx(raw / "t10k-labels-idx1-ubyte", y_te, 2049)


def test_prepare_mnist_from_torchvision_layout_and_load_it(tmp_path, capsys):
    arrays = fake_arrays(100, 30, (28, 28))
    fake_torchvision_mnist(tmp_path, arrays)
    ds = load_mnist(DataSpec("mnist", 40, 20, layout="image"), tmp_path)  # read through torchvision
    assert ds.source == f"torchvision:{tmp_path}"
    assert main(["data", "prepare", "mnist", "--root", str(tmp_path)]) == 0  # files present: no download
    assert f"wrote {tmp_path / 'mnist.npz'}" in capsys.readouterr().out
    with np.load(tmp_path / "mnist.npz", allow_pickle=False) as z:
        for key, want in zip(("x_train", "y_train", "x_test", "y_test"), arrays):
            np.testing.assert_array_equal(z[key], want)
        assert z["x_train"].dtype == np.uint8 and z["y_train"].dtype == np.int64
    from_npz = load_mnist(DataSpec("mnist", 40, 20, layout="image"), tmp_path)
    assert torch.equal(from_npz.x_train, ds.x_train) and from_npz.source.endswith("mnist.npz")


def test_prepare_cifar10_from_torchvision_layout(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # fake files, no md5s
    x_tr, y_tr, x_te, y_te = fake_arrays(50, 10, (32, 32, 3))
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    chw = lambda x: x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # noqa: E731  (CIFAR's row layout)
    for k in range(5):
        part = slice(10 * k, 10 * (k + 1))
        (base / f"data_batch_{k + 1}").write_bytes(pickle.dumps({"data": chw(x_tr[part]), "labels": list(y_tr[part])}))
    (base / "test_batch").write_bytes(pickle.dumps({"data": chw(x_te), "labels": list(y_te)}))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(c) for c in range(10)]}))
    path = prepare("cifar10", tmp_path, download=False)
    with np.load(path, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["x_train"], x_tr)
        np.testing.assert_array_equal(z["y_test"], y_te)
        assert z["x_train"].shape == (50, 32, 32, 3)


def test_prepare_rejects_unknown_and_missing(tmp_path):
    with pytest.raises(ValueError, match="knows: mnist, cifar10"):
        prepare("imagenet", tmp_path)
    with pytest.raises(RuntimeError):
        prepare("mnist", tmp_path, download=False)


def test_the_offline_cifar_copy_is_labelled_lossy_everywhere(tmp_path):
    """The bundled CIFAR-10 is a JPEG q75 re-encoding: results read from it say so; a cifar10.npz of
    any other size (e.g. made losslessly by `data prepare`) does not."""
    from influence_bench.data.datasets import lossy_note
    from influence_bench.reporting.schema import Case
    from influence_bench.reporting.table import fidelity_table

    copy = tmp_path / "cifar10.npz"
    with open(copy, "wb") as f:
        f.truncate(170_887_089)  # sparse: the offline copy's size
    assert lossy_note(str(copy)) == "jpeg-q75"
    with open(copy, "wb") as f:
        f.truncate(1000)
    assert lossy_note(str(copy)) is None
    assert lossy_note(f"torchvision:{tmp_path}") is None and lossy_note("") is None
    case = Case(estimator="exact", setting="cifar10-2k-cnn-wd1e-3", setting_version=1, spec_hash="x",
                protocol="loo-fixed", mode="warm", metric="spearman", value=0.3, setting_info={"lossy": "jpeg-q75"})
    table = fidelity_table([case])
    assert "cifar10-2k-cnn-wd1e-3*" in table and "* lossy: jpeg-q75" in table
