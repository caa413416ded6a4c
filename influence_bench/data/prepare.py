"""``influence-bench data prepare NAME``: torchvision's copy of a dataset -> the compact npz the
loaders read (``<root>/<name>.npz``: x_train, y_train, x_test, y_test; uint8 images, int64 labels;
MNIST ``[n, 28, 28]``, CIFAR-10 ``[n, 32, 32, 3]`` as torchvision keeps them). No pickle in the
output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from influence_bench.paths import data_dir, write_npz

PREPARABLE = ("mnist", "cifar10")


def torchvision_arrays(name: str, root: Path, download: bool = False):
    """(x_train, y_train, x_test, y_test) through torchvision's ``MNIST`` / ``CIFAR10`` at ``root``.

    Raises ``RuntimeError`` (torchvision's "Dataset not found") when absent and ``download`` is off.
    """
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}.get(name)
    if cls is None:
        raise ValueError(f"unknown dataset {name!r}; torchvision-backed: {', '.join(PREPARABLE)}")
    tr = cls(str(root), train=True, download=download)
    te = cls(str(root), train=False, download=download)

    def images(ds) -> np.ndarray:
        x = ds.data
        return np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.uint8)

    def labels(ds) -> np.ndarray:
        y = ds.targets
        return np.asarray(y.numpy() if hasattr(y, "numpy") else y, dtype=np.int64)

    return images(tr), labels(tr), images(te), labels(te)


def prepare(name: str, root: Path | None = None, download: bool = True) -> Path:
    """Download ``name`` through torchvision into ``root`` (default: the data root) and write
    ``<root>/<name>.npz``; returns its path. Files torchvision already has are not fetched again."""
    if name not in PREPARABLE:
        raise ValueError(f"unknown dataset {name!r}; `data prepare` knows: {', '.join(PREPARABLE)}")
    root = Path(root) if root is not None else data_dir()
    root.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = torchvision_arrays(name, root, download=download)
    out = root / f"{name}.npz"
    write_npz(out, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    return out
