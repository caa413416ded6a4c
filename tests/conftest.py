"""Unit tests of the library: small, fast, CPU. Caches go to a per-session temp dir;
the shipped ground truth of the checkout is not read."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("INFLUENCE_BENCH_CACHE", str(tmp_path_factory.mktemp("ib-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _no_shipped_ground_truth(monkeypatch):
    """No shipped ground truth unless a test asks for it. Per test, not per session: a session-wide
    setting would outlive tests/ and switch the shipped layer off for suites/ run in the same session
    (README's test command), which would then retrain everything the checkout ships."""
    monkeypatch.setenv("INFLUENCE_BENCH_SHIPPED_GT", "")


@pytest.fixture
def counting(monkeypatch):
    """The removal ids of every ``engine.compute`` call (a retraining), in order."""
    from influence_bench.groundtruth import engine

    calls = []
    real = engine.compute
    monkeypatch.setattr(engine, "compute", lambda c, rem, **kw: calls.append([int(i) for i in rem]) or real(c, rem, **kw))
    return calls
