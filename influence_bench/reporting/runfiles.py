"""Run files: one JSON per run (schema_version, machine, commit, cases), written atomically.

The schema itself (fields, validation, upgrades) lives in :mod:`influence_bench.schema`."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Iterable

import torch

from influence_bench.paths import write_json
from influence_bench.reporting.schema import SCHEMA_VERSION, Case, Run, RunFileError, load_run, run_from_json  # noqa: F401


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
    repo = repo or Path(__file__).resolve().parents[2]

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
    """Write a run file (``extra`` may carry ``tier`` and other top-level keys); validated first, so
    nothing this module writes fails to load."""
    extra = dict(extra or {})
    doc = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "tier": extra.pop("tier", None),
        "machine": machine_info(),
        "commit": commit_info(),
        **extra,
        "cases": [c.to_json() if hasattr(c, "to_json") else c for c in cases],
    }
    run_from_json(doc, path)
    write_json(Path(path), doc)
    return Path(path)


def write_run_obj(path: Path, run: Run) -> Path:
    write_json(Path(path), run.to_json())
    return Path(path)


def read_run(path: Path) -> dict:
    """The run file at ``path`` as a validated JSON dict at the current schema version."""
    return load_run(path).to_json()
