"""theta* shipped with the checkout beside its ground truth, so a fresh machine scores against
exactly the model the shipped ground truth was computed from, and trains nothing.

Minibatch SGD over hundreds of steps is chaotic: trained on another processor (other SIMD
kernels), theta* differs in its last bits, the highest- and median-loss test points move, and
ground truth computed from one theta* does not describe the other. So the smoke tier ships theta*
(with the checkpoints TracIn and TRAK read) at ``<shipped root>/<setting id>/model-<training
hash>.npz``; ground truth and the cached curvature record are keyed by theta*'s sha256.

A shipped model is used for a setting when its training hash and the sha256 of the setting's data
(as loaded here) match what it was trained from, the setting has no user-supplied initial weights,
every array verifies against its checksum, and (``fit._load_shipped``) theta* has the model's dtype
and size and the training gradient norm recorded with it. Otherwise it is ignored (a damaged or
inconsistent file, or other data, with a warning naming the file) and theta* comes from the model
cache or is trained, as if nothing were shipped. Nothing here is ever written by a run:
``influence-bench ground-truth ship`` is the only writer (``write``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np

from influence_bench.hashing import sha256_array
from influence_bench.models.init_weights import init_weights_sha256
from influence_bench.paths import UnreadableFile, read_json, read_npz, shipped_gt_dir, write_json, write_npz
from influence_bench.spec.settings import Setting

FORMAT = "influence-bench shipped model/1"


class ShippedModelWarning(UserWarning):
    """A shipped theta* exists for the setting but cannot be used here (damaged, or other data)."""


def path_for(setting: Setting, root: Path | None) -> Path | None:
    if root is None:
        return None
    return Path(root) / setting.id / f"model-{setting.training_hash}.npz"


def info_path_for(setting: Setting, root: Path | None) -> Path | None:
    """The shipped curvature record (``setting_info``) of the shipped theta*."""
    p = path_for(setting, root)
    return None if p is None else p.with_suffix(".info.json")


def write(setting: Setting, root: Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write theta* (``arrays["theta"]``) and its checkpoints with a checksum for every array;
    ``meta`` must say which data it was trained on (``data_sha256``)."""
    path = path_for(setting, root)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    full = {"format": FORMAT, "setting": setting.id, "spec_hash": setting.spec_hash,
            "training_hash": setting.training_hash, "theta_sha256": sha256_array(arrays["theta"]),
            **meta, "sha256": {k: sha256_array(v) for k, v in arrays.items()}}
    write_npz(path, meta=np.array(json.dumps(full)), **arrays)
    write_json(path.with_suffix(".json"), {k: v for k, v in full.items() if k != "sha256"})  # for people
    for p in (path, path.with_suffix(".json")):
        os.chmod(p, 0o644)
    return path


def load(setting: Setting, data_sha256: str, root: Path | None = None) -> tuple[dict, dict] | None:
    """(arrays, meta) of the shipped theta* of ``setting`` trained on data ``data_sha256``, or None
    (nothing shipped, user initial weights, other data, or a damaged file: the last two warn)."""
    root = shipped_gt_dir() if root is None else root
    path = path_for(setting, root)
    if path is None or not path.is_file() or init_weights_sha256(setting) is not None:
        return None
    try:
        z = read_npz(path)
        if "meta" not in z or z["meta"].dtype.kind != "U" or z["meta"].shape != ():
            raise ValueError("no meta record")
        meta = json.loads(str(z.pop("meta")))
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict):
            raise ValueError("not a shipped model file")
        sums = meta["sha256"]
        bad = sorted(k for k in set(z) | set(sums) if k not in z or sums.get(k) != sha256_array(z[k]))
        if bad or meta.get("format") != FORMAT or "theta" not in z or z["theta"].ndim != 1:
            raise ValueError(f"checksum mismatch in {bad}" if bad else f"not a shipped model file ({FORMAT})")
        if meta.get("theta_sha256") != sums.get("theta"):
            raise ValueError("theta_sha256 disagrees with the checksum of theta")
    except Exception as exc:  # truncated, not an npz, bad JSON, missing arrays, flipped bits
        why = exc.why if isinstance(exc, UnreadableFile) else f"{type(exc).__name__}: {exc}"
        warnings.warn(f"shipped model {path} is unusable ({why}); "
                      f"training theta* of {setting.id!r} here instead (the shipped file is left as it is)",
                      ShippedModelWarning, stacklevel=3)
        return None
    if meta.get("training_hash") != setting.training_hash or meta.get("setting") != setting.id:
        warnings.warn(f"shipped model {path} describes {meta.get('setting')!r} (training hash "
                      f"{meta.get('training_hash')!r}), not {setting.id!r} ({setting.training_hash}); training "
                      "theta* here instead (the shipped file is left as it is)", ShippedModelWarning, stacklevel=3)
        return None
    if meta.get("data_sha256") != data_sha256:
        warnings.warn(f"shipped model {path} was trained on other data ({meta.get('data_source', '?')}, sha256 "
                      f"{str(meta.get('data_sha256'))[:16]}) than {setting.id!r} has here (sha256 "
                      f"{data_sha256[:16]}); training theta* here instead, so the shipped ground truth "
                      "will not apply", ShippedModelWarning, stacklevel=3)
        return None
    return z, meta


def load_info(setting: Setting, theta_sha256: str, root: Path | None = None) -> dict | None:
    """The shipped ``setting_info`` record when it was computed at this theta*, else None. A damaged
    record (unreadable, not the shape ``write_info`` writes) warns naming its path and is left as it
    is; the caller computes the record instead."""
    root = shipped_gt_dir() if root is None else root
    p = info_path_for(setting, root)
    if p is None or not p.is_file():
        return None
    try:
        d = read_json(p)
        if not isinstance(d, dict) or not isinstance(d.get("theta_sha256"), str) or not isinstance(d.get("info"), dict):
            raise ValueError("not a shipped curvature record (theta_sha256, info)")
    except (OSError, ValueError) as exc:
        warnings.warn(f"shipped curvature record {p} is unusable ({getattr(exc, 'why', exc)}); computing the "
                      f"record of {setting.id!r} here instead (the shipped file is left as it is)",
                      ShippedModelWarning, stacklevel=3)
        return None
    if d["theta_sha256"] != theta_sha256:
        return None
    return d["info"]


def write_info(setting: Setting, root: Path, theta_sha256: str, info: dict) -> Path:
    p = info_path_for(setting, root)
    write_json(p, {"theta_sha256": theta_sha256, "info": info})
    os.chmod(p, 0o644)
    return p
