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
import torch

from influence_bench.api.context import Context
from influence_bench.groundtruth import engine
from influence_bench.groundtruth.builder import ChunkHook, build, ceiling_method, compute, replicate_keys
from influence_bench.groundtruth.entries import UNCONVERGED, UNKNOWN, Entries
from influence_bench.groundtruth.store import CorruptGroundTruth, GroundTruthStore, key_dir
from influence_bench.paths import write_json, write_npz

SHARD = "shard-shipped.npz"


def export(ctx: Context, ids: np.ndarray, cache: GroundTruthStore, out: Path, chunk: int = 32,
           on_chunk: ChunkHook | None = None, info: dict | None = None) -> tuple[Path, Entries, list[Path]]:
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
    model = export_model(ctx, out, info)
    key = keys[0]
    stale = [p for p in (out / key.setting_id).glob(f"{key.mode}-{key.kind}-*") if p.is_dir() and p not in dirs]
    stale += [p for p in (out / key.setting_id).glob("model-*") if p.is_file() and p.name.split(".")[0] != model.stem]
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return dirs[0] / SHARD, combined, stale


def export_model(ctx: Context, out: Path, info: dict | None = None) -> Path:
    """Ship theta* of ``ctx`` (with its training checkpoints and, when given, its ``setting_info``
    record, which the caller computes) into ``out``."""
    from influence_bench.training import fit as training
    from influence_bench.training import shipped as shipped_models

    path = training.export_model(ctx.setting, ctx.data, ctx.fm, ctx.theta, ctx.train_grad_norm, ctx.train_steps,
                                 out)
    if info is not None:
        shipped_models.write_info(ctx.setting, out, ctx.theta_sha256, info)
    return path


def check(ctx: Context, root: Path, sample: int = 3, tol: float | None = None, seed: int = 0,
          compare_training: bool = False) -> tuple[bool, list[str]]:
    """Is the shipped loo ground truth of ``ctx`` usable as is? ``ctx`` must hold the shipped theta*
    (the model the ground truth was computed from). For every replicate key: every shard verifies,
    it lies under the current key, holds ``ctx.test_idx``, and its share (``share``) of ``sample``
    recomputed entries matches within ``tol`` (max deviation relative to max |delta|; default
    ``default_tol``: 1e-6 for deterministic recipes, a fraction of the replicates' own disagreement
    on the whole sample for stochastic ones).
    ``compare_training`` also trains theta* here and reports, without failing, how far it lies
    from the shipped one. Returns (ok, report lines)."""
    keys, sid = replicate_keys(ctx, "loo"), ctx.setting.id
    ok, lines = _check_model(ctx, root)
    current = [key_dir(root, k) for k in keys]
    stale = sorted(p.name for p in (Path(root) / sid).glob(f"{keys[0].mode}-{keys[0].kind}-*") if p not in current)
    lines += [f"{sid}: stale key folder {Path(root) / sid / s} (not used; re-export)" for s in stale]
    ok = ok and not stale
    loaded = []
    for r, key in enumerate(keys):
        good, entries, more = _read_key(ctx, root, key, r)
        ok, lines = ok and good, lines + more
        loaded.append(entries)
    if all(e is not None for e in loaded):
        rng = np.random.default_rng(seed)
        # rows whose retraining did not converge are never scored, and where they stopped after the
        # whole step budget is not reproducible (rounding steers the last of 100 damped steps): the
        # sample is drawn from the others
        pool = loaded[0].ids if loaded[0].converged is None else loaded[0].ids[loaded[0].converged != UNCONVERGED]
        if len(pool) < len(loaded[0].ids):
            lines.append(f"{ctx.setting.id}: {len(loaded[0].ids) - len(pool)} unconverged entries (never scored) "
                         "left out of the recomputed sample")
        ids = np.sort(rng.choice(pool, size=min(sample, len(pool)), replace=False))
        noise = replicate_noise(loaded, ids, ctx.test_idx)
        for r, entries in enumerate(loaded):
            good, line = _recompute(ctx, entries, share(ids, r, len(loaded)), r,
                                    default_tol(ctx, noise) if tol is None else tol, noise)
            ok = ok and good
            lines.append(line)
    if compare_training:
        lines.append(training_drift(ctx))
    return ok, lines


