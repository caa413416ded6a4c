"""The fault suite's tally: every test here injects one fault (``@pytest.mark.fault``, see
``support.py``). At the end of the session the terminal summary says how many faults were injected
and how each ended: handled with a clear error, handled, recovered, or, as failures, a bare
traceback, a silent wrong result or lost results (each must be 0)."""

from __future__ import annotations

from collections import Counter

import pytest

from faults.support import CATEGORIES, EXPECT, BareTraceback, ResultsLost, SilentWrong

_TALLY: Counter = Counter()
_CATEGORY: Counter = Counter()
_FAILURES = ((BareTraceback, "bare tracebacks"), (SilentWrong, "silent wrong results"), (ResultsLost, "results lost"))


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/faults/" in item.nodeid.replace("\\", "/") and item.get_closest_marker("fault") is None:
            raise pytest.UsageError(f"{item.nodeid}: every test of the fault suite needs @pytest.mark.fault(...)")
        m = item.get_closest_marker("fault")
        if m is not None:
            category, expect = (list(m.args) + [m.kwargs.get("category"), m.kwargs.get("expect")])[:2]
            if category not in CATEGORIES or expect not in EXPECT:
                raise pytest.UsageError(f"{item.nodeid}: fault({category!r}, {expect!r}): category must be one of "
                                        f"{CATEGORIES}, expect one of {EXPECT}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    m = item.get_closest_marker("fault")
    if m is None or rep.when != "call" and not (rep.when == "setup" and not rep.passed):
        return
    category, expect = m.args[:2]
    _CATEGORY[category] += 1
    _TALLY["injected"] += 1
    if rep.passed:
        _TALLY[expect] += 1
    elif rep.skipped:
        _TALLY["skipped"] += 1
    else:
        exc = call.excinfo.value if call.excinfo is not None else None
        for kind, label in _FAILURES:
            if isinstance(exc, kind):
                _TALLY[label] += 1
                break
        else:
            _TALLY["other failures"] += 1


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
