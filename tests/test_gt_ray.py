"""The Ray executor (optional extra ``distributed``) gives the local executor's ground truth."""

import numpy as np
import pytest

from influence_bench.api.loading import get_context
from influence_bench.groundtruth import GroundTruthStore, build, store_key
from influence_bench.spec import catalog

pytestmark = pytest.mark.slow


def test_ray_executor_equals_local_executor(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray not installed: pip install -e '.[distributed]' (CI installs it)")
    ctx = get_context(catalog.get_setting("iris-logreg-wd1e-3"))
    ids = np.arange(24)
    local = build(ctx, "loo", ids, GroundTruthStore(tmp_path / "local"), chunk=8)
    seen = []
    store = GroundTruthStore(tmp_path / "ray")
    try:
        remote = build(ctx, "loo", ids, store, chunk=8, executor="ray", workers=2, on_chunk=seen.append)
    finally:
        ray.shutdown()
    assert sorted(int(i) for part in seen for i in part) == list(range(24))  # progress saw every chunk
    np.testing.assert_allclose(remote.delta, local.delta, rtol=0, atol=1e-12)  # measured: bit-identical
    assert len(store.shards(store_key(ctx))) == 1 and np.abs(local.delta).max() > 1e-3


def test_unknown_executor_is_a_clear_error(tmp_path):
    ctx = get_context(catalog.get_setting("iris-logreg-wd1e-3"))
    with pytest.raises(ValueError, match="unknown executor 'dask'; known: local, ray"):
        build(ctx, "loo", np.arange(2), GroundTruthStore(tmp_path), executor="dask")
