"""The fault suite's tally: at the end of the session the terminal summary says how many faults were
injected (``@pytest.mark.fault``) and how each ended: handled with a clear error, handled, recovered,
or, as failures, a bare traceback, a silent wrong result or lost results (each must be 0).

The hooks are re-exported by tests/conftest.py. Each fault test's report carries its label in
``user_properties``, which travel with the report: under pytest-xdist the controller, which runs no
test, counts what its workers report, as a serial session counts its own."""

from __future__ import annotations

from collections import Counter

import pytest

from faults.support import CATEGORIES, BareTraceback, ResultsLost, SilentWrong

_TALLY: Counter = Counter()
_CATEGORY: Counter = Counter()
_FAILURES = ((BareTraceback, "bare tracebacks"), (SilentWrong, "silent wrong results"), (ResultsLost, "results lost"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Label the report of a fault test with its category and how it ended (``user_properties``
    travel with the report, so under pytest-xdist the controller counts what the workers ran)."""
    outcome = yield
    rep = outcome.get_result()
    m = item.get_closest_marker("fault")
    if m is None or rep.when != "call" and not (rep.when == "setup" and not rep.passed):
        return
    category, expect = m.args[:2]
    if rep.passed:
        ended = expect
    elif rep.skipped:
        ended = "skipped"
    else:
        exc = call.excinfo.value if call.excinfo is not None else None
        ended = next((label for kind, label in _FAILURES if isinstance(exc, kind)), "other failures")
    rep.user_properties = [*rep.user_properties, ("fault", [category, ended])]  # this report's own list


def pytest_runtest_logreport(report):
    for key, value in report.user_properties:
        if key == "fault":
            category, ended = value
            _CATEGORY[category] += 1
            _TALLY["injected"] += 1
            _TALLY[ended] += 1


def pytest_terminal_summary(terminalreporter):
    if not _TALLY:
        return
    t = _TALLY
    cats = ", ".join(f"{c} {_CATEGORY[c]}" for c in CATEGORIES if _CATEGORY[c])
    terminalreporter.write_sep("=", "fault tally")
    terminalreporter.write_line(
        f"faults injected: {t['injected']} ({cats}); handled with a clear error: {t['clear-error']}, handled: "
        f"{t['handled']}, recovered: {t['recovered']}; bare tracebacks: {t['bare tracebacks']}, silent wrong "
        f"results: {t['silent wrong results']}, results lost: {t['results lost']}, other failures: "
        f"{t['other failures']}, skipped: {t['skipped']}")
