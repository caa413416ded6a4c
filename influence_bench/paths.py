"""Where things live on disk, and the one way this project writes a file (atomically)."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def cache_dir() -> Path:
    """Trained models and ground truth: ``$INFLUENCE_BENCH_CACHE`` or the user cache dir."""
    env = os.environ.get("INFLUENCE_BENCH_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "influence-bench"


def data_dir() -> Path:
    """Dataset root: ``$INFLUENCE_BENCH_DATA`` or ``<cache>/data``."""
    env = os.environ.get("INFLUENCE_BENCH_DATA")
    if env:
        return Path(env).expanduser()
    return cache_dir() / "data"


def portable(source: str) -> str:
    """``source`` with this machine's data root written as ``$INFLUENCE_BENCH_DATA``: what goes
    into records that are committed or compared across machines (run files, the baseline, shipped
    models) names the file, not where one machine keeps it."""
    root = str(data_dir())
    return source.replace(root.rstrip("/") + "/", "$INFLUENCE_BENCH_DATA/").replace(root, "$INFLUENCE_BENCH_DATA")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success.

    A crash (or an exception in the body) never leaves a half-written ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def repo_root() -> Path | None:
    """The checkout this package runs from (``pyproject.toml`` beside the package), else None."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def shipped_gt_dir() -> Path | None:
    """Read-only ground truth shipped with the checkout (``results/ground-truth``), or
    ``$INFLUENCE_BENCH_SHIPPED_GT``; None when that variable is set empty (disabled) or no checkout."""
    env = os.environ.get("INFLUENCE_BENCH_SHIPPED_GT")
    if env is not None:
        return Path(env).expanduser() if env.strip() else None
    root = repo_root()
    return root / "results" / "ground-truth" if root is not None else None
