"""The Iris grid under the paper's own protocol (Basu et al. 2021, Sec. 4), and the retraining
horizon as an axis.

Two families of Iris settings share data, models and test-point policy and differ in how theta* is
trained and how leave-one-out is retrained:

* **converged** (``catalog._iris_grid``, ids ``iris-mlp-d2-w16-wd1e-3``): full-batch L-BFGS +
  Newton to a stationary point, leave-one-out retrained by warm Newton to its convergence criterion;
* **paper** (here, ids ending ``-paper``): the paper's stochastic protocol as far as it is known
  (``PAPER.md``; the optimiser follows Epifano et al. 2023's Iris replication): Adam (lr 1e-3,
  batches of 30, seeded data order) for 1000 epochs, so theta* is where the run ends, not a
  stationary point; ground truth by warm-start retraining from theta* with the same Adam for a fixed
  horizon of ``PAPER_HORIZON_EPOCHS`` epochs, minus a control run on the same batches, in 3
  replicates with different data orders (their agreement is the noise ceiling); scored on loo-fixed
  and loo-topk (k = 40).

``with_horizon`` gives a converged-family setting whose leave-one-out is retrained from its own
(stationary) theta* by the paper's Adam for a given number of epochs: the same theta*, only the
question asked of the estimator changes (``influence-bench paper``'s horizon decomposition).
"""

from __future__ import annotations

import dataclasses

from influence_bench.spec.settings import (
    DataSpec,
    GroundTruthSpec,
    ModelSpec,
    ProtocolSpec,
    Setting,
    TrainSpec,
    make_id,
)

PAPER_SUFFIX = "-paper"
BATCH = 30  # 4 steps per epoch of Iris's 120 training points
PAPER_TRAIN = dict(optimizer="adam", lr=1e-3, batch_size=BATCH, epochs=1000, dtype="float64")
PAPER_HORIZON_EPOCHS = 100
REPLICATES = 3
# The depth sweep at width 16 and the width sweep at depth 2, each with and without weight decay.
DEPTHS = (1, 2, 3, 4, 6, 8)
WIDTHS = (8, 16, 32, 50)
WEIGHT_DECAYS = (1e-3, 0.0)


def retraining(epochs: int, n_train: int, replicates: int = REPLICATES) -> GroundTruthSpec:
    """Warm-start retraining from theta* by the paper's Adam for ``epochs`` epochs."""
    return GroundTruthSpec(mode="warm", retrain="adam", lr=PAPER_TRAIN["lr"], batch_size=BATCH,
                           steps=epochs * (n_train // BATCH), replicates=replicates)


def paper_setting(data: DataSpec, depth: int, width: int, wd: float) -> Setting:
    model = ModelSpec("mlp", depth=depth, width=width)
    return Setting(id=make_id("iris", model, wd) + PAPER_SUFFIX, tier="standard", data=data, model=model,
                   train=TrainSpec(weight_decay=wd, **PAPER_TRAIN),
                   ground_truth=retraining(PAPER_HORIZON_EPOCHS, data.n_train),
                   protocol=ProtocolSpec(default=("loo-fixed", "loo-topk")),
                   description=f"Basu et al. protocol: tanh MLP depth {depth}, width {width}, Adam lr 1e-3 batch "
                               f"{BATCH} for {PAPER_TRAIN['epochs']} epochs; leave-one-out by "
                               f"{PAPER_HORIZON_EPOCHS} more epochs of the same Adam from theta*, "
                               f"{REPLICATES} replicates")


def iris_paper_settings(data: DataSpec) -> list[Setting]:
    shapes = [(d, 16) for d in DEPTHS] + [(2, w) for w in WIDTHS if w != 16]
    return [paper_setting(data, d, w, wd) for wd in WEIGHT_DECAYS for d, w in shapes]


def with_horizon(setting: Setting, epochs: int, replicates: int = REPLICATES) -> Setting:
    """``setting`` (same data, model, training: the same theta*) with its leave-one-out retrained
    from theta* by the paper's Adam for ``epochs`` epochs; id suffix ``-h<epochs>``. Scored on
    loo-fixed (the removals every estimator shares)."""
    if epochs < 1:
        raise ValueError(f"setting {setting.id!r}: a retraining horizon needs at least 1 epoch, got {epochs}")
    return dataclasses.replace(setting, id=f"{setting.id}-h{epochs}",
                               ground_truth=retraining(epochs, setting.data.n_train, replicates),
                               protocol=dataclasses.replace(setting.protocol, default=("loo-fixed",)),
                               description=f"{setting.description}; leave-one-out by {epochs} epochs of Adam "
                                           "(lr 1e-3) from theta*")
