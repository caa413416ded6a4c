"""One scoring session: evaluate estimators on settings, judge the cases against the thresholds,
tabulate them and write the run file. ``influence-bench score`` and the pytest plugin are both thin
front-ends over it, so the two give the same verdicts, the same table and the same run file."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from influence_bench import paths, tally
from influence_bench.api.registry import builtin_estimators, registered_tags  # noqa: F401  (re-exported)
from influence_bench.reporting.render import DEFAULT_WIDTH
from influence_bench.reporting.runfiles import (
    append_journal,
    journal_path,
    new_run_path,
    read_cases,
    start_journal,
    write_run,
)
from influence_bench.reporting.schema import Case, case_from_json
from influence_bench.reporting.table import fidelity_table, rank_footers
from influence_bench.scoring.isolation import Limits
from influence_bench.scoring.runner import evaluate
from influence_bench.spec.settings import Setting
from influence_bench.spec.thresholds import Thresholds, judge
from influence_bench.training import shipped as shipped_models


class ScoringSession:
    """Collects the cases, what they trained and computed, and shipped settings that retrained."""

    def __init__(self, device: str = "cpu", thresholds: Thresholds | None = None, start=None,
                 limits: Limits | None = None):
        self.device = device
        self.limits = limits or Limits()  # every estimator call's time / memory limits and isolation
        self.thresholds = thresholds or Thresholds.load()
        self.cases: list[Case] = []
        self.work: Counter = Counter()  # what the evaluated cases trained and computed
        self.start = tally.snapshot() if start is None else start  # the whole session's work counts from here
        self.shipped_violations: list[str] = []
        self.run_path: Path | None = None
        self.selected: list[dict] = []  # what the front-end set out to score (the run file's ``selected``)
        self.journal: Path | None = None  # run-*.jsonl: every finished case, appended as it finishes
        self.resumed: list[Case] = []  # cases carried over from the run given to ``begin(resume=...)``
        self.elsewhere: Counter = Counter()  # work of the whole sessions of merged pytest-xdist workers

    def begin(self, results_dir: Path, extra: dict | None = None, resume: Path | None = None) -> Path:
        """Before any compute: check that ``results_dir/runs`` is writable, choose the run file (a new
        one, or ``resume``'s: a run file or a journal whose cases are kept and not recomputed) and
        start its journal. Returns the run file's path. Raises ``ResultsDirError`` / ``RunFileError``."""
        if resume is not None:
            _, self.resumed = read_cases(Path(resume))
            self.cases = list(self.resumed)
            run_path = Path(resume).with_suffix(".json")
        else:
            run_path = new_run_path(Path(results_dir))
        check_writable(run_path.parent)
        self.run_path = run_path
        try:
            self.journal = start_journal(run_path, extra, self.cases)
        except OSError as exc:
            raise ResultsDirError(f"cannot write the run journal {journal_path(run_path)} ({exc.strerror or exc}); "
                                  "choose another folder with --results-dir") from None
        return run_path

    def done(self, estimator: str, setting: Setting, protocols: tuple[str, ...] | None = None) -> bool:
        """Whether the resumed run already holds every case of ``estimator`` on ``setting``."""
        want = set(protocols or setting.protocol.default)
        have = {c.protocol for c in self.resumed if (c.estimator, c.setting, c.mode) ==
                (estimator, setting.id, setting.ground_truth.mode)}
        return bool(want) and want <= have

    def select(self, estimator: str, setting: Setting, protocols: tuple[str, ...] | None = None) -> None:
        """Record that ``estimator`` on ``setting`` was selected, so that the regression gate can tell
        a case that produced no result from one this run did not select (``reporting/gates.py``)."""
        self.selected.append({"estimator": estimator, "setting": setting.id, "mode": setting.ground_truth.mode,
                              "protocols": list(protocols or setting.protocol.default)})

    def not_run(self, estimator: str, setting: Setting, reason: str) -> None:
        """Record why a selected (estimator, setting) produced no case (e.g. its data is missing)."""
        for e in self.selected:
            if (e["estimator"], e["setting"], e["mode"]) == (estimator, setting.id, setting.ground_truth.mode):
                e["not_run"] = reason.strip().splitlines()[0][:200] if reason.strip() else "(no reason given)"

    def evaluate(self, estimator: str, setting: Setting, protocols: tuple[str, ...] | None = None
                 ) -> tuple[list[Case], str | None]:
        """The cases of ``estimator`` on ``setting`` (recorded), and the shipped-setting violation
        they caused, if any (``shipped_violation``). Raises ``DataUnavailable`` like ``evaluate``."""
        before = tally.snapshot()
        try:
            cases = evaluate(estimator, setting, device=self.device, protocols=protocols, limits=self.limits)
        finally:
            work = tally.since(before)
            self.work.update(work)
        self.cases += cases
        if self.journal is not None:
            append_journal(self.journal, cases)  # on disk before the next case starts
        violation = shipped_violation(cases[0].estimator if cases else estimator, setting, work)
        if violation:
            self.shipped_violations.append(violation)
        return cases, violation

    def export(self) -> str:
        """Everything a pytest-xdist worker hands the controller (``merge``), as JSON: its cases, what it
        selected, its shipped-setting violations, the work of its cases and of its whole session."""
        def pairs(c: Counter) -> list:
            return [[w, s, n] for (w, s), n in c.items()]

        return json.dumps({"cases": [c.to_json() for c in self.cases], "selected": self.selected,
                           "shipped_violations": self.shipped_violations, "work": pairs(self.work),
                           "whole": pairs(tally.since(self.start))}, allow_nan=False)

    def merge(self, exported: str, where: str) -> None:
        """Add a worker's ``export`` to this session (the controller's, which writes the one run file and
        applies the gate): its cases (journalled at once), its selection (one entry per estimator and
        setting: every worker collects every test, the one that ran it knows why it did not run), its
        violations and its work. Raises ``RunFileError`` naming ``where`` for a case that does not load."""
        part = json.loads(exported)
        cases = [case_from_json(d, f"{where}, case {i}") for i, d in enumerate(part["cases"])]
        self.cases += cases
        if self.journal is not None:
            append_journal(self.journal, cases)
        have = {(e["estimator"], e["setting"], e["mode"]): e for e in self.selected}
        for e in part["selected"]:
            key = (e["estimator"], e["setting"], e["mode"])
            if key not in have:
                have[key] = dict(e)
                self.selected.append(have[key])
            elif "not_run" in e:
                have[key]["not_run"] = e["not_run"]
        self.shipped_violations += part["shipped_violations"]
        self.work.update({(w, s): n for w, s, n in part["work"]})
        self.elsewhere.update({(w, s): n for w, s, n in part["whole"]})

    def judge(self, cases: list[Case] | None = None, known: list[str] | None = None, reasons: dict | None = None
              ) -> tuple[dict, list[str]]:
        """(verdict per case key, failure lines) of ``cases`` (default: every case so far); ``reasons``
        receives each FAIL's and xfail's lines by key."""
        return judge(self.cases if cases is None else cases, self.thresholds, known, tags_of=registered_tags,
                     reasons=reasons)

    def table(self, reference: list[Case] = (), show_reference: bool = False, fmt: str = "table",
              width: int = DEFAULT_WIDTH) -> str:
        """The fidelity table of the session's cases (``fmt``: table, markdown, csv, json; ``width``
        columns at most), under each setting a line ranking them among the ``reference`` cases (e.g.
        a baseline's); ``show_reference``: the reference rows too, judged, marked as not recomputed."""
        reasons: dict = {}
        verdicts, _ = self.judge(reasons=reasons)
        shown = list(reference) if show_reference else []
        if shown:
            verdicts = {**self.judge(shown, reasons=reasons)[0], **verdicts}
        footers = rank_footers(self.cases, reference) if reference and fmt == "table" else None
        return fidelity_table(self.cases, verdicts, shown, fmt=fmt, width=width, footers=footers, reasons=reasons)

    def write_run(self, results_dir: Path, extra: dict | None = None, partial: str | None = None) -> Path | None:
        """Write the run file atomically (with ``selected`` when anything was recorded by ``select``,
        and ``partial``, why the run stopped early, when it did), then drop the journal: at the path
        ``begin`` chose, else a new one in ``results_dir``."""
        if not self.cases:
            if self.journal is not None:  # nothing finished: no run file, and no header-only journal left behind
                self.journal.unlink(missing_ok=True)
                self.journal = None
            return None
        extra = {**(extra or {}), **({"selected": self.selected} if self.selected else {}),
                 **({"partial": partial} if partial else {})}
        path = self.run_path if self.journal is not None else new_run_path(Path(results_dir))
        self.run_path = write_run(path, self.cases, extra=extra)
        if self.journal is not None:
            self.journal.unlink(missing_ok=True)
            self.journal = None
        return self.run_path

    def work_summary(self) -> str:
        """One line: what the evaluated cases trained and computed, and the whole process beside it."""
        fid, whole = self.work, tally.since(self.start) + self.elsewhere
        return (f"influence-bench: fidelity cases trained {tally.total(fid, tally.TRAINED)} models and computed "
                f"{tally.total(fid, tally.COMPUTED)} ground-truth entries (whole session, unit tests included: "
                f"{tally.total(whole, tally.TRAINED)} models trained, {tally.total(whole, tally.COMPUTED)} entries "
                f"computed, {tally.total(whole, tally.VERIFIED)} recomputed to verify)")


class ResultsDirError(OSError):
    """The results folder cannot be written (checked before any compute)."""


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there; raise ``ResultsDirError``
    naming it otherwise (before hours of compute, not after)."""
    folder = Path(folder)
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ResultsDirError(f"the results folder {folder} is not writable ({exc.strerror or exc}); choose "
                              "another with --results-dir") from None


def shipped_violation(estimator: str, setting: Setting, work: Counter) -> str | None:
    """A built-in estimator on a setting whose theta* and ground truth the checkout ships must train
    and retrain nothing: if it did, the shipped files no longer match the code (or lack the
    estimator's top-k removals), and every fresh machine pays for it. Returns the message, or None."""
    root = paths.shipped_gt_dir()
    model = shipped_models.path_for(setting, root)
    if model is None or not model.is_file() or estimator not in builtin_estimators():
        return None
    trained = work.get((tally.TRAINED, setting.id), 0)
    computed = work.get((tally.COMPUTED, setting.id), 0)
    if not (trained or computed):
        return None
    return (f"{estimator}-{setting.id}: {setting.id} ships theta* and ground truth in {root}, yet this case trained "
            f"{trained} model(s) and computed {computed} ground-truth entries: the shipped files no longer match "
            f"the code or lack {estimator}'s top-k removals. Re-export with `influence-bench ground-truth ship "
            f"{setting.id}` and commit {root}.")
