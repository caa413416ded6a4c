"""Mutation testing of the floors: every broken variant of `exact` (``scoring/mutants.py``) must
FAIL at least two smoke cases, judged exactly as any estimator is judged (the chance floor, the
floors of what it claims to be). The built-ins passing theirs is the fidelity suite's job."""

import pytest

from influence_bench.scoring import mutants
from influence_bench.spec import catalog


@pytest.fixture(scope="module")
def contexts():
    """The smoke settings' contexts with what the mutants formed in them (exact's Hessian and
    gradients), shared by the mutants this process runs. Each test scores its own mutant: a module
    fixture scoring all six ran again on every pytest-xdist worker that got one of these tests."""
    return {}


@pytest.mark.parametrize("name", mutants.names())
def test_mutant_is_killed(contexts, name):
    (o,) = mutants.run_mutants([name], catalog.select(tier="smoke"), contexts=contexts)
    assert o.mutant == f"mutant-{name}"
    print(mutants.table([o]))
    assert o.killed, (f"{o.mutant} ({o.what}) survived the floors: {len(o.failed)} of {o.run} cases failed, "
                      f"{mutants.KILLS_NEEDED} needed; verdicts {o.verdicts}")
