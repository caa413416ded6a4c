"""Ground truth by real retraining: ``ground_truth(ctx, removed)`` returns the test-loss changes,
computing only what the store does not hold yet."""

from __future__ import annotations

import numpy as np

from ..context import Context
from . import engine
from .store import CorruptGroundTruth, Entries, GroundTruthStore

__all__ = ["ground_truth", "GroundTruthStore", "CorruptGroundTruth", "Entries", "engine"]


def ground_truth(ctx: Context, removed: np.ndarray, store: GroundTruthStore | None = None) -> np.ndarray:
    """``[len(removed), n_test_all]`` changes in each test-set point's loss when that index is removed."""
    store = store or GroundTruthStore()
    mode = ctx.setting.ground_truth.mode
    removed = np.asarray(removed, dtype=np.int64)
    if removed.size and (removed.min() < 0 or removed.max() >= ctx.n_train):
        raise IndexError(f"setting {ctx.setting.id!r}: removed indices must lie in [0, {ctx.n_train})")
    n_test_all = int(ctx.data.x_test.shape[0])
    entries = store.load(ctx.setting, mode, n_test_all)
    missing = np.setdiff1d(removed, entries.removed)
    if missing.size:
        with store.lock(ctx.setting, mode):
            entries = store.load(ctx.setting, mode, n_test_all)  # another process may have added some
            missing = np.setdiff1d(removed, entries.removed)
            if missing.size:
                entries = entries.merge(engine.compute(ctx, missing))
                store.save(ctx.setting, mode, entries)
    return entries.lookup(removed)
