"""On-disk ground truth you can trust: content-addressed, checksummed, atomic, locked, incremental.

Layout: ``<root>/<setting id>/<mode>-<kind>-<key>/`` where ``key`` hashes (setting spec hash,
ground-truth config, data fingerprint, engine version), so anything that changes the numbers
changes the folder. Inside, ``manifest.json`` (what the key hashes) and shards
``shard-*.npz``: each holds rows ``ids`` (removed index for ``loo``, subset number for ``lds``),
``delta [k, n_test_all]``, ``grad_norm``, ``steps`` and a ``meta`` JSON string with the sha256
of every array, verified on load. A build writes one shard per chunk of models (temp file +
rename), so a killed build loses at most the chunk in flight. An unreadable, truncated or
mismatching shard is reported (a warning naming its path), renamed ``*.corrupt`` and its rows
are recomputed. Two locks: ``build.lock`` (held for a whole build: no duplicated work) and
``write.lock`` (short: reading, writing and compacting shards). No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from ..paths import cache_dir, read_npz, write_json, write_npz

ARRAYS = ("ids", "delta", "grad_norm", "steps")


class CorruptGroundTruth(RuntimeError):
    pass


class CorruptGroundTruthWarning(UserWarning):
    """A stored shard failed verification; it was moved aside and its rows will be recomputed."""


def sha256_array(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


_LOCKS: dict[str, FileLock] = {}


def _lock(path: Path) -> FileLock:
    """One re-entrant lock object per path and process (two objects on one path would deadlock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return _LOCKS.setdefault(str(path.resolve()), FileLock(str(path.resolve())))


@dataclass
class Entries:
    ids: np.ndarray  # [k] removed training index (loo) or subset number (lds)
    delta: np.ndarray  # [k, n_test_all] L(z; theta_-S) - L(z; theta_control)
    grad_norm: np.ndarray  # [k] final gradient norm of each retrained model
    steps: np.ndarray  # [k]
    noise_ceiling: float = 1.0

    @property
    def removed(self) -> np.ndarray:  # the LOO name of ``ids``
        return self.ids

    @classmethod
    def empty(cls, n_test: int) -> "Entries":
        return cls(np.zeros(0, np.int64), np.zeros((0, n_test)), np.zeros(0), np.zeros(0, np.int64))

    def merge(self, other: "Entries") -> "Entries":
        keep = ~np.isin(self.ids, other.ids)
        return Entries(*(np.concatenate([getattr(self, f)[keep], getattr(other, f)]) for f in ARRAYS),
                       noise_ceiling=min(self.noise_ceiling, other.noise_ceiling))

    def select(self, ids: np.ndarray) -> "Entries":
        pos = {int(r): k for k, r in enumerate(self.ids)}
        rows = [pos[int(r)] for r in ids]
        return Entries(*(getattr(self, f)[rows] for f in ARRAYS), noise_ceiling=self.noise_ceiling)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        return self.select(ids).delta


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


class GroundTruthStore:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "ground-truth"

    # ---- places and locks ---------------------------------------------------------------------
    def dir(self, key: StoreKey) -> Path:
        return self.root / key.setting_id / f"{key.mode}-{key.kind}-{key.digest[:16]}"

    def shards(self, key: StoreKey) -> list[Path]:
        return sorted(self.dir(key).glob("shard-*.npz"))

    def build_lock(self, key: StoreKey) -> FileLock:
        return _lock(self.dir(key) / "build.lock")

    def write_lock(self, key: StoreKey) -> FileLock:
        return _lock(self.dir(key) / "write.lock")

    # ---- reading ------------------------------------------------------------------------------
    def load(self, key: StoreKey) -> Entries:
        """Every verified row; corrupt shards are reported, moved aside and left out."""
        out = Entries.empty(key.n_test)
        if not self.dir(key).is_dir():
            return out
        with self.write_lock(key):
            for p in self.shards(key):
                try:
                    out = out.merge(self._read_shard(p, key))
                except CorruptGroundTruth as exc:
                    self._quarantine(p, exc)
        return out

    def _read_shard(self, p: Path, key: StoreKey) -> Entries:
        try:
            z = read_npz(p)
            meta = json.loads(str(z["meta"]))
            arrays = {f: z[f] for f in ARRAYS}
        except Exception as exc:  # truncated / not an npz / missing keys / bad JSON
            raise CorruptGroundTruth(f"ground-truth shard {p} is unreadable ({type(exc).__name__}: {exc})") from exc
        if meta.get("key") != key.digest:
            raise CorruptGroundTruth(f"ground-truth shard {p} belongs to key {meta.get('key')!r}, not {key.digest!r}")
        for f, a in arrays.items():
            if meta.get("sha256", {}).get(f) != sha256_array(a):
                raise CorruptGroundTruth(f"ground-truth shard {p}: checksum mismatch in array {f!r}")
        k = len(arrays["ids"])
        if arrays["delta"].shape != (k, key.n_test) or not np.isfinite(arrays["delta"]).all():
            raise CorruptGroundTruth(f"ground-truth shard {p}: delta has shape {arrays['delta'].shape}, "
                                     f"expected ({k}, {key.n_test}), or non-finite values")
        return Entries(arrays["ids"].astype(np.int64), arrays["delta"], arrays["grad_norm"],
                       arrays["steps"].astype(np.int64), noise_ceiling=float(meta.get("noise_ceiling", 1.0)))

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
    def save_chunk(self, key: StoreKey, entries: Entries, ceiling_method: str = "deterministic") -> Path:
        """Write ``entries`` as a new shard (atomically, under the write lock)."""
        arrays = {"ids": np.asarray(entries.ids, np.int64), "delta": np.asarray(entries.delta, np.float64),
                  "grad_norm": np.asarray(entries.grad_norm, np.float64), "steps": np.asarray(entries.steps, np.int64)}
        meta = {"key": key.digest, "kind": key.kind, "mode": key.mode, "n_test": key.n_test,
                "noise_ceiling": float(entries.noise_ceiling), "ceiling_method": ceiling_method,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "sha256": {f: sha256_array(a) for f, a in arrays.items()}}
        first = int(arrays["ids"][0]) if len(arrays["ids"]) else -1
        path = self.dir(key) / f"shard-{time.time_ns():020d}-{first:08d}-{uuid.uuid4().hex[:8]}.npz"
        with self.write_lock(key):
            manifest = self.dir(key) / "manifest.json"
            if not manifest.is_file():
                write_json(manifest, {"setting": key.setting_id, "mode": key.mode, "kind": key.kind,
                                      "key": key.digest, **key.payload})
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
                "max_grad_norm": float(e.grad_norm.max()) if len(e.ids) else None}
