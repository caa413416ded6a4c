"""Building ground truth into the store: only what is missing, one shard per chunk of models.

``build(ctx, kind, ids)`` holds the key's build lock (a second process waits, then finds the work
done), computes the missing ids in chunks and saves each chunk as soon as it is done, so a build
killed at any moment and restarted recomputes nothing already stored. ``executor="ray"`` hands
the chunks to Ray tasks (``ray_executor``) that write their own shards.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from influence_bench import progress, tally
from influence_bench.api.context import Context
from influence_bench.groundtruth import engine, lds
from influence_bench.groundtruth.compute import combine, compute  # noqa: F401
from influence_bench.groundtruth.keys import KINDS, ceiling_method, data_fingerprint, replicate_keys, store_key  # noqa: F401
from influence_bench.groundtruth.store import Entries, GroundTruthStore

ChunkHook = Callable[[np.ndarray], None]  # called with the ids of every chunk once it is saved


def valid_ids(ctx: Context, kind: str, ids: np.ndarray, lds_spec: lds.LdsSpec = lds.DEFAULT) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    hi = ctx.n_train if kind == "loo" else lds_spec.n_subsets
    what = "removed indices" if kind == "loo" else "LDS subset numbers"
    if ids.size and (ids.min() < 0 or ids.max() >= hi):
        raise IndexError(f"setting {ctx.setting.id!r}: {what} must lie in [0, {hi})")
    return ids


def valid_cols(ctx: Context, cols: np.ndarray | None) -> np.ndarray | None:
    if cols is None:
        return None
    cols = np.asarray(cols, dtype=np.int64)
    n = int(ctx.data.x_test.shape[0])
    if cols.ndim != 1 or (cols.size and (cols.min() < 0 or cols.max() >= n)):
        raise IndexError(f"setting {ctx.setting.id!r}: test columns must be a 1-d array in [0, {n})")
    return cols


def build(ctx: Context, kind: str, ids: np.ndarray, store: GroundTruthStore | None = None, chunk: int = 32,
          lds_spec: lds.LdsSpec = lds.DEFAULT, executor: str = "local", workers: int = 2,
          ray_address: str | None = None, on_chunk: ChunkHook | None = None,
          cols: np.ndarray | None = None) -> Entries:
    """Make sure the store holds ``ids`` of ``kind`` at test columns ``cols`` (None: every test
    column); returns their entries (in the order asked, ``delta`` holding ``cols`` in that order).
    Entries of the shipped root count as stored when they hold all of ``cols``; what is missing is
    computed (every column) into the cache."""
    if executor not in ("local", "ray"):
        raise ValueError(f"unknown executor {executor!r}; known: local, ray")
    if ctx.poisoned:  # an estimator edited its data or cached arrays in place (scoring/isolation.py)
        raise RuntimeError(f"setting {ctx.setting.id!r}: refusing to build ground truth from a context that was "
                           f"edited in place ({ctx.poisoned}); rebuild it with loading.get_context")
    engine.check_recipe(ctx)
    store = store or GroundTruthStore()
    ids = valid_ids(ctx, kind, ids, lds_spec)
    cols = valid_cols(ctx, cols)
    reps = [_build_replicate(ctx, kind, ids, store, chunk, lds_spec, executor, workers, ray_address, on_chunk,
                             cols, r) for r in range(engine.n_replicates(ctx))]
    out = combine(reps)
    if engine.stochastic(ctx) and len(reps) == 1:
        out.noise_ceiling = float("nan")  # one replicate of a stochastic recipe: its noise is unmeasured
    return out


def _build_replicate(ctx: Context, kind: str, ids: np.ndarray, store: GroundTruthStore, chunk: int,
                     lds_spec: lds.LdsSpec, executor: str, workers: int, ray_address: str | None,
                     on_chunk: ChunkHook | None, cols: np.ndarray | None, replicate: int) -> Entries:
    key = store_key(ctx, kind, lds_spec, replicate)
    entries = store.load_for(key, cols)
    if np.setdiff1d(ids, entries.ids).size:
        with store.build_lock(key):
            entries = store.load_for(key, cols)  # another process may have added some meanwhile
            missing = np.setdiff1d(ids, entries.ids)
            chunks = [missing[s:s + chunk] for s in range(0, len(missing), chunk)]
            if chunks and executor == "ray":
                from influence_bench.groundtruth import ray_executor

                ray_executor.run(ctx.setting, kind, chunks, store, lds_spec, key.digest, workers, ray_address,
                                 ctx.device.type, on_chunk, replicate)
                tally.add(tally.COMPUTED, ctx.setting.id, len(missing))
            elif chunks:
                done = 0
                progress.advance("ground truth", 0, len(missing))
                for part in chunks:
                    store.save_chunk(key, compute(ctx, kind, part, lds_spec, replicate), ceiling_method(ctx))
                    done += len(part)
                    progress.advance("ground truth", done, len(missing))
                    tally.add(tally.COMPUTED, ctx.setting.id, len(part))
                    if on_chunk is not None:
                        on_chunk(part)
            if chunks:
                store.compact(key)
            entries = store.load_for(key, cols)
    missing = np.setdiff1d(ids, entries.ids)
    if missing.size:  # only if a shard was corrupted between the build and this read
        raise RuntimeError(f"ground truth for {ctx.setting.id!r} ({kind}) still lacks ids {missing[:10].tolist()}")
    return entries.select(ids)


def ground_truth(ctx: Context, removed: np.ndarray, store: GroundTruthStore | None = None,
                 cols: np.ndarray | None = None, **kw) -> np.ndarray:
    """``[len(removed), len(cols)]`` changes in the loss of test-set points ``cols`` (None: all,
    ``[len(removed), n_test_all]``) when each index is removed (the mean over replicates; ``build``
    returns them with their noise ceiling)."""
    return build(ctx, "loo", removed, store, cols=cols, **kw).delta


def lds_ground_truth(ctx: Context, store: GroundTruthStore | None = None,
                     spec: lds.LdsSpec = lds.DEFAULT, cols: np.ndarray | None = None, **kw) -> np.ndarray:
    """``[M, len(cols)]`` (None: ``[M, n_test_all]``) test-loss change of every subset model."""
    return build(ctx, "lds", np.arange(spec.n_subsets), store, lds_spec=spec, cols=cols, **kw).delta
