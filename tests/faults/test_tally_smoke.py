"""The suite's own plumbing: the command line runs in-process, and a usage error is a clear error."""

import pytest

from faults.support import assert_clear_error, cli


@pytest.mark.fault("bad-input", "clear-error")
def test_unknown_estimator_is_a_clear_error():
    res = cli("score", "no-such-estimator", "--settings", "iris-logreg")
    assert_clear_error(res, "no-such-estimator", rc=2)
