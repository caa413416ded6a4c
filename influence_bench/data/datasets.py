"""Datasets as standardised float tensors with deterministic, seeded, stratified subsets and splits.

Iris ships with the package (Fisher's table as in scikit-learn, BSD-3-Clause). MNIST and CIFAR-10
are read from ``<data root>/<name>.npz`` (the offline copies' format: x_train, y_train, x_test,
y_test as uint8 images and int labels) or, failing that, through torchvision's ``MNIST`` /
``CIFAR10`` layout at the data root (``download=False``). ``influence-bench data prepare NAME``
downloads through torchvision and writes the npz (see ``dataprep``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from influence_bench.hashing import sha256_tensors
from influence_bench.paths import data_dir
from influence_bench.spec.settings import DataSpec


class DataUnavailable(RuntimeError):
    """A dataset is not on this machine; the message says where it was looked for and how to get it."""


class DataCorrupt(ValueError):
    """A dataset file is there but unreadable (truncated, not an npz, pickled objects, keys missing);
    the message names the file and how to replace it. Not skipped like ``DataUnavailable``: an error."""


@dataclass(frozen=True)
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    source: str = ""  # where the arrays were read from (a file, or torchvision:<root>)

    @property
    def n_features(self) -> int:
        return int(self.x_train[0].numel())

    def to(self, device, dtype) -> "Dataset":
        def target(y):  # class labels stay integer; regression targets follow the model dtype
            return y.to(device, dtype) if y.is_floating_point() else y.to(device)

        return Dataset(self.x_train.to(device, dtype), target(self.y_train),
                       self.x_test.to(device, dtype), target(self.y_test), self.n_classes, self.source)

    def fingerprint(self) -> str:
        """sha256 of the train and test arrays (dtype, shape and bytes, as held: after ``to``)."""
        return sha256_tensors(self.x_train, self.y_train, self.x_test, self.y_test)


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
    return _tensors(z[tr], y[tr], z[te], y[te], 3, "package:iris.csv")


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

# How to get each image dataset, for the "not found" message.
HOW_TO_GET = {
    "mnist": "influence-bench data prepare mnist --root {root}",
    "cifar10": "influence-bench data prepare cifar10 --root {root}",
}


# Known lossy copies, by file name and size: the project's offline CIFAR-10 (shared/data/README.md)
# is a JPEG quality-75 re-encoding (mean absolute error 5.85 per channel value against the lossless
# images). Every result read from it carries ``lossy: jpeg-q75`` (``lossy_note``); a cifar10.npz the
# user made with `influence-bench data prepare cifar10` (lossless, from torchvision) does not.
LOSSY_COPIES = {("cifar10.npz", 170_887_089): "jpeg-q75"}


def lossy_note(source: str) -> str | None:
    """``"jpeg-q75"`` when ``source`` (``Dataset.source``) is a known lossy copy, else None."""
    path = Path(source) if source and not source.startswith("torchvision:") else None
    try:
        return LOSSY_COPIES.get((path.name, path.stat().st_size)) if path is not None else None
    except OSError:
        return None


def read_arrays(name: str, root: Path) -> tuple[Arrays, str]:
    """(x_train, y_train, x_test, y_test) of ``name`` from ``<root>/<name>.npz``, else through
    torchvision's layout under ``root`` (``download=False``); also says which source was read."""
    npz = root / f"{name}.npz"
    if npz.is_file():
        fix = (f"delete it and run `{HOW_TO_GET[name].format(root=root)}`, or set INFLUENCE_BENCH_DATA to a folder "
               f"holding a good {name}.npz")
        try:
            with np.load(npz, allow_pickle=False) as d:
                missing = [k for k in NPZ_KEYS if k not in d.files]
                if missing:
                    raise DataCorrupt(f"{name} file {npz} lacks {', '.join(missing)} (it holds {', '.join(d.files)}); "
                                      f"{fix}")
                return tuple(d[k] for k in NPZ_KEYS), str(npz)
        except DataCorrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - any way a foreign file can be unreadable, said in one line
            text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            why = ("it holds pickled Python objects, which are refused, never unpickled" if "pickle" in text.lower()
                   else f"{type(exc).__name__}: {text}")
            raise DataCorrupt(f"{name} file {npz} is not a readable npz ({why}); {fix}") from exc
    from influence_bench.data.prepare import torchvision_arrays

    try:
        return torchvision_arrays(name, root, download=False), f"torchvision:{root}"
    except (RuntimeError, ImportError) as exc:  # torchvision says "Dataset not found"
        raise DataUnavailable(
            f"{name} not found: looked for {npz} and torchvision's {name} layout under {root}. "
            f"Get it with `{HOW_TO_GET[name].format(root=root)}` (needs internet), or set "
            f"INFLUENCE_BENCH_DATA to a folder holding {name}.npz (keys x_train, y_train, x_test, y_test)."
        ) from exc


