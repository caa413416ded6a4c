"""The per-process cache of contexts (``loading.get_context``): one build per setting while the
tensors fit ``CONTEXT_BYTES``, least recently used dropped first beyond it, the newest always kept."""

from dataclasses import dataclass, field

import pytest
import torch

from influence_bench.api import loading
from influence_bench.spec import catalog

IDS = ["iris-logreg-wd1e-3", "iris-mlp-d1-w16-wd1e-3", "iris-mlp-d2-w16-wd1e-3"]
MB = 2 ** 20


@dataclass
class FakeContext:
    x: torch.Tensor
    _cache: dict = field(default_factory=dict)


@pytest.fixture
def builds(monkeypatch):
    """The setting ids built, in order; every context holds 1 MiB of data, and its cache what a test puts there."""
    built = []
    monkeypatch.setattr(loading.data_mod, "load", lambda spec: None)

    def build(setting, ds, device):
        built.append(setting.id)
        return FakeContext(torch.zeros(MB // 8, dtype=torch.float64))

    monkeypatch.setattr(loading, "build_context", build)
    loading.forget_contexts()
    yield built
    loading.forget_contexts()


def get(sid):
    return loading.get_context(catalog.get_setting(sid))


def test_a_setting_is_built_once_while_the_contexts_fit(builds):
    first = [get(s) for s in IDS]
    again = [get(s) for s in IDS for _ in range(3)]
    assert builds == IDS
    assert all(a is first[i // 3] for i, a in enumerate(again))
    loading.forget_contexts()
    get(IDS[0])
    assert builds == IDS + IDS[:1]


def test_the_least_recently_used_goes_first_and_the_newest_stays(builds, monkeypatch):
    monkeypatch.setattr(loading, "CONTEXT_BYTES", 2 * MB)  # two contexts of 1 MiB fit
    a = get(IDS[0])
    get(IDS[1])
    assert get(IDS[0]) is a  # the first is now the most recent: the third context drops the second
    get(IDS[2])
    assert builds == IDS
    assert get(IDS[0]) is a
    get(IDS[1])
    assert builds == IDS + IDS[1:2]
    # what a context's cache holds counts: one grown past the budget stays alone, as the newest
    get(IDS[1])._cache["gt-precond"] = torch.zeros(3 * MB // 8, dtype=torch.float64)
    get(IDS[1])
    assert list(k[0].id for k in loading._CONTEXTS) == IDS[1:2]
    monkeypatch.setattr(loading, "CONTEXT_BYTES", 0)
    get(IDS[2])
    assert list(k[0].id for k in loading._CONTEXTS) == IDS[2:3]


def test_bytes_count_each_storage_once():
    t = torch.zeros(1000, dtype=torch.float64)
    ctx = FakeContext(t, {"view": t[10:], "pair": (t, torch.zeros(10)), "array": t.numpy()[:0]})
    assert loading._nbytes(ctx) == 8000 + 40
