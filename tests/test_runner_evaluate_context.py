"""evaluate_context (a prebuilt context) gives the runner's own cases."""

from influence_bench.api.loading import get_context
from influence_bench.scoring.runner import evaluate, evaluate_context
from influence_bench.spec import catalog


def test_evaluate_context_matches_evaluate():
    s = catalog.get_setting("iris-logreg-wd1e-3")
    want = evaluate("gradient-dot", s)
    got = evaluate_context("gradient-dot", get_context(s))
    assert [(c.protocol, c.metric, c.status, c.value, c.n_test) for c in got] == \
        [(c.protocol, c.metric, c.status, c.value, c.n_test) for c in want]
    custom = evaluate_context("gradient-dot", get_context(s), info={"note": "x"})
    assert custom[0].diagnostics["setting_info"] == {"note": "x"}
