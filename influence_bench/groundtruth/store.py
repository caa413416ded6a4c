"""On-disk cache of ground truth: per (setting hash, mode), the test-loss change of every
test-set point for each removed training index. npz + JSON, atomic writes, a file lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from ..paths import cache_dir, read_npz, write_npz
from ..settings import Setting


class CorruptGroundTruth(RuntimeError):
    pass


@dataclass
class Entries:
    removed: np.ndarray  # [k] training indices
    delta: np.ndarray  # [k, n_test_all] L(z; theta_-i) - L(z; theta_control)
    grad_norm: np.ndarray  # [k] final gradient norm of each retrained model
    steps: np.ndarray  # [k]

    @classmethod
    def empty(cls, n_test: int) -> "Entries":
        return cls(np.zeros(0, np.int64), np.zeros((0, n_test)), np.zeros(0), np.zeros(0, np.int64))

    def merge(self, other: "Entries") -> "Entries":
        keep = ~np.isin(self.removed, other.removed)
        return Entries(np.concatenate([self.removed[keep], other.removed]),
                       np.concatenate([self.delta[keep], other.delta]),
                       np.concatenate([self.grad_norm[keep], other.grad_norm]),
                       np.concatenate([self.steps[keep], other.steps]))

    def lookup(self, removed: np.ndarray) -> np.ndarray:
        pos = {int(r): k for k, r in enumerate(self.removed)}
        return self.delta[[pos[int(r)] for r in removed]]


class GroundTruthStore:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "ground-truth"

    def path(self, setting: Setting, mode: str) -> Path:
        return self.root / f"{setting.id}-{setting.spec_hash}" / f"{mode}.npz"

    def lock(self, setting: Setting, mode: str) -> FileLock:
        p = self.path(setting, mode)
        p.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(p) + ".lock")

    def load(self, setting: Setting, mode: str, n_test: int) -> Entries:
        p = self.path(setting, mode)
        if not p.is_file():
            return Entries.empty(n_test)
        try:
            z = read_npz(p)
            e = Entries(z["removed"].astype(np.int64), z["delta"], z["grad_norm"], z["steps"].astype(np.int64))
        except Exception as exc:  # truncated / not an npz / missing keys
            raise CorruptGroundTruth(f"ground-truth file {p} is unreadable ({type(exc).__name__}: {exc}); "
                                     "delete it to recompute") from exc
        if e.delta.shape != (len(e.removed), n_test) or not np.isfinite(e.delta).all():
            raise CorruptGroundTruth(f"ground-truth file {p} has delta of shape {e.delta.shape} "
                                     f"(expected ({len(e.removed)}, {n_test})) or non-finite values; delete it to recompute")
        return e

    def save(self, setting: Setting, mode: str, entries: Entries) -> None:
        write_npz(self.path(setting, mode), removed=entries.removed, delta=entries.delta,
                  grad_norm=entries.grad_norm, steps=entries.steps)
