"""Loading a setting into a ``Context``: its data, theta* (shipped with the checkout, cached, or
trained here), and the test points it is evaluated on."""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict

import numpy as np
import torch

from influence_bench import paths
from influence_bench.api.context import Context
from influence_bench.curvature import products as curvature
from influence_bench.data import datasets as data_mod
from influence_bench.data.datasets import Dataset
from influence_bench.spec.settings import Setting
from influence_bench.training import fit as training


def select_test_points(test_losses: torch.Tensor, n_random: int, seed: int) -> np.ndarray:
    """The highest-loss and the median-loss test points, then ``n_random`` seeded others."""
    losses = test_losses.detach().cpu().numpy()
    order = np.argsort(losses, kind="stable")
    highest, median = int(order[-1]), int(order[len(order) // 2])
    chosen = [highest] + ([median] if median != highest else [])
    rest = np.setdiff1d(np.arange(len(losses)), chosen)
    rng = np.random.default_rng(seed)
    extra = rng.choice(rest, size=min(n_random, len(rest)), replace=False)
    return np.array(chosen + sorted(int(i) for i in extra), dtype=np.int64)


#: Contexts kept per process, least recently used dropped first once their tensors (data, theta*,
#: what their setting-scoped cache holds) pass this many bytes; the newest is always kept. The
#: smoke tier's 13 settings fit (119 MB). pytest parametrises the fidelity cases estimator by
#: estimator, so every test moves on to another setting: with the 4 kept before, each CIFAR-10
#: context was rebuilt for every estimator (the whole cifar10.npz read again: 3.8-4.8 s each).
CONTEXT_BYTES = 2 * 2 ** 30
_CONTEXTS: OrderedDict[tuple, Context] = OrderedDict()
_LOCK = threading.Lock()


def get_context(setting: Setting, device: str = "cpu") -> Context:
    """Load the setting's data, train (or load) theta*, choose test points. Cached per process, per
    cache folder and shipped root (``CONTEXT_BYTES``): a context built while the shipped layer was off
    (a unit test) holds a theta* trained here, and is not what a later run with the shipped layer on
    should score."""
    shipped = paths.shipped_gt_dir()
    key = (setting, device, str(paths.cache_dir()), None if shipped is None else str(shipped))
    with _LOCK:
        ctx = _CONTEXTS.get(key)
        if ctx is not None:
            _CONTEXTS.move_to_end(key)
    if ctx is None:
        ctx = build_context(setting, _load_data(setting.data), device)
        with _LOCK:
            ctx = _CONTEXTS.setdefault(key, ctx)  # another thread's, if it was first
            _CONTEXTS.move_to_end(key)
    with _LOCK:
        while len(_CONTEXTS) > 1 and sum(map(_nbytes, _CONTEXTS.values())) > CONTEXT_BYTES:
            _CONTEXTS.popitem(last=False)
    return ctx


def forget_contexts() -> None:
    """Drop every cached context and dataset (one was edited in place by an estimator:
    ``scoring.isolation``); the next ``get_context`` rebuilds from the files and the model cache."""
    with _LOCK:
        _CONTEXTS.clear()
        _DATASETS.clear()


#: Datasets read from an ``.npz`` file, the last few per process, keyed by the data spec and the
#: file's identity (size, modification time, inode: a replaced file is read again). Settings on the
#: same data (with and without weight decay), and contexts built under another cache folder or
#: shipped root, share one read: CIFAR-10's file took 3.3 s to read and 4-8 s with standardising.
DATASETS_KEPT = 4
_DATASETS: OrderedDict[tuple, Dataset] = OrderedDict()


def _load_data(spec) -> Dataset:
    root = paths.data_dir()
    try:
        st = (root / f"{spec.name}.npz").stat()
    except OSError:  # another source (torchvision's layout, an image folder, bundled data): read as it is
        return data_mod.load(spec)
    key = (spec, str(root), st.st_size, st.st_mtime_ns, st.st_ino)
    with _LOCK:
        ds = _DATASETS.get(key)
        if ds is not None:
            _DATASETS.move_to_end(key)
            return ds
    ds = data_mod.load(spec)
    with _LOCK:
        _DATASETS[key] = ds
        while len(_DATASETS) > DATASETS_KEPT:
            _DATASETS.popitem(last=False)
    return ds


def _nbytes(obj, seen: set | None = None) -> int:
    """Bytes of the tensors and arrays that ``obj`` holds (through containers, dataclasses and a
    context's cache), each storage counted once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v, seen) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_nbytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    return 0


def build_context(setting: Setting, ds: Dataset, device: str = "cpu", use_cache: bool = True) -> Context:
    """A context for ``setting`` on the given data (``use_cache=False`` for data the setting's
    hash does not describe, e.g. synthetic data in tests)."""
    dev = torch.device(device)
    dtype = training.DTYPES[setting.train.dtype]
    ds = ds.to(dev, dtype)
    trained = training.train(setting, ds, device=device, use_cache=use_cache)
    with torch.no_grad():
        test_losses = curvature.per_sample_loss(trained.fm, trained.theta, ds.x_test, ds.y_test)
    idx = select_test_points(test_losses, setting.test_points.n_random, setting.test_points.seed)
    return Context(setting, ds, trained.fm, trained.theta, idx, dev, trained.grad_norm, trained.steps,
                   trained.source)
