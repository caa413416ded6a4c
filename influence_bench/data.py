"""Datasets as standardised float tensors with deterministic, seeded, stratified subsets and splits.

Iris ships with the package (Fisher's table as in scikit-learn, BSD-3-Clause). MNIST is read
from ``<data root>/mnist.npz`` (the offline copy's format: x_train, y_train, x_test, y_test) or,
failing that, through torchvision's ``MNIST(root, download=False)`` layout at the data root.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .paths import data_dir
from .settings import DataSpec


class DataUnavailable(RuntimeError):
    """A dataset is not on this machine; the message says where it was looked for and how to get it."""


@dataclass(frozen=True)
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.x_train[0].numel())

    def to(self, device, dtype) -> "Dataset":
        def target(y):  # class labels stay integer; regression targets follow the model dtype
            return y.to(device, dtype) if y.is_floating_point() else y.to(device)

        return Dataset(self.x_train.to(device, dtype), target(self.y_train),
                       self.x_test.to(device, dtype), target(self.y_test), self.n_classes)


def stratified_split(y: np.ndarray, n_first: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices of ``y`` into (n_first, rest), each class in proportion, seeded."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota = np.floor(counts * n_first / len(y)).astype(int)
    # hand out the remainder to the classes with the largest fractional parts (ties: lower class)
    rem = n_first - quota.sum()
    frac = counts * n_first / len(y) - quota
    for c in np.argsort(-frac, kind="stable")[:rem]:
        quota[c] += 1
    first, rest = [], []
    for c, q in zip(classes, quota):
        idx = rng.permutation(np.flatnonzero(y == c))
        first.append(idx[:q])
        rest.append(idx[q:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(rest))


def _iris_table() -> tuple[np.ndarray, np.ndarray]:
    text = resources.files("influence_bench").joinpath("data_files/iris.csv").read_text()
    rows = [line.split(",") for line in text.strip().splitlines()[1:]]
    x = np.array([[float(v) for v in r[:4]] for r in rows])
    y = np.array([int(r[4]) for r in rows])
    return x, y


def load_iris(spec: DataSpec) -> Dataset:
    x, y = _iris_table()
    if spec.n_train + spec.n_test > len(y):
        raise ValueError(f"iris has {len(y)} rows; asked for {spec.n_train}+{spec.n_test}")
    tr, rest = stratified_split(y, spec.n_train, spec.split_seed)
    te = rest[: spec.n_test] if spec.n_train + spec.n_test == len(y) else \
        rest[stratified_split(y[rest], spec.n_test, spec.split_seed + 1)[0]]
    mean, std = x[tr].mean(0), x[tr].std(0)
    z = (x - mean) / std
    return _tensors(z[tr], y[tr], z[te], y[te], 3)


def _mnist_arrays(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    npz = root / "mnist.npz"
    if npz.is_file():
        with np.load(npz, allow_pickle=False) as d:
            return d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    try:
        from torchvision.datasets import MNIST

        tr = MNIST(str(root), train=True, download=False)
        te = MNIST(str(root), train=False, download=False)
        return tr.data.numpy(), tr.targets.numpy(), te.data.numpy(), te.targets.numpy()
    except (RuntimeError, ImportError) as exc:  # torchvision says "Dataset not found"
        raise DataUnavailable(
            f"MNIST not found: looked for {npz} and torchvision's MNIST layout under {root}. "
            "Set INFLUENCE_BENCH_DATA to a folder holding mnist.npz (keys x_train, y_train, "
            "x_test, y_test), or download it with torchvision: "
            f"torchvision.datasets.MNIST({str(root)!r}, download=True)."
        ) from exc


def load_mnist(spec: DataSpec, root: Path | None = None) -> Dataset:
    """A stratified seeded subset of MNIST's training images, split stratified into train/test.

    ``n_train + n_test`` images are drawn from the official training set (as the Koh & Liang /
    Basu et al. 5k subsets), so the test points come from the same distribution.
    """
    root = Path(root) if root is not None else data_dir()
    x_all, y_all, _, _ = _mnist_arrays(root)
    total = spec.n_train + spec.n_test
    y_all = np.asarray(y_all)
    sub, _ = stratified_split(y_all, total, spec.split_seed)
    tr_local, te_local = stratified_split(y_all[sub], spec.n_train, spec.split_seed + 1)
    tr, te = sub[tr_local], sub[te_local]
    x = np.asarray(x_all, dtype=np.float64).reshape(len(x_all), -1) / 255.0
    mean, std = x[tr].mean(), x[tr].std()  # one scalar pair: the usual image standardisation
    return _tensors((x[tr] - mean) / std, y_all[tr], (x[te] - mean) / std, y_all[te], 10)


def _tensors(xtr, ytr, xte, yte, n_classes) -> Dataset:
    f = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)  # noqa: E731
    g = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
    return Dataset(f(xtr), g(ytr), f(xte), g(yte), n_classes)


LOADERS = {"iris": load_iris, "mnist": load_mnist}


def load(spec: DataSpec) -> Dataset:
    return LOADERS[spec.name](spec)
