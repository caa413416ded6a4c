"""Rows of stored ground truth, possibly holding only some test columns (shipped shards)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ARRAYS = ("ids", "delta", "grad_norm", "steps", "converged")
OPTIONAL = ("converged",)  # arrays that shards written before them lack

# ``converged`` per row: the retrained model met its recipe's stopping criterion (warm Newton: the
# gradient-norm tolerance; minibatch recipes run a fixed horizon and count as converged by
# definition), did not (it hit the step budget), or is unknown (a shard written before the flag).
CONVERGED, UNCONVERGED, UNKNOWN = 1, 0, -1


def convergence_flags(converged, n: int | None = None) -> np.ndarray:
    """``int8`` flags from booleans (or from nothing: ``n`` rows of ``UNKNOWN``)."""
    if converged is None:
        return np.full(n, UNKNOWN, np.int8)
    return np.where(np.asarray(converged, bool), CONVERGED, UNCONVERGED).astype(np.int8)


def combine_flags(flags: list[np.ndarray]) -> np.ndarray:
    """Flags of rows averaged over replicates: unconverged if any replicate is, else unknown if any is."""
    f = np.stack(flags)
    return np.where((f == UNCONVERGED).any(0), UNCONVERGED, f.min(0)).astype(np.int8)


class MissingColumns(KeyError):
    """Entries hold only some test columns (a shipped shard) and other columns were asked for."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


@dataclass
class Entries:
    ids: np.ndarray  # [k] removed training index (loo) or subset number (lds)
    delta: np.ndarray  # [k, n_test_all] (or [k, len(cols)]) L(z; theta_-S) - L(z; theta_control)
    grad_norm: np.ndarray  # [k] final gradient norm of each retrained model
    steps: np.ndarray  # [k]
    noise_ceiling: float = 1.0
    cols: np.ndarray | None = None  # test-set columns ``delta`` holds, in order; None = all of them
    converged: np.ndarray | None = None  # [k] int8 CONVERGED / UNCONVERGED / UNKNOWN (None: all unknown)

    def __post_init__(self):
        if self.converged is None:
            self.converged = convergence_flags(None, len(self.ids))
        self.converged = np.asarray(self.converged, np.int8)

    @property
    def unconverged(self) -> np.ndarray:
        """[k] bool: rows known not to have converged (unknown rows are not)."""
        return self.converged == UNCONVERGED

    @classmethod
    def empty(cls, n_test: int, cols: np.ndarray | None = None) -> "Entries":
        width = n_test if cols is None else len(cols)
        return cls(np.zeros(0, np.int64), np.zeros((0, width)), np.zeros(0), np.zeros(0, np.int64),
                   cols=None if cols is None else np.asarray(cols, np.int64), converged=np.zeros(0, np.int8))

    def same_cols(self, other: "Entries") -> bool:
        if self.cols is None or other.cols is None:
            return self.cols is None and other.cols is None
        return np.array_equal(self.cols, other.cols)

    def merge(self, other: "Entries") -> "Entries":
        """Rows of both (``other`` wins on shared ids); both must hold the same columns."""
        if not self.same_cols(other):
            raise ValueError("cannot merge ground-truth entries holding different test columns; restrict() both first")
        keep = ~np.isin(self.ids, other.ids)
        ids, delta, grad_norm, steps, converged = (np.concatenate([getattr(self, f)[keep], getattr(other, f)])
                                                   for f in ARRAYS)
        return Entries(ids, delta, grad_norm, steps, noise_ceiling=min(self.noise_ceiling, other.noise_ceiling),
                       cols=self.cols, converged=converged)

    def select(self, ids: np.ndarray) -> "Entries":
        pos = {int(r): k for k, r in enumerate(self.ids)}
        rows = [pos[int(r)] for r in ids]
        ids, delta, grad_norm, steps, converged = (getattr(self, f)[rows] for f in ARRAYS)
        return Entries(ids, delta, grad_norm, steps, noise_ceiling=self.noise_ceiling, cols=self.cols,
                       converged=converged)

    def covers(self, cols: np.ndarray | None) -> bool:
        if self.cols is None:
            return True
        return cols is not None and bool(np.isin(cols, self.cols).all())

    def restrict(self, cols: np.ndarray | None) -> "Entries":
        """The same rows with ``delta`` holding exactly ``cols`` (in that order; None = every test
        column). Raises ``MissingColumns`` if these entries do not hold all of them."""
        if cols is None:
            if self.cols is not None:
                raise MissingColumns(f"these ground-truth entries hold only test columns {self.cols.tolist()} "
                                     "(a shipped, column-subset shard); ask for those columns, or build the full rows")
            return self
        cols = np.asarray(cols, np.int64)
        if self.cols is None:
            delta = self.delta[:, cols]
        else:
            pos = {int(c): k for k, c in enumerate(self.cols)}
            lacking = [int(c) for c in cols if int(c) not in pos]
            if lacking:
                raise MissingColumns(f"ground-truth entries lack test columns {lacking[:10]} "
                                     f"(they hold {self.cols.tolist()})")
            delta = self.delta[:, [pos[int(c)] for c in cols]]
        return Entries(self.ids, delta, self.grad_norm, self.steps, self.noise_ceiling, cols.copy(), self.converged)

    def lookup(self, ids: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
        """``delta`` of ``ids`` at test columns ``cols`` (None: every column; an error for partial entries)."""
        return self.select(ids).restrict(cols).delta