def subset_of_train_split(y_all: np.ndarray, spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: ``n_train + n_test`` points drawn stratified (class-balanced on a
    balanced source) from the official training set, then split stratified. Both sets come from
    the same distribution, as the Koh & Liang / Basu et al. subsets."""
    y_all = np.asarray(y_all)
    total = spec.n_train + spec.n_test
    if total > len(y_all):
        raise ValueError(f"{spec.name} has {len(y_all)} training images; asked for {spec.n_train}+{spec.n_test}")
    sub, _ = stratified_split(y_all, total, spec.split_seed)
    tr_local, te_local = stratified_split(y_all[sub], spec.n_train, spec.split_seed + 1)
    return sub[tr_local], sub[te_local]


def official_or_subset(arrays: Arrays, spec: DataSpec) -> Arrays:
    """The (x_train, y_train, x_test, y_test) images a spec asks for.

    ``n_train`` equal to the whole official training set (MNIST 60,000, CIFAR-10 50,000) means the
    official split: every training image, in order, and as test set the official test images (all
    of them if ``n_test`` is the test set's size, else a stratified seeded subset of it). Any smaller
    ``n_train`` draws train and test from the training images (``subset_of_train_split``)."""
    x_tr, y_tr, x_te, y_te = arrays
    y_tr, y_te = np.asarray(y_tr, dtype=np.int64), np.asarray(y_te, dtype=np.int64)
    if spec.n_train == len(y_tr):
        if spec.n_test > len(y_te):
            raise ValueError(f"{spec.name} has {len(y_te)} test images; asked for {spec.n_test}")
        te = np.arange(len(y_te)) if spec.n_test == len(y_te) else \
            stratified_split(y_te, spec.n_test, spec.split_seed)[0]
        return x_tr, y_tr, x_te[te], y_te[te]
    tr, te = subset_of_train_split(y_tr, spec)
    return x_tr[tr], y_tr[tr], x_tr[te], y_tr[te]


def load_mnist(spec: DataSpec, root: Path | None = None) -> Dataset:
    """A stratified seeded subset of MNIST's training images, split stratified into train/test
    (or the official split, see ``official_or_subset``), standardised by one scalar mean/std of the
    training images; ``layout="image"`` gives ``[n, 1, 28, 28]``, else flat rows."""
    root = Path(root) if root is not None else data_dir()
    arrays, source = read_arrays("mnist", root)
    x_tr, y_tr, x_te, y_te = official_or_subset(arrays, spec)
    xtr = np.asarray(x_tr, dtype=np.float64).reshape(len(x_tr), -1) / 255.0
    xte = np.asarray(x_te, dtype=np.float64).reshape(len(x_te), -1) / 255.0
    mean, std = xtr.mean(), xtr.std()  # one scalar pair: the usual image standardisation
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    if spec.layout == "image":
        xtr, xte = xtr.reshape(-1, 1, 28, 28), xte.reshape(-1, 1, 28, 28)
    return _tensors(xtr, y_tr, xte, y_te, 10, source)


def load_cifar10(spec: DataSpec, root: Path | None = None) -> Dataset:
    """A class-balanced seeded subset of CIFAR-10's training images (uint8 NHWC on disk), split
    stratified into train/test (or the official split, see ``official_or_subset``), as float
    ``[n, 3, 32, 32]`` standardised per channel with the training images' mean and std
    (``layout="flat"``: the same pixels as rows).

    The offline ``cifar10.npz`` of this project is JPEG-decoded (lossy, see its README); the
    source read is recorded in ``Dataset.source``.
    """
    root = Path(root) if root is not None else data_dir()
    arrays, source = read_arrays("cifar10", root)
    x_tr, y_tr, x_te, y_te = official_or_subset(arrays, spec)
    x_tr = np.asarray(x_tr, dtype=np.float64).transpose(0, 3, 1, 2) / 255.0
    x_te = np.asarray(x_te, dtype=np.float64).transpose(0, 3, 1, 2) / 255.0
    mean = x_tr.mean(axis=(0, 2, 3), keepdims=True)
    std = x_tr.std(axis=(0, 2, 3), keepdims=True)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    if spec.layout == "flat":
        x_tr, x_te = x_tr.reshape(len(x_tr), -1), x_te.reshape(len(x_te), -1)
    return _tensors(x_tr, y_tr, x_te, y_te, 10, source)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_imagefolder(spec: DataSpec, root: Path | None = None) -> Dataset:
    """Images in torchvision's ImageFolder layout at ``<root>/<name>/train/<class>/<image>``
    (ImageNet: ``<root>/imagenet/train/nXXXXXXXX/*.JPEG``): a stratified seeded subset of the
    training images split into train/test, resized and centre-cropped to ``image_size`` (224 if
    0), standardised with the usual ImageNet channel statistics, as ``[n, 3, S, S]``. Only the
    chosen images are decoded."""
    root = Path(root) if root is not None else data_dir()
    folder = root / spec.name / "train"
    if not folder.is_dir():
        raise DataUnavailable(
            f"{spec.name} not found: looked for torchvision's ImageFolder layout at {folder} "
            f"(<class>/<image> below it). Put the {spec.name} training images there (for ImageNet: "
            "the ILSVRC-2012 train set, one folder per wnid), or set INFLUENCE_BENCH_DATA.")
    from torchvision import datasets, transforms

    size = spec.image_size or 224
    tf = transforms.Compose([transforms.Resize(size * 256 // 224), transforms.CenterCrop(size), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = datasets.ImageFolder(str(folder), transform=tf)
    y_all = np.asarray(ds.targets, dtype=np.int64)
    tr, te = subset_of_train_split(y_all, spec)
    x = lambda idx: np.stack([ds[int(i)][0].numpy() for i in idx]).astype(np.float64)  # noqa: E731
    return _tensors(x(tr), y_all[tr], x(te), y_all[te], len(ds.classes), f"imagefolder:{folder}")


def _tensors(xtr, ytr, xte, yte, n_classes, source: str = "") -> Dataset:
    f = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)  # noqa: E731
    g = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
    return Dataset(f(xtr), g(ytr), f(xte), g(yte), n_classes, source)


LOADERS = {"iris": load_iris, "mnist": load_mnist, "cifar10": load_cifar10, "imagenet": load_imagefolder}


def load(spec: DataSpec) -> Dataset:
    return LOADERS[spec.name](spec)
