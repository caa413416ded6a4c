"""Unit tests of the library: small, fast, CPU. Caches go to a per-session temp dir;
the shipped ground truth of the checkout is not read."""

import os

import pytest
from faults.tally import pytest_runtest_logreport, pytest_runtest_makereport, pytest_terminal_summary  # noqa: F401


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Per session; the pytest-xdist workers of one run share one (its build locks keep two workers
    from training or retraining the same models), as the tests of one serial session do."""
    mp = pytest.MonkeyPatch()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        cache = tmp_path_factory.getbasetemp().parent / "ib-cache"
        cache.mkdir(exist_ok=True)
    else:
        cache = tmp_path_factory.mktemp("ib-cache")
    mp.setenv("INFLUENCE_BENCH_CACHE", str(cache))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _no_shipped_ground_truth(monkeypatch):
    """No shipped ground truth unless a test asks for it. Per test, not per session: a session-wide
    setting would outlive tests/ and switch the shipped layer off for suites/ run in the same session
    (README's test command), which would then retrain everything the checkout ships."""
    monkeypatch.setenv("INFLUENCE_BENCH_SHIPPED_GT", "")


@pytest.fixture(autouse=True)
def _inner_sessions_without_hypothesis(monkeypatch):
    """The pytest sessions that tests start themselves (the gate's, the concurrency and plug-in checks':
    about 40 in README's test command) run no property-based test, and hypothesis's pytest plugin
    costs each of them 1.4 s of CPU at its terminal summary (an empty session: 4.6 s with it, 3.2 s
    without). ``PYTEST_ADDOPTS`` reaches those sessions only: this one has read its options."""
    extra = "-p no:hypothesispytest"
    if extra not in os.environ.get("PYTEST_ADDOPTS", ""):
        monkeypatch.setenv("PYTEST_ADDOPTS", f"{os.environ.get('PYTEST_ADDOPTS', '')} {extra}".strip())


@pytest.fixture
def counting(monkeypatch):
    """The removal ids of every ``engine.compute`` call (a retraining), in order."""
    from influence_bench.groundtruth import engine

    calls = []
    real = engine.compute
    monkeypatch.setattr(engine, "compute", lambda c, rem, **kw: calls.append([int(i) for i in rem]) or real(c, rem, **kw))
    return calls
