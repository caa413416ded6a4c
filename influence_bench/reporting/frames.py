"""Fidelity cases as the records of a pandas DataFrame (``influence_bench.score`` / ``load_runs``,
``python_api.py``): one per (setting, estimator, protocol), built by ``table.fidelity_rows`` so that
the first columns are ``score --format csv``'s, or one per (case key, metric, test point).

Neither torch nor pandas is imported here."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

from influence_bench.reporting.schema import Run, RunFileError
from influence_bench.reporting.table import FIDELITY_FIELDS, fidelity_rows

CASE_EXTRA = ["mode", "device", "hyperparameters"]  # after the csv's columns
TEST_POINT_FIELDS = ["setting", "estimator", "protocol", "mode", "verdict", "metric", "test_idx", "position",
                     "value", "highest_loss", "median_loss"]
RUN_FIELDS = ["run_file", "created", "tier", "commit_sha", "commit_dirty"]  # then machine_<key>, one per key


def case_columns() -> list[str]:
    """``score --format csv``'s header (``render_csv``: the table's fields, then ``note``) and the extras."""
    return list(FIDELITY_FIELDS) + ["note"] + CASE_EXTRA


def case_records(cases: Iterable, verdicts: dict, reasons: dict | None = None) -> list[dict]:
    """One record per (setting, estimator, protocol): ``fidelity_rows``' raw fields, the note (an
    error's or a skip's message, a FAIL's or an xfail's reasons from ``reasons``) and the extras.
    ``verdicts``: (setting, estimator, protocol) -> verdict."""
    cases = list(cases)
    table = fidelity_rows(cases, verdicts, reasons=reasons)
    case_of = {(c.setting, c.estimator, c.protocol): c for c in cases}
    out = []
    for row in table.rows:
        c = case_of[(row["setting"], row["estimator"], row["protocol"])]
        rec = {k: _nan(row.get(k)) for k in table.fields}
        rec["note"] = row.get("_note", "")
        rec.update(mode=c.mode, device=c.device, hyperparameters=dict(c.hyperparameters))
        out.append(rec)
    return out


def test_point_records(cases: Iterable, verdicts: dict) -> list[dict]:
    """One record per (setting, estimator, protocol, metric, test point) of the ``ok`` cases; the
    highest-loss test point comes first in ``test_idx`` and the median-loss one second
    (``api/loading.select_test_points``; ``Case.at_highest_loss`` / ``at_median_loss`` read them so)."""
    out = []
    for c in sorted(cases, key=lambda c: (c.setting, c.estimator, c.protocol, c.metric)):
        if c.status != "ok":
            continue
        idx = list(c.test_idx) if len(c.test_idx) == len(c.per_test) else [None] * len(c.per_test)
        for pos, (i, v) in enumerate(zip(idx, c.per_test)):
            out.append({"setting": c.setting, "estimator": c.estimator, "protocol": c.protocol, "mode": c.mode,
                        "verdict": verdicts.get((c.setting, c.estimator, c.protocol), ""), "metric": c.metric,
                        "test_idx": i, "position": pos, "value": _nan(v), "highest_loss": pos == 0,
                        "median_loss": pos == 1})
    return out


def run_record(run: Run) -> dict:
    """The columns every row of one run file carries: where it is, when and on what it ran."""
    return {"run_file": str(run.path), "created": run.created, "tier": run.tier, "commit_sha": run.commit.get("sha"),
            "commit_dirty": run.commit.get("dirty"), **{f"machine_{k}": v for k, v in run.machine.items()}}


def run_files(paths) -> list[Path]:
    """The run files ``paths`` names: a file, a folder (its ``run-*.json``, else those in its ``runs``
    folder), or a list of them. ``FileNotFoundError`` naming a path that is missing or a folder without any."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[Path] = []
    for p in map(Path, items):
        if p.is_dir():
            found = sorted(p.glob("run-*.json")) or sorted((p / "runs").glob("run-*.json"))
            if not found:
                journals = len(list(p.glob("run-*.jsonl")) + list((p / "runs").glob("run-*.jsonl")))
                hint = (f"; {journals} journal(s) of unfinished runs (run-*.jsonl) are there: finish one with "
                        "`influence-bench score ... --resume FILE.jsonl`") if journals else ""
                raise FileNotFoundError(f"no run files (run-*.json) in {p} or {p / 'runs'}{hint}")
            out += found
        elif p.is_file():
            if p.suffix != ".json":
                raise RunFileError(f"run file {p}: not a .json run file (a run-*.jsonl journal is an unfinished "
                                   "run: finish it with `influence-bench score ... --resume`)")
            out.append(p)
        else:
            raise FileNotFoundError(f"run file {p} does not exist")
    return out


def _nan(v):
    """None (undefined, or absent on an error / skipped row) as NaN, so numeric columns stay numeric."""
    return math.nan if v is None else v
