"""Unit tests of the library: small, fast, CPU. Caches go to a per-session temp dir;
the shipped ground truth of the checkout is not read."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("INFLUENCE_BENCH_CACHE", str(tmp_path_factory.mktemp("ib-cache")))
    mp.setenv("INFLUENCE_BENCH_SHIPPED_GT", "")  # no shipped ground truth unless a test asks for it
    yield
    mp.undo()


@pytest.fixture
def counting(monkeypatch):
    """The removal ids of every ``engine.compute`` call (a retraining), in order."""
    from influence_bench.groundtruth import engine

    calls = []
    real = engine.compute
    monkeypatch.setattr(engine, "compute", lambda c, rem, **kw: calls.append([int(i) for i in rem]) or real(c, rem, **kw))
    return calls
