"""Ground truth shipped with the checkout (``results/ground-truth``) so the smoke tier needs no retraining.

A shipped folder has the store's layout and content-addressed key folders; it holds one shard,
``shard-shipped.npz``, with only the setting's evaluated test columns (``ctx.test_idx``, recorded
in the shard as a checksummed ``cols`` array): a full row spans every test-set point (1000 on
MNIST) and would make the repository tens of MB. ``GroundTruthStore`` reads it read-only; any
request for other columns, or for every column, is computed into the cache instead.

``export`` is the only writer: it builds (reusing the cache and anything already shipped) and
writes the compacted shard; ``check`` verifies what is shipped and recomputes a sample of it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..context import Context
from ..paths import write_json, write_npz
from . import engine
from .build import ChunkHook, build, ceiling_method, compute, replicate_keys
from .entries import Entries
from .store import CorruptGroundTruth, GroundTruthStore, key_dir

SHARD = "shard-shipped.npz"


def export(ctx: Context, ids: np.ndarray, cache: GroundTruthStore, out: Path, chunk: int = 32,
           on_chunk: ChunkHook | None = None) -> tuple[Path, Entries, list[Path]]:
    """Ship leave-one-out ground truth of ``ids`` (plus the ids already shipped under the same key and
    columns) for ``ctx.test_idx`` into ``out``: one folder per replicate key (one for deterministic
    recipes). Returns (the first replicate's shard path, the entries as scored, i.e. the replicates'
    mean with their noise ceiling, stale key folders of this setting that were removed)."""
    out = Path(out)
    keys, cols = replicate_keys(ctx, "loo"), np.asarray(ctx.test_idx, np.int64)
    store = GroundTruthStore(cache.root, shipped=out)  # what is shipped already counts as stored
    ids = np.union1d(np.asarray(ids, np.int64), store.load_shipped(keys[0], cols).ids)
    combined = build(ctx, "loo", ids, store, chunk=chunk, on_chunk=on_chunk, cols=cols)
    dirs = []
    for key in keys:
        entries = store.load_for(key, cols).select(ids)
        d = key_dir(out, key)
        arrays, meta = GroundTruthStore.shard_payload(key, entries, ceiling_method(ctx))
        write_json(d / "manifest.json", GroundTruthStore.manifest(key))
        write_npz(d / SHARD, meta=np.array(json.dumps(meta)), **arrays)
        for p in (d / "manifest.json", d / SHARD):  # committed files: readable by everyone
            os.chmod(p, 0o644)
        for p in d.glob("shard-*.npz"):
            if p.name != SHARD:
                p.unlink()
        dirs.append(d)
    key = keys[0]
    stale = [p for p in (out / key.setting_id).glob(f"{key.mode}-{key.kind}-*") if p.is_dir() and p not in dirs]
    for p in stale:
        shutil.rmtree(p)
    return dirs[0] / SHARD, combined, stale


def check(ctx: Context, root: Path, sample: int = 3, tol: float | None = None, seed: int = 0) -> tuple[bool, list[str]]:
    """Is the shipped loo ground truth of ``ctx`` usable as is? For every replicate key: every shard
    verifies, it lies under the current key, holds ``ctx.test_idx``, and ``sample`` recomputed entries
    match within ``tol`` (max deviation relative to max |delta|; default ``default_tol(ctx)``).
    Returns (ok, report lines)."""
    keys, sid = replicate_keys(ctx, "loo"), ctx.setting.id
    tol = default_tol(ctx) if tol is None else tol
    current = [key_dir(root, k) for k in keys]
    stale = sorted(p.name for p in (Path(root) / sid).glob(f"{keys[0].mode}-{keys[0].kind}-*") if p not in current)
    lines = [f"{sid}: stale key folder {Path(root) / sid / s} (not used; re-export)" for s in stale]
    ok = not stale
    for r, key in enumerate(keys):
        good, more = _check_key(ctx, root, key, r, sample, tol, seed)
        ok, lines = ok and good, lines + more
    return ok, lines


# Minibatch retraining is chaotic: rounding differences between machines (a different SIMD kernel,
# another thread count) grow over hundreds of SGD steps, so recomputed stochastic entries are
# compared at a looser tolerance (still far below the differences between replicates, which the
# noise ceiling measures). Newton-CG retraining converges to its tolerance and is compared at 1e-6.
DETERMINISTIC_TOL = 1e-6
STOCHASTIC_TOL = 1e-2


def default_tol(ctx: Context) -> float:
    return STOCHASTIC_TOL if engine.stochastic(ctx) else DETERMINISTIC_TOL


def _check_key(ctx: Context, root: Path, key, replicate: int, sample: int, tol: float, seed: int
               ) -> tuple[bool, list[str]]:
    cols, sid = np.asarray(ctx.test_idx, np.int64), ctx.setting.id
    label = f"{sid}" + (f" (replicate {replicate})" if engine.stochastic(ctx) else "")
    d = key_dir(root, key)
    shards = sorted(d.glob("shard-*.npz"))
    if not shards:
        return False, [f"{label}: nothing shipped under the current key ({d})"]
    reader = GroundTruthStore(root, shipped=None)
    ok, entries, lines = True, None, []
    for p in shards:
        try:
            e = reader._read_shard(p, key)
        except CorruptGroundTruth as exc:
            ok = False
            lines.append(f"{label}: {exc}")
            continue
        if entries is not None and not entries.same_cols(e):
            ok = False
            lines.append(f"{label}: shard {p} holds other test columns than the first shard (re-export)")
            continue
        entries = e if entries is None else entries.merge(e)
    if entries is None:
        return False, lines
    if not entries.covers(cols):
        return False, lines + [f"{label}: shipped columns {entries.cols.tolist()} do not hold the evaluated test "
                               f"points {cols.tolist()} (theta* or the test-point policy changed; re-export)"]
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(entries.ids, size=min(sample, len(entries.ids)), replace=False))
    fresh = compute(ctx, "loo", ids, replicate=replicate).lookup(ids, cols)
    old = entries.lookup(ids, cols)
    rel = float(np.abs(fresh - old).max(initial=0.0) / max(np.abs(old).max(initial=0.0), 1e-300))
    good = rel <= tol
    lines.append(f"{label}: {len(entries.ids)} entries x {len(entries.cols)} test columns in {len(shards)} shard(s), "
                 f"{sum(p.stat().st_size for p in shards)} bytes; recomputed {len(ids)}: max deviation relative "
                 f"to max |delta| {rel:.2e} (tolerance {tol:g}): {'OK' if good else 'MISMATCH'}")
    return ok and good, lines
