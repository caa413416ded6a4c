"""On-disk ground truth you can trust: content-addressed, checksummed, atomic, locked, incremental.

Layout: ``<root>/<setting id>/<mode>-<kind>-<key>/`` where ``key`` hashes (setting spec hash,
ground-truth config, data fingerprint, engine version), so anything that changes the numbers
changes the folder. Inside, ``manifest.json`` (what the key hashes) and shards
``shard-*.npz``: each holds rows ``ids`` (removed index for ``loo``, subset number for ``lds``),
``delta [k, n_test_all]``, ``grad_norm``, ``steps``, ``converged`` (int8 1 / 0; shards written
before it lack it and load as unknown, -1) and a ``meta`` JSON string with the sha256
of every array, verified on load. A build writes one shard per chunk of models (temp file +
rename), so a killed build loses at most the chunk in flight. An unreadable, truncated or
mismatching shard is reported (a warning naming its path), renamed ``*.corrupt`` and its rows
are recomputed. Two locks: ``build.lock`` (held for a whole build: no duplicated work) and
``write.lock`` (short: reading, writing and compacting shards). No pickle anywhere.

Shipped layer: ``GroundTruthStore.shipped`` (default the checkout's ``results/ground-truth``,
``$INFLUENCE_BENCH_SHIPPED_GT`` to move it, set empty to disable) has the same layout and is
verified the same way, but is only read: a corrupt shipped shard is reported and ignored, never
renamed. Shipped shards hold only the evaluated test columns (a ``cols`` array), so they serve
``load_for(key, cols)`` only when they hold every column asked for (``groundtruth/shipped.py``).
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from influence_bench.groundtruth.entries import ARRAYS, OPTIONAL, Entries, MissingColumns  # noqa: F401  (re-exported)
from influence_bench.hashing import hash_json, sha256_array  # noqa: F401  (re-exported)
from influence_bench.paths import UnreadableFile, cache_dir, read_npz, shipped_gt_dir, write_json, write_npz


class CorruptGroundTruth(RuntimeError):
    pass


class CorruptGroundTruthWarning(UserWarning):
    """A stored shard failed verification; it was moved aside and its rows will be recomputed."""


_LOCKS: dict[str, FileLock] = {}


def _lock(path: Path) -> FileLock:
    """One re-entrant lock object per path and process (two objects on one path would deadlock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return _LOCKS.setdefault(str(path.resolve()), FileLock(str(path.resolve())))


@dataclass(frozen=True)
class StoreKey:
    """Where one (setting, mode, kind) lives and everything its content hash covers."""

    setting_id: str
    mode: str
    kind: str  # "loo" or "lds"
    payload: dict  # setting spec hash, ground-truth config, data fingerprint, engine version
    n_test: int

    @property
    def digest(self) -> str:
        return hash_json(self.payload)


_DEFAULT = object()


def key_dir(root: Path, key: StoreKey) -> Path:
    return Path(root) / key.setting_id / f"{key.mode}-{key.kind}-{key.digest[:16]}"


class GroundTruthStore:
    """The user cache (``root``, read-write) over an optional read-only ``shipped`` root with the
    same layout (default ``paths.shipped_gt_dir()``: the checkout's ``results/ground-truth``)."""

    def __init__(self, root: Path | None = None, shipped: Path | None = _DEFAULT):  # type: ignore[assignment]
        self.root = Path(root) if root is not None else cache_dir() / "ground-truth"
        self.shipped = shipped_gt_dir() if shipped is _DEFAULT else (Path(shipped) if shipped is not None else None)

    # ---- places and locks ---------------------------------------------------------------------
    def dir(self, key: StoreKey) -> Path:
        return key_dir(self.root, key)

    def shards(self, key: StoreKey) -> list[Path]:
        return sorted(self.dir(key).glob("shard-*.npz"))

    def build_lock(self, key: StoreKey) -> FileLock:
        return _lock(self.dir(key) / "build.lock")

    def write_lock(self, key: StoreKey) -> FileLock:
        return _lock(self.dir(key) / "write.lock")

    # ---- reading ------------------------------------------------------------------------------
    def load(self, key: StoreKey, cols: np.ndarray | None = None) -> Entries:
        """Every verified row of the cache (at test columns ``cols``, None = all); corrupt shards are
        reported, moved aside and left out. Shards lacking some of ``cols`` are left out."""
        out = Entries.empty(key.n_test, cols)
        if not self.dir(key).is_dir():
            return out
        with self.write_lock(key):
            for p in self.shards(key):
                try:
                    e = self._read_shard(p, key)
                except CorruptGroundTruth as exc:
                    self._quarantine(p, exc)
                    continue
                if e.covers(cols):
                    out = out.merge(e.restrict(cols))
        return out

    def load_shipped(self, key: StoreKey, cols: np.ndarray | None = None) -> Entries:
        """Verified rows of the read-only shipped root that hold every column of ``cols``. Nothing
        there is locked, renamed or written: a corrupt shard is reported and ignored."""
        out = Entries.empty(key.n_test, cols)
        if self.shipped is None or not key_dir(self.shipped, key).is_dir():
            return out
        for p in sorted(key_dir(self.shipped, key).glob("shard-*.npz")):
            try:
                e = self._read_shard(p, key)
            except CorruptGroundTruth as exc:
                warnings.warn(f"{exc}; shipped ground truth is not used, its entries will be recomputed into "
                              f"the cache {self.root}", CorruptGroundTruthWarning, stacklevel=3)
                continue
            if e.covers(cols):
                out = out.merge(e.restrict(cols))
        return out

    def load_for(self, key: StoreKey, cols: np.ndarray | None = None) -> Entries:
        """Rows stored anywhere (shipped root, then the cache, which wins on shared ids) that hold
        the test columns ``cols`` (None: every column, which column-subset shipped shards never do)."""
        return self.load_shipped(key, cols).merge(self.load(key, cols))

    def _read_shard(self, p: Path, key: StoreKey) -> Entries:
        try:
            z = read_npz(p)
            meta = json.loads(str(z["meta"]))
            arrays = {f: z[f] for f in ARRAYS + ("cols",) if f in z or f not in OPTIONAL + ("cols",)}
        except Exception as exc:  # truncated / not an npz / missing keys / bad JSON
            why = exc.why if isinstance(exc, UnreadableFile) else f"{type(exc).__name__}: {exc}"
            raise CorruptGroundTruth(f"ground-truth shard {p} is unreadable ({why})") from exc
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256", {}), dict):
            raise CorruptGroundTruth(f"ground-truth shard {p} is unreadable (its meta is not a record)")
        if meta.get("key") != key.digest:
            raise CorruptGroundTruth(f"ground-truth shard {p} belongs to key {meta.get('key')!r}, not {key.digest!r}")
        for f, a in arrays.items():
            if meta.get("sha256", {}).get(f) != sha256_array(a):
                raise CorruptGroundTruth(f"ground-truth shard {p}: checksum mismatch in array {f!r}")
        if set(meta.get("sha256", {})) != set(arrays):  # e.g. a "cols" array the meta does not vouch for
            raise CorruptGroundTruth(f"ground-truth shard {p}: arrays {sorted(arrays)} do not match its checksums")
        kinds = {"ids": "iu", "delta": "f", "grad_norm": "f", "steps": "iu", "cols": "iu"}
        if any(f in arrays and (arrays[f].dtype.kind not in kinds[f] or arrays[f].ndim != (2 if f == "delta" else 1))
               for f in kinds) or {len(arrays[f]) for f in ("ids", "delta", "grad_norm", "steps")} != {len(arrays["ids"])}:
            raise CorruptGroundTruth(f"ground-truth shard {p}: arrays of the wrong type or shape "
                                     f"({', '.join(f'{f} {a.dtype} {list(a.shape)}' for f, a in arrays.items())})")
        k, cols = len(arrays["ids"]), arrays.get("cols")
        if cols is not None:
            cols = cols.astype(np.int64)
            if cols.ndim != 1 or len(np.unique(cols)) != len(cols) or (len(cols) and (cols.min() < 0 or cols.max() >= key.n_test)):
                raise CorruptGroundTruth(f"ground-truth shard {p}: invalid test columns {cols.tolist()[:10]}")
        width = key.n_test if cols is None else len(cols)
        if arrays["delta"].shape != (k, width) or not np.isfinite(arrays["delta"]).all():
            raise CorruptGroundTruth(f"ground-truth shard {p}: delta has shape {arrays['delta'].shape}, "
                                     f"expected ({k}, {width}), or non-finite values")
        converged = arrays.get("converged")  # absent from shards written before it: unknown
        if converged is not None and (converged.shape != (k,) or not np.isin(converged, (-1, 0, 1)).all()):
            raise CorruptGroundTruth(f"ground-truth shard {p}: invalid convergence flags")
        return Entries(arrays["ids"].astype(np.int64), arrays["delta"], arrays["grad_norm"],
                       arrays["steps"].astype(np.int64), noise_ceiling=float(meta.get("noise_ceiling", 1.0)), cols=cols,
                       converged=converged)

    @staticmethod
    def _quarantine(p: Path, exc: Exception) -> None:
        aside = p.with_name(f"{p.name}.{int(time.time())}.corrupt")
        try:
            os.replace(p, aside)
            where = f"moved to {aside}"
        except OSError:
            where = "could not be moved aside"
        warnings.warn(f"{exc}; {where}; its entries will be recomputed", CorruptGroundTruthWarning, stacklevel=3)

    # ---- writing ------------------------------------------------------------------------------
    @staticmethod
    def shard_payload(key: StoreKey, entries: Entries, ceiling_method: str = "deterministic") -> tuple[dict, dict]:
        """(arrays, meta) of one shard: float64 ``delta``, a ``cols`` array for column-subset entries,
        and the sha256 of every array in ``meta``."""
        arrays = {"ids": np.asarray(entries.ids, np.int64), "delta": np.asarray(entries.delta, np.float64),
                  "grad_norm": np.asarray(entries.grad_norm, np.float64), "steps": np.asarray(entries.steps, np.int64),
                  "converged": np.asarray(entries.converged, np.int8)}
        if entries.cols is not None:
            arrays["cols"] = np.asarray(entries.cols, np.int64)
        meta = {"key": key.digest, "kind": key.kind, "mode": key.mode, "n_test": key.n_test,
                "noise_ceiling": float(entries.noise_ceiling), "ceiling_method": ceiling_method,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "sha256": {f: sha256_array(a) for f, a in arrays.items()}}
        if entries.cols is not None:
            meta["cols"] = arrays["cols"].tolist()  # for people reading the shard; "cols" array is what counts
        return arrays, meta

    @staticmethod
    def manifest(key: StoreKey) -> dict:
        return {"setting": key.setting_id, "mode": key.mode, "kind": key.kind, "key": key.digest, **key.payload}

    def save_chunk(self, key: StoreKey, entries: Entries, ceiling_method: str = "deterministic") -> Path:
        """Write ``entries`` as a new shard (atomically, under the write lock)."""
        arrays, meta = self.shard_payload(key, entries, ceiling_method)
        first = int(arrays["ids"][0]) if len(arrays["ids"]) else -1
        path = self.dir(key) / f"shard-{time.time_ns():020d}-{first:08d}-{uuid.uuid4().hex[:8]}.npz"
        with self.write_lock(key):
            manifest = self.dir(key) / "manifest.json"
            if not manifest.is_file():
                write_json(manifest, self.manifest(key))
            write_npz(path, meta=np.array(json.dumps(meta)), **arrays)
        return path

    def compact(self, key: StoreKey) -> None:
        """Merge all shards into one (new shard first, then the old ones go: a crash keeps both)."""
        with self.write_lock(key):
            for orphan in self.dir(key).glob(".shard-*.tmp"):  # writes happen under this lock: a
                orphan.unlink(missing_ok=True)  # temp file seen now is left by a killed writer
            old = self.shards(key)
            if len(old) <= 1:
                return
            entries = self.load(key)  # re-entrant lock; quarantines corrupt shards
            old = [p for p in old if p.exists()]
            if len(entries.ids):
                order = np.argsort(entries.ids, kind="stable")
                self.save_chunk(key, entries.select(entries.ids[order]))
            for p in old:
                p.unlink(missing_ok=True)

    def info(self, key: StoreKey) -> dict:
        e = self.load(key)
        shards = self.shards(key)
        return {"path": str(self.dir(key)), "kind": key.kind, "mode": key.mode, "key": key.digest[:16],
                "entries": int(len(e.ids)), "shards": len(shards),
                "bytes": int(sum(p.stat().st_size for p in shards)), "noise_ceiling": e.noise_ceiling,
                "max_grad_norm": float(e.grad_norm.max()) if len(e.ids) else None,
                "unconverged": int(e.unconverged.sum()), "convergence_unknown": int((e.converged == -1).sum())}
