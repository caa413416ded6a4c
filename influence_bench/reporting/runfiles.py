"""Run files: one JSON per run (schema_version, machine, commit, cases), written atomically.

The schema itself (fields, validation, upgrades) lives in :mod:`influence_bench.schema`."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Iterable

import torch

from influence_bench.paths import atomic_path, write_json
from influence_bench.reporting.schema import (  # noqa: F401
    SCHEMA_VERSION,
    Case,
    Run,
    RunFileError,
    case_from_json,
    load_run,
    run_from_json,
)


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
    """The checkout's commit: ``sha``; ``dirty``, true when tracked files are modified or untracked
    (not ignored) files exist; ``changed_files`` / ``untracked_files``, how many (each None, and the
    counts left out, where git cannot answer)."""
    repo = repo or Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=all")
    if status is None:
        return {"sha": sha, "dirty": None}
    lines = [ln for ln in status.splitlines() if ln.strip()]
    untracked = sum(ln.startswith("??") for ln in lines)
    return {"sha": sha, "dirty": bool(lines), "changed_files": len(lines) - untracked, "untracked_files": untracked}


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


def journal_path(run_path: Path) -> Path:
    """Where a run's cases are appended as they finish: ``run-*.jsonl`` beside ``run-*.json``."""
    return Path(run_path).with_suffix(".jsonl")


def start_journal(run_path: Path, extra: dict | None = None, cases: Iterable = ()) -> Path:
    """Begin the journal of the run ``run_path``: one JSON header line (the top-level keys the final
    file will carry), then ``cases`` (a resumed run's), written atomically so that a kill never leaves
    less than there was. Raises ``OSError`` when the folder is not writable."""
    path = journal_path(run_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = {"influence_bench_journal": 1, "schema_version": SCHEMA_VERSION, **(extra or {})}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(head, allow_nan=False) + "\n" + _lines(cases))
    return path


def _lines(cases: Iterable) -> str:
    return "".join(json.dumps(c.to_json() if hasattr(c, "to_json") else c, allow_nan=False) + "\n" for c in cases)


def append_journal(path: Path, cases: Iterable) -> None:
    """Append finished cases, one JSON line each, flushed to disk before returning."""
    with open(path, "a") as fh:
        fh.write(_lines(cases))
        fh.flush()
        os.fsync(fh.fileno())


def read_journal(path: Path) -> tuple[dict, list[Case]]:
    """(header, cases) of a journal; a last line cut short by a kill is dropped, any other bad line
    is an error naming the file and the line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFileError(f"run journal {path}: cannot be read ({exc})") from exc
    if not lines:
        raise RunFileError(f"run journal {path}: empty")
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError:
        head = None
    if not isinstance(head, dict) or head.get("influence_bench_journal") != 1:
        raise RunFileError(f"run journal {path}: line 1 is not an influence-bench journal header")
    cases = []
    for i, line in enumerate(lines[1:], start=2):
        try:
            cases.append(case_from_json(json.loads(line), f"line {i}"))
        except (json.JSONDecodeError, RunFileError) as exc:
            if i == len(lines):  # the line a kill cut short
                break
            raise RunFileError(f"run journal {path}: line {i}: {exc}") from None
    return head, cases


def read_cases(path: Path) -> tuple[dict, list[Case]]:
    """(top-level keys, cases) of a run file or of a run journal (``--resume``)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        head, cases = read_journal(path)
        return {k: v for k, v in head.items() if k not in ("influence_bench_journal", "schema_version")}, cases
    run = load_run(path)
    return {"tier": run.tier, **run.extra}, list(run.cases)


def write_run_obj(path: Path, run: Run) -> Path:
    write_json(Path(path), run.to_json())
    return Path(path)


def read_run(path: Path) -> dict:
    """The run file at ``path`` as a validated JSON dict at the current schema version."""
    return load_run(path).to_json()
