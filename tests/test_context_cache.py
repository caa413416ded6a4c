"""The per-process caches of ``loading.get_context``: contexts (one build per setting while the
tensors fit ``CONTEXT_BYTES``, least recently used dropped first beyond it, the newest always kept)
and the datasets read from ``.npz`` files (one read per data spec and file)."""

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


def test_a_dataset_is_read_once_per_spec_and_file_and_again_when_the_file_changes(tmp_path, monkeypatch):
    """The MNIST CNN settings with and without weight decay share their data spec: one read. A new
    file (or forget_contexts) reads it again; without an .npz every load reads."""
    reads = []
    monkeypatch.setattr(loading.data_mod, "load", lambda spec: reads.append(spec.name) or object())
    monkeypatch.setenv("INFLUENCE_BENCH_DATA", str(tmp_path))
    loading.forget_contexts()
    a, b = (catalog.get_setting(s).data for s in ("mnist5k-cnn-wd0", "mnist5k-cnn-wd1e-3"))
    assert a == b
    (tmp_path / "mnist.npz").write_bytes(b"one")
    first = loading._load_data(a)
    assert loading._load_data(b) is first and reads == ["mnist"]
    (tmp_path / "mnist.npz").write_bytes(b"other")  # another size: another file
    assert loading._load_data(a) is not first and reads == ["mnist"] * 2
    loading.forget_contexts()
    loading._load_data(a)
    assert reads == ["mnist"] * 3
    (tmp_path / "mnist.npz").unlink()
    loading._load_data(a), loading._load_data(a)
    assert reads == ["mnist"] * 5
    loading.forget_contexts()
