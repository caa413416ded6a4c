"""Checks generated from the registry for every estimator, built-in or plug-in (``scoring/checks.py``):
ids read ``check-<check>-<estimator>``, so ``pytest suites/ --estimator my-estimator`` runs them
for a new plug-in with nothing to list."""

from influence_bench.api.registry import REGISTRY


def test_estimator_check(estimator_check, check_contexts):
    name, check = estimator_check
    check.run(REGISTRY.get(name), check_contexts)
