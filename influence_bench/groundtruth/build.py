"""Building ground truth into the store: only what is missing, one shard per chunk of models.

``build(ctx, kind, ids)`` holds the key's build lock (a second process waits, then finds the work
done), computes the missing ids in chunks and saves each chunk as soon as it is done, so a build
killed at any moment and restarted recomputes nothing already stored. ``executor="ray"`` hands
the chunks to Ray tasks (``ray_executor``) that write their own shards.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .. import metrics, tally
from ..context import Context
from ..init_weights import init_weights_sha256
from ..settings import part_dict
from . import engine, lds
from .store import Entries, GroundTruthStore, StoreKey

KINDS = ("loo", "lds")
ChunkHook = Callable[[np.ndarray], None]  # called with the ids of every chunk once it is saved


def data_fingerprint(ctx: Context) -> str:
    """sha256 of the train and test arrays (dtype, shape and bytes)."""
    return ctx.data_sha256


def store_key(ctx: Context, kind: str = "loo", lds_spec: lds.LdsSpec = lds.DEFAULT, replicate: int = 0) -> StoreKey:
    """The store key of one replicate (stochastic recipes: each replicate seed is its own key;
    deterministic ones have a single replicate and keys without one)."""
    if kind not in KINDS:
        raise ValueError(f"unknown ground-truth kind {kind!r}; known: {', '.join(KINDS)}")
    s = ctx.setting
    config = part_dict("ground_truth", s.ground_truth)
    if kind == "lds":
        config["lds"] = lds_spec.config()
    payload = {"spec_hash": s.spec_hash, "setting_version": s.version, "ground_truth": config,
               "data": data_fingerprint(ctx), "theta": ctx.theta_sha256, "engine": engine.ENGINE_VERSION}
    init = init_weights_sha256(s)
    if init is not None:  # theta* started from the user's weights
        payload["init_weights"] = init
    if s.ground_truth.mode == "pbrf":
        from .pbrf import PBRF_VERSION

        payload["engine"] = PBRF_VERSION
    if engine.stochastic(ctx):
        payload["minibatch_engine"] = engine.MINIBATCH_VERSION
        payload["replicate"] = int(replicate)
    elif replicate:
        raise ValueError(f"setting {s.id!r}: its ground truth is deterministic and has no replicate {replicate}")
    return StoreKey(s.id, s.ground_truth.mode, kind, payload, int(ctx.data.x_test.shape[0]))


def replicate_keys(ctx: Context, kind: str = "loo", lds_spec: lds.LdsSpec = lds.DEFAULT) -> list[StoreKey]:
    return [store_key(ctx, kind, lds_spec, r) for r in range(engine.n_replicates(ctx))]


def ceiling_method(ctx: Context) -> str:
    n = engine.n_replicates(ctx)
    if not engine.stochastic(ctx):
        return engine.CEILING_METHOD
    return f"split-half Spearman-Brown over {n} replicates" if n > 1 else "unknown (one replicate)"


def compute(ctx: Context, kind: str, ids: np.ndarray, lds_spec: lds.LdsSpec = lds.DEFAULT,
            replicate: int = 0) -> Entries:
    """Retrain the models of ``ids`` now (no store), for one replicate."""
    if kind == "loo":
        return engine.compute(ctx, ids, replicate=replicate)
    return lds.compute(ctx, ids, lds_spec, replicate=replicate)


def combine(replicates: list[Entries]) -> Entries:
    """The ground truth of R replicates (same ids and columns): their mean, with the noise ceiling of
    their split-half agreement (Spearman-Brown corrected; NaN for a single replicate)."""
    first = replicates[0]
    if len(replicates) == 1:
        return first
    deltas = np.stack([e.delta for e in replicates])  # [R, m, cols]
    ceiling = metrics.noise_ceiling(deltas.transpose(0, 2, 1)) if len(first.ids) > 2 else float("nan")
    return Entries(first.ids, deltas.mean(0), np.nanmax(np.stack([e.grad_norm for e in replicates]), 0)
                   if np.isfinite(first.grad_norm).any() else first.grad_norm,
                   first.steps, noise_ceiling=ceiling, cols=first.cols)


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
                from . import ray_executor

                ray_executor.run(ctx.setting, kind, chunks, store, lds_spec, key.digest, workers, ray_address,
                                 ctx.device.type, on_chunk, replicate)
                tally.add(tally.COMPUTED, ctx.setting.id, len(missing))
            elif chunks:
                for part in chunks:
                    store.save_chunk(key, compute(ctx, kind, part, lds_spec, replicate), ceiling_method(ctx))
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