def share(ids: np.ndarray, replicate: int, replicates: int) -> np.ndarray:
    """The sampled entries replicate ``replicate`` of ``replicates`` recomputes: every
    ``replicates``-th one from its own index on, or one of them (round robin) when the sample is
    smaller than the replicates. Each replicate (its own data order and control model) is checked,
    on other entries than the others; one replicate recomputes the whole sample. Recomputing
    ``k`` entries of a replicate retrains ``k + 1`` models (its control too)."""
    if len(ids) == 0 or replicates <= 1:
        return ids
    if len(ids) < replicates:
        return ids[[replicate % len(ids)]]
    return ids[replicate::replicates]


# Newton-CG retraining converges to its tolerance: recomputed entries must match to 1e-6.
# Minibatch retraining is chaotic: rounding differences between machines (other SIMD kernels)
# grow over hundreds of SGD steps, so a recomputed stochastic entry is held to a fraction of the
# recipe's own noise, the disagreement between its replicates (other data orders) on the same
# entries: a change to the retraining code moves entries by about that much, rounding far less.
DETERMINISTIC_TOL = 1e-6
NOISE_FRACTION = 0.25
STOCHASTIC_TOL = 1e-2  # one replicate of a stochastic recipe: its noise is unmeasured


def default_tol(ctx: Context, noise: float | None = None) -> float:
    if not engine.stochastic(ctx):
        return DETERMINISTIC_TOL
    return STOCHASTIC_TOL if noise is None else NOISE_FRACTION * noise


def replicate_noise(replicates: list[Entries], ids: np.ndarray, cols: np.ndarray) -> float | None:
    """The largest disagreement between replicate 0 and any other on rows ``ids``, relative to
    replicate 0's max |delta| there (the measure ``_recompute`` reports); None for one replicate."""
    if len(replicates) < 2:
        return None
    cols = np.asarray(cols, np.int64)
    first = replicates[0].lookup(ids, cols)
    scale = max(np.abs(first).max(initial=0.0), 1e-300)
    return float(max(np.abs(e.lookup(ids, cols) - first).max(initial=0.0) for e in replicates[1:]) / scale)


def _check_model(ctx: Context, root: Path) -> tuple[bool, list[str]]:
    """The shipped theta* is there, verifies, and is the one ``ctx`` holds."""
    from influence_bench.training import shipped as shipped_models

    sid, path = ctx.setting.id, shipped_models.path_for(ctx.setting, root)
    got = shipped_models.load(ctx.setting, ctx.data_sha256, root)
    if got is None:
        return False, [f"{sid}: no usable shipped theta* at {path} (re-export)"]
    if got[1]["theta_sha256"] != ctx.theta_sha256:
        return False, [f"{sid}: the context holds a theta* ({ctx.theta_source}, sha256 {ctx.theta_sha256[:16]}) "
                       f"other than the shipped one {path} (sha256 {got[1]['theta_sha256'][:16]}); the shipped "
                       "ground truth is checked against the model it was computed from"]
    return True, [f"{sid}: theta* shipped at {path} ({path.stat().st_size} bytes), verified and in use"]


