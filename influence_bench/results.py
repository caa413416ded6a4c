"""Run files: one JSON per run (schema_version, machine, commit, cases), written atomically."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Iterable

import torch

from .paths import write_json

SCHEMA_VERSION = 1


def machine_info() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def commit_info(repo: Path | None = None) -> dict:
    repo = repo or Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def new_run_path(results_dir: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return Path(results_dir) / "runs" / f"run-{stamp}.json"


def write_run(path: Path, cases: Iterable, extra: dict | None = None) -> Path:
    doc = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "machine": machine_info(),
        "commit": commit_info(),
        **(extra or {}),
        "cases": [c.to_json() if hasattr(c, "to_json") else c for c in cases],
    }
    write_json(Path(path), doc)
    return Path(path)


def read_run(path: Path) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"run file {path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(doc, dict) or "schema_version" not in doc or "cases" not in doc:
        raise ValueError(f"run file {path}: not an influence-bench run (no schema_version/cases)")
    if doc["schema_version"] > SCHEMA_VERSION:
        raise ValueError(f"run file {path}: schema_version {doc['schema_version']} is newer than this "
                         f"influence-bench understands ({SCHEMA_VERSION}); upgrade influence-bench")
    return doc
