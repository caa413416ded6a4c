"""Every test here injects one fault (``@pytest.mark.fault``, see ``support.py``): checked at
collection. The tally of how they ended is ``tally.py``'s (its hooks live in tests/conftest.py, which
a pytest-xdist controller loads: it counts what the workers report)."""

from __future__ import annotations

import pytest

from faults.support import CATEGORIES, EXPECT


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
