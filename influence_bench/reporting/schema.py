"""The run-file schema, declared once: ``Case`` (one result) and ``Run`` (one file), with
validation on load and upgrades from older ``schema_version``s.

A run file is JSON::

    {"schema_version": 3, "created": ISO-8601, "tier": "smoke" | null,
     "machine": {"torch", "cuda", "device_name", "cpu_count", ...},
     "commit": {"sha": str | null, "dirty": bool | null, "changed_files": int, "untracked_files": int},
     "selected": [{"estimator", "setting", "mode", "protocols": [...]}, ...],   (optional)
     "cases": [Case, ...], ...}

``commit`` describes the influence_bench checkout that ran: ``dirty`` is true when a tracked file is
modified or a file is untracked (ignored files do not count), ``changed_files`` / ``untracked_files``
say how many (absent in older files, and where git could not answer).

``selected`` (written by the pytest plugin and ``influence-bench score``) lists what the run set out
to score, so the regression gate can tell a case that was selected but produced no result from one a
``-k`` slice left out; an entry may carry ``not_run``, the reason it produced no case (e.g. its data
is missing). Unknown top-level keys are kept (``Run.extra``); unknown case keys are ignored. History:

* v1: cases without ``device`` and ``setting_info``; ``tier`` optional.
* v2: ``device`` and ``setting_info`` (dataset, family, depth, width, weight_decay) per case,
  ``tier`` always present (null when unknown). v1 files are upgraded on load: ``device`` is
  ``"cpu"`` when the machine had no CUDA, else ``"unknown"``; ``setting_info`` is empty.
* v3: ``noise_ceiling`` is the attainable correlation ``sqrt(reliability)`` and ``noise_reliability``
  the split-half reliability beside it (up to v2, ``noise_ceiling`` held the reliability itself).
  v2 files are upgraded on load: ``noise_reliability`` = the old ``noise_ceiling``, ``noise_ceiling``
  = its square root (null stays null).

This module imports neither torch nor the runner, so reading results is cheap.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 3
STATUSES = ("ok", "error", "skipped")
MACHINE_KEYS = ("torch", "cuda", "device_name", "cpu_count")


class RunFileError(ValueError):
    """A run file that cannot be used; the message names the file and the field."""


@dataclass
class Case:
    """One (estimator, setting, protocol, metric) result; ``status`` is ok | error | skipped.

    ``value`` is the mean over test points of ``metric`` (``None`` when undefined), ``ci_low`` /
    ``ci_high`` its Student t 95% CI (``None`` with fewer than two defined test points), ``per_test``
    the per-test-point values (order of ``test_idx``),
    ``wall_time_s`` the estimator's time on the setting, ``peak_memory_mb`` the peak while it ran
    (RSS high-water mark on Linux CPUs, reset before the call; ``torch.cuda.max_memory_allocated``
    on GPU; see ``measure.py``), ``extra_memory_mb`` that peak minus what was in use at the start.
    ``noise_reliability`` is the split-half reliability of the ground truth (Spearman-Brown; 1 for
    deterministic retraining) and ``noise_ceiling`` the correlation attainable against it,
    ``sqrt(noise_reliability)`` (``metrics.attainable_correlation``).
    ``at_highest_loss`` / ``at_median_loss``: the metric at the highest-loss and at the median-loss
    test point alone (the paper's Table 1 view; the others in ``per_test`` are seeded random ones).
    ``n_unconverged_excluded``: removed points whose retrained model did not reach its convergence
    criterion, left out of the scored removals (run files without the field read as 0).
    ``estimator_source``: the estimator's provenance (``influence_bench.api.provenance``): ``file``
    (relative to the influence_bench root, else the bare file name), ``sha256`` (first 16 hex digits
    of the sha256 of the file defining the class), ``class``, and ``package`` / ``version`` of the
    distribution whose entry point provided it (null otherwise); ``{}`` in older run files.
    """

    estimator: str
    setting: str
    setting_version: int
    spec_hash: str
    protocol: str
    mode: str
    metric: str
    status: str = "ok"
    value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    median: float | None = None
    min: float | None = None
    n_test: int = 0
    n_undefined: int = 0
    per_test: list = field(default_factory=list)
    test_idx: list = field(default_factory=list)
    # the metric at the paper's two test points (per_test[0] and per_test[1], test_idx's order):
    # the highest-loss and the median-loss one (None: undefined there, or an older run file)
    at_highest_loss: float | None = None
    at_median_loss: float | None = None
    noise_ceiling: float | None = 1.0  # NaN in memory (null in JSON): unmeasured (one replicate of a stochastic recipe)
    noise_reliability: float | None = 1.0  # the same NaN/null rule
    n_unconverged_excluded: int = 0  # removals (LDS: subsets) left out: their retraining did not converge
    wall_time_s: float | None = None
    peak_memory_mb: float | None = None
    extra_memory_mb: float | None = None  # the peak minus the memory in use when the estimator started
    device: str = "unknown"
    hyperparameters: dict = field(default_factory=dict)
    tags: list = field(default_factory=list)  # what the estimator declares (claims such as "second-order")
    # the method the estimator implements (``Estimator.method``: ``exact``, ``cg``, ``lissa``...), so one
    # method's implementations (ours and the peer libraries') are compared side by side; "" in older run
    # files (``method_of`` then reads the estimator's name)
    method: str = ""
    # where the estimator's code came from: {"file", "sha256", "class", "package", "version"}
    # (``api/provenance.py``; {} in run files written before it was recorded)
    estimator_source: dict = field(default_factory=dict)
    setting_info: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():  # JSON has no NaN
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        d["per_test"] = [None if isinstance(v, float) and not math.isfinite(v) else v for v in d["per_test"]]
        return d


@dataclass
class Run:
    path: Path | None
    schema_version: int
    created: str
    tier: str | None
    machine: dict
    commit: dict
    cases: list[Case]
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "created": self.created, "tier": self.tier,
                "machine": self.machine, "commit": self.commit, **self.extra,
                "cases": [c.to_json() for c in self.cases]}


def setting_shape(setting: Any) -> dict:
    """The shape of a ``Setting``, stored with each case so that reports need not know the catalog."""
    return {"dataset": setting.data.name, "family": setting.model.family, "depth": setting.model.depth,
            "width": setting.model.width, "weight_decay": setting.weight_decay, "tier": setting.tier,
            "n_train": setting.data.n_train}


# ---------------------------------------------------------------- validation

def _is(value: Any, kind: str) -> bool:
    if kind == "None":
        return value is None
    if kind in ("float", "int"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return kind == "float" or isinstance(value, int)
    return isinstance(value, {"str": str, "list": list, "dict": dict, "bool": bool}[kind])


def _check(where: str, value: Any, ann: str) -> None:
    kinds = [k.strip() for k in ann.split("|")]
    if not any(_is(value, k) for k in kinds):
        raise RunFileError(f"{where}: expected {' or '.join(kinds)}, got {type(value).__name__} {value!r:.60}")


_CASE_FIELDS = {f.name: f for f in dataclasses.fields(Case)}


def case_from_json(d: Any, where: str) -> Case:
    if not isinstance(d, dict):
        raise RunFileError(f"{where}: expected an object, got {type(d).__name__}")
    kw = {}
    for name, f in _CASE_FIELDS.items():
        if name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RunFileError(f"{where}: missing field {name!r}")
            continue
        _check(f"{where}.{name}", d[name], str(f.type))
        kw[name] = d[name]
    for name in ("noise_ceiling", "noise_reliability"):
        if kw.get(name, 1.0) is None:
            kw[name] = float("nan")
    case = Case(**kw)
    if case.status not in STATUSES:
        raise RunFileError(f"{where}.status: {case.status!r} is not one of {', '.join(STATUSES)}")
    for i, v in enumerate(case.per_test):
        _check(f"{where}.per_test[{i}]", v, "float | None")
    if case.ci_low is not None and case.ci_high is not None and case.ci_low > case.ci_high:
        raise RunFileError(f"{where}: ci_low {case.ci_low} > ci_high {case.ci_high}")
    return case


def _upgrade_v1(doc: dict) -> dict:
    machine = doc.get("machine") if isinstance(doc.get("machine"), dict) else {}
    device = "cpu" if machine.get("cuda_available") is False else "unknown"
    doc = {**doc, "schema_version": 2, "tier": doc.get("tier")}
    if isinstance(doc["cases"], list):  # anything else is reported by validation
        doc["cases"] = [{**c, "device": c.get("device", device), "setting_info": c.get("setting_info", {})}
                        if isinstance(c, dict) else c for c in doc["cases"]]
    return doc


def _upgrade_v2(doc: dict) -> dict:
    def case(c):
        if not isinstance(c, dict) or "noise_reliability" in c:
            return c
        r = c.get("noise_ceiling", 1.0)
        if not _is(r, "float"):  # null stays null; anything else is reported by validation
            return {**c, "noise_reliability": r}
        return {**c, "noise_reliability": r, "noise_ceiling": math.sqrt(min(max(r, 0.0), 1.0))}

    doc = {**doc, "schema_version": 3}
    if isinstance(doc["cases"], list):
        doc["cases"] = [case(c) for c in doc["cases"]]
    return doc


def _check_selected(selected: Any) -> None:
    _check("selected", selected, "list")
    for i, e in enumerate(selected):
        _check(f"selected[{i}]", e, "dict")
        for key, ann in (("estimator", "str"), ("setting", "str"), ("mode", "str"), ("protocols", "list")):
            if key not in e:
                raise RunFileError(f"selected[{i}]: missing field {key!r}")
            _check(f"selected[{i}].{key}", e[key], ann)
        if "not_run" in e:
            _check(f"selected[{i}].not_run", e["not_run"], "str")


UPGRADES = {1: _upgrade_v1, 2: _upgrade_v2}  # version -> function returning the doc at version + 1


def run_from_json(doc: Any, path: Path | str | None = None) -> Run:
    """Validate (and upgrade) a decoded run file; errors name ``path`` and the offending field."""
    name = str(path) if path is not None else "<run>"
    if not isinstance(doc, dict):
        raise RunFileError(f"run file {name}: expected a JSON object, got {type(doc).__name__}")
    if "schema_version" not in doc or "cases" not in doc:
        raise RunFileError(f"run file {name}: not an influence-bench run (no schema_version/cases)")
    version = doc["schema_version"]
    if not _is(version, "int") or version < 1:
        raise RunFileError(f"run file {name}: schema_version {version!r} is not a positive integer")
    if version > SCHEMA_VERSION:
        raise RunFileError(f"run file {name}: schema_version {version} is newer than this influence-bench "
                           f"understands ({SCHEMA_VERSION}); upgrade influence-bench")
    while version < SCHEMA_VERSION:
        doc = UPGRADES[version](doc)
        version = doc["schema_version"]
    try:
        for key, ann in (("created", "str"), ("tier", "str | None"), ("machine", "dict"), ("commit", "dict"),
                         ("cases", "list")):
            if key not in doc:
                raise RunFileError(f"missing field {key!r}")
            _check(key, doc[key], ann)
        for key in MACHINE_KEYS:
            if key not in doc["machine"]:
                raise RunFileError(f"machine: missing field {key!r}")
        for key in ("sha", "dirty"):
            if key not in doc["commit"]:
                raise RunFileError(f"commit: missing field {key!r}")
        _check("commit.sha", doc["commit"]["sha"], "str | None")
        _check("commit.dirty", doc["commit"]["dirty"], "bool | None")
        for key in ("changed_files", "untracked_files"):
            if key in doc["commit"]:
                _check(f"commit.{key}", doc["commit"][key], "int")
        if "selected" in doc:
            _check_selected(doc["selected"])
        cases = [case_from_json(c, f"cases[{i}]") for i, c in enumerate(doc["cases"])]
    except RunFileError as exc:
        raise RunFileError(f"run file {name}: {exc}") from None
    known = {"schema_version", "created", "tier", "machine", "commit", "cases"}
    return Run(Path(path) if path is not None else None, SCHEMA_VERSION, doc["created"], doc["tier"],
               doc["machine"], doc["commit"], cases, {k: v for k, v in doc.items() if k not in known})


def load_run(path: Path | str) -> Run:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFileError(f"run file {path}: cannot be read as JSON ({exc})") from exc
    return run_from_json(doc, path)
