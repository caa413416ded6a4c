"""Linear datamodeling score ground truth (Park et al. 2023) in the sign convention of docs/protocol.md.

``M`` seeded random subsets S_m keep a fraction ``alpha`` of the training set; one model is
retrained on each (``warm`` mode: from theta*, the left-out points' weights set to 0 with the 1/n
normalisation kept, as for leave-one-out), and a control model trained the same way without
removal is subtracted: ``actual[m, j] = L(z_j; theta_{S_m}) - L(z_j; theta_control)``. An
estimator's prediction for subset m is the summed influence of the points it leaves out,
``sum_{i not in S_m} I[j, i]``; LDS of test point j is the Spearman correlation over m.

A 50% removal is far from theta*, so the per-model Woodbury preconditioner of single removals
does not apply: the plain preconditioner (H*) is used, with ``max_steps`` Newton steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LdsSpec:
    """``n_subsets`` subsets of fraction ``alpha`` drawn with ``seed``; retraining takes at most
    ``max_steps`` Newton steps (more than LOO: the subset optimum is far from theta*)."""

    n_subsets: int = 100
    alpha: float = 0.5
    seed: int = 0
    max_steps: int = 40

    def config(self) -> dict:
        return asdict(self)


DEFAULT = LdsSpec()


def subset_masks(n_train: int, spec: LdsSpec = DEFAULT) -> np.ndarray:
    """``[M, n_train]`` bool, True = kept in S_m. Subset m depends only on (seed, m, n, alpha), so
    any chunk of subsets can be computed on its own."""
    keep = int(round(spec.alpha * n_train))
    masks = np.zeros((spec.n_subsets, n_train), dtype=bool)
    for m in range(spec.n_subsets):
        rng = np.random.default_rng([spec.seed, m])
        masks[m, rng.choice(n_train, size=keep, replace=False)] = True
    return masks


def predicted_change(influence: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``[n_test, M]``: the summed influence of each subset's left-out points."""
    return influence @ (~masks).T.astype(influence.dtype)