def _read_key(ctx: Context, root: Path, key, replicate: int) -> tuple[bool, Entries | None, list[str]]:
    cols = np.asarray(ctx.test_idx, np.int64)
    label = _label(ctx, replicate)
    d = key_dir(root, key)
    shards = sorted(d.glob("shard-*.npz"))
    if not shards:
        return False, None, [f"{label}: nothing shipped under the current key ({d})"]
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
        return False, None, lines
    if not entries.covers(cols):
        return False, None, lines + [
            f"{label}: shipped columns {entries.cols.tolist()} do not hold the evaluated test points "
            f"{cols.tolist()} (theta* or the test-point policy changed; re-export)"]
    lines.append(f"{label}: {len(entries.ids)} entries x {len(entries.cols)} test columns in {len(shards)} "
                 f"shard(s), {sum(p.stat().st_size for p in shards)} bytes")
    return ok, entries, lines


def _label(ctx: Context, replicate: int) -> str:
    return f"{ctx.setting.id}" + (f" (replicate {replicate})" if engine.stochastic(ctx) else "")


def _recompute(ctx: Context, entries: Entries, ids: np.ndarray, replicate: int, tol: float,
               noise: float | None) -> tuple[bool, str]:
    from influence_bench import tally

    cols = np.asarray(ctx.test_idx, np.int64)
    if len(ids) == 0:
        return False, f"{_label(ctx, replicate)}: no converged entry to recompute: MISMATCH (nothing verified)"
    again = compute(ctx, "loo", ids, replicate=replicate)
    fresh = again.lookup(ids, cols)
    tally.add(tally.VERIFIED, ctx.setting.id, len(ids))
    old = entries.lookup(ids, cols)
    rel = float(np.abs(fresh - old).max(initial=0.0) / max(np.abs(old).max(initial=0.0), 1e-300))
    flags_now, flags_then = again.select(ids).converged, entries.select(ids).converged
    known = (flags_then != UNKNOWN) if flags_then is not None else None  # shards from before the flag
    same_flags = known is None or flags_now is None or np.array_equal(flags_now[known], flags_then[known])
    good = rel <= tol and same_flags
    why = f"{NOISE_FRACTION:g} x the replicates' disagreement {noise:.2e}" if noise is not None \
        and engine.stochastic(ctx) else ""
    return good, (f"{_label(ctx, replicate)}: recomputed {len(ids)} from the shipped theta*: max deviation relative "
                  f"to max |delta| {rel:.2e} (tolerance {tol:.2e}{' = ' + why if why else ''}): "
                  f"{'' if same_flags else 'converged flags differ; '}{'OK' if good else 'MISMATCH'}")


def training_drift(ctx: Context) -> str:
    """How far a theta* trained on this machine lies from the one ``ctx`` holds (the shipped one):
    relative L2 distance, and how many of the evaluated test points it would choose alike. Only a
    report: stochastic recipes are chaotic, so theta* differs between machines in its last bits
    and more; scores use the shipped theta*."""
    from influence_bench import tally
    from influence_bench.api.loading import select_test_points
    from influence_bench.models.flat import FlatModel
    from influence_bench.training import fit as training

    s = ctx.setting
    fm = FlatModel(training.initial_module(s, ctx.data, ctx.dtype, ctx.device))
    tally.add(tally.TRAINED, s.id)
    theta, _, _ = training.fit(fm, fm.flat().to(ctx.device), ctx.data, s)
    dist = float((theta - ctx.theta).norm() / ctx.theta.norm().clamp_min(1e-300))
    with torch.no_grad():
        losses = ctx.loss(theta, ctx.data.x_test, ctx.data.y_test)
    here = select_test_points(losses, s.test_points.n_random, s.test_points.seed)
    same = len(np.intersect1d(here, ctx.test_idx))
    flags = ", ".join(f"{what} {'same' if here[i] == ctx.test_idx[i] else 'differs'}"
                      for i, what in ((0, "highest-loss"), (1, "median-loss")) if len(here) > i)
    return (f"{s.id}: theta* trained on this machine differs from the shipped one by {dist:.2e} (relative L2, "
            f"max |diff| {float((theta - ctx.theta).abs().max()):.2e}); it would evaluate {same}/{len(here)} of "
            f"the same test points ({flags}); informational, scores use the shipped theta*")
