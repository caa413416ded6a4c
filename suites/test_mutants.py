"""Mutation testing of the floors: every broken variant of `exact` (``scoring/mutants.py``) must
FAIL at least two smoke cases, judged exactly as any estimator is judged (the chance floor, the
floors of what it claims to be). The built-ins passing theirs is the fidelity suite's job."""

import pytest

from influence_bench.scoring import mutants
from influence_bench.spec import catalog


@pytest.fixture(scope="module")
def outcomes():
    return {o.mutant: o for o in mutants.run_mutants(mutants.names(), catalog.select(tier="smoke"))}


@pytest.mark.parametrize("name", mutants.names())
def test_mutant_is_killed(outcomes, name):
    o = outcomes[f"mutant-{name}"]
    print(mutants.table([o]))
    assert o.killed, (f"{o.mutant} ({o.what}) survived the floors: {len(o.failed)} of {o.run} cases failed, "
                      f"{mutants.KILLS_NEEDED} needed; verdicts {o.verdicts}")
