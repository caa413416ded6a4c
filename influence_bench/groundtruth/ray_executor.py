"""Retraining chunks as Ray tasks (``pip install -e '.[distributed]'``).

Each task rebuilds the setting's context on its worker (theta* comes from the model cache, or is
retrained deterministically), checks that its store key, which hashes the data and engine
version, is the driver's, retrains its chunk and writes it as a shard into the same store under
the store's write lock. The driver holds the build lock meanwhile. The store root and
``$INFLUENCE_BENCH_CACHE`` must therefore be on a filesystem every node sees (NFS, Lustre, ...).
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from influence_bench.groundtruth import lds
from influence_bench.groundtruth.store import GroundTruthStore
from influence_bench.spec.settings import Setting


class RayUnavailable(RuntimeError):
    pass


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable("--executor ray needs Ray: pip install -e '.[distributed]' (or pip install ray)") from exc
    return ray


def _chunk_task(setting: Setting, kind: str, ids: np.ndarray, root: str, lds_spec: lds.LdsSpec, digest: str,
                device: str, replicate: int = 0) -> list[int]:
    from influence_bench.api.loading import get_context
    from influence_bench.groundtruth.compute import compute
    from influence_bench.groundtruth.keys import ceiling_method, store_key

    ctx = get_context(setting, device)
    key = store_key(ctx, kind, lds_spec, replicate)
    if key.digest != digest:
        raise RuntimeError(f"Ray worker on {os.uname().nodename} computes store key {key.digest[:16]} for "
                           f"{setting.id!r} ({kind}), the driver {digest[:16]}: different data or code version")
    GroundTruthStore(root).save_chunk(key, compute(ctx, kind, ids, lds_spec, replicate), ceiling_method(ctx))
    return [int(i) for i in ids]


def run(setting: Setting, kind: str, chunks: list[np.ndarray], store: GroundTruthStore, lds_spec: lds.LdsSpec,
        digest: str, workers: int = 2, address: str | None = None, device: str = "cpu",
        on_chunk: Callable[[np.ndarray], None] | None = None, replicate: int = 0) -> None:
    """Run every chunk as a Ray task; ``on_chunk`` is called (in the driver) as each one is saved."""
    ray = _import_ray()
    if not ray.is_initialized():
        env = {k: v for k, v in os.environ.items() if k.startswith("INFLUENCE_BENCH_") or k == "PYTHONPATH"}
        kw = {"address": address} if address else {"num_cpus": workers}
        ray.init(runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False, **kw)
    task = ray.remote(num_cpus=1, max_retries=2)(_chunk_task)
    pending = {task.remote(setting, kind, c, str(store.root), lds_spec, digest, device, replicate): c for c in chunks}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            ray.get(ref)  # re-raises a task's error here
            ids = pending.pop(ref)
            if on_chunk is not None:
                on_chunk(ids)
