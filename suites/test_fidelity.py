"""Fidelity suite: every (estimator x setting) of the selected tier against leave-one-out retraining.

The parametrisation comes from the influence-bench pytest plugin: ids read
``<estimator>-<setting>``, e.g. ``exact-iris-mlp-d3-w16-wd1e-3``, so ``-k`` selects by estimator,
dataset or shape. Thresholds live in ``influence_bench/thresholds.toml``.
"""


def test_fidelity(fidelity_case, influence_bench):
    influence_bench.check(fidelity_case)
