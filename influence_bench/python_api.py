"""The Python API: ``influence_bench.score`` and ``influence_bench.load_runs`` return pandas DataFrames.

Columns of a per-case frame (one row per setting, estimator, protocol; the first 19 are
``influence-bench score --format csv``'s, in its order):

* ``setting``, ``estimator`` (its label: the name, or ``name(field=value, ...)`` with the
  hyperparameters that differ from the defaults), ``protocol`` (``loo-fixed``, ``loo-topk``, ``lds``)
* ``verdict``: ``pass`` / ``FAIL`` / ``xfail`` against the current ``thresholds.toml`` (the CLI's and
  pytest's judge), or ``skipped`` / ``error``; ``status``: the case's ``ok`` / ``skipped`` / ``error``
* ``source``: ``run`` (computed, not a baseline's row)
* ``spearman``, ``pearson``: mean over the test points of the correlation between the estimator's
  influence and the ground truth, with ``*_ci_low`` / ``*_ci_high`` (Student t 95% CI; NaN with fewer
  than two defined test points); ``spearman_min``: the worst test point's Spearman
* ``n_test``: test points scored; ``n_unconverged_excluded``: removals left out because their
  retraining did not converge; ``ceiling``: the noise ceiling (correlation attainable against the
  ground truth; 1 for deterministic retraining)
* ``time_s``: the estimator's wall time on the setting; ``peak_mib``: peak memory while it ran (RSS on
  CPU, ``torch.cuda.max_memory_allocated`` on GPU)
* ``note``: an error's or a skip's message ("" when ok); numbers are NaN on such rows
* ``mode``: ground-truth mode (``warm``, ``scratch``, ``pbrf``); ``device``: where it ran;
  ``hyperparameters``: a dict of all of the estimator's hyperparameters
* ``load_runs`` only: ``run_file``, ``created`` (ISO-8601, UTC), ``tier``, ``commit_sha``,
  ``commit_dirty`` (modified or untracked files in the checkout that ran), and ``machine_<key>`` for
  each key of the run's machine record (``machine_torch``, ``machine_cuda``, ``machine_device_name``,
  ``machine_cpu_count``; newer files also ``machine_python``, ``machine_platform``, ``machine_cuda_available``)

Columns of a per-test-point frame (``per_test=True``; ``ok`` cases only, one row per setting,
estimator, protocol, metric and test point): ``setting``, ``estimator``, ``protocol``, ``mode``,
``verdict`` (the case key's), ``metric`` (``spearman``, ``pearson``, ``topk-overlap``), ``test_idx``
(index into the setting's test set), ``position`` (0-based, in the setting's order), ``value`` (NaN
where undefined), ``highest_loss`` / ``median_loss`` (the paper's two test points: positions 0 and
1); ``load_runs`` adds the run columns above.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


def score(estimators, settings: str | Iterable[str] | None = None, tier: str | None = "smoke",
          protocols: str | Iterable[str] | None = None, mode: str | None = None, device: str = "cpu",
          results_dir=None, per_test: bool = False) -> "pd.DataFrame":
    """Score ``estimators`` on ``settings`` as ``influence-bench score`` does (one ``ScoringSession``:
    the same cases and verdicts as the CLI and pytest) and return a DataFrame (module docstring: columns).

    ``estimators``: one or a list of names, specs (``"lissa(depth=500)"``) or instances of registered
    estimator classes; all are checked before anything runs (``RegistryError`` naming the estimator
    and field). ``settings``: ids or globs (default: every setting of ``tier``; ``tier=None``: any
    tier); none matching is a ``ValueError``. ``protocols``: default each setting's own. ``mode``:
    ground-truth mode (default each setting's own, ``warm``). ``results_dir``: write the run file to
    ``results_dir/runs/`` (its path in ``df.attrs["run_file"]``); by default nothing is written.
    ``per_test``: one row per test point instead of one per case.

    A setting whose data is not on this machine produces no rows: ``df.attrs["not_run"]`` maps it to
    the reason. ``df.attrs["failures"]``: the judge's line for every failed floor. A failing estimator
    is a row (``error`` / ``skipped``, its message in ``note``), not an exception; a failure of the
    harness itself raises (with ``results_dir``, the finished cases are in the run's journal,
    ``run-*.jsonl``: ``influence-bench score --resume`` continues it).
    """
    from pathlib import Path

    from influence_bench.data.datasets import DataUnavailable
    from influence_bench.reporting import frames
    from influence_bench.scoring.protocols import KNOWN_PROTOCOLS
    from influence_bench.scoring.session import ScoringSession
    from influence_bench.spec import catalog

    jobs = _checked_estimators(estimators)
    patterns = [settings] if isinstance(settings, str) else (list(settings) if settings is not None else None)
    chosen = catalog.select(patterns, tier=tier)
    if not chosen:
        raise ValueError(f"no setting matches {patterns or ['*']} in tier {tier!r}; `influence-bench list settings` "
                         "names them (tier=None: any tier)")
    protocols = (protocols,) if isinstance(protocols, str) else (tuple(protocols) if protocols else None)
    unknown = [p for p in protocols or () if p not in KNOWN_PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {', '.join(map(repr, unknown))}; known: {', '.join(KNOWN_PROTOCOLS)}")
    chosen = [s.with_mode(mode) if mode else s for s in chosen]  # ValueError naming an unknown mode
    session = ScoringSession(_checked_device(device))
    extra = {"tier": tier}
    run_path = session.begin(Path(results_dir), extra=extra) if results_dir is not None else None
    not_run: dict[str, str] = {}
    for s in chosen:
        for spec, label in jobs:
            session.select(label, s, protocols)
            try:
                session.evaluate(spec, s, protocols=protocols)
            except DataUnavailable as exc:
                reason = f"data unavailable: {exc}"
                session.not_run(label, s, reason)
                not_run.setdefault(s.id, reason)
    reasons: dict = {}
    verdicts, failures = session.judge(reasons=reasons)
    if run_path is not None:
        run_path = session.write_run(Path(results_dir), extra=extra)  # None when nothing finished
    if per_test:
        df = _frame(frames.test_point_records(session.cases, verdicts), frames.TEST_POINT_FIELDS)
    else:
        df = _frame(frames.case_records(session.cases, verdicts, reasons), frames.case_columns())
    df.attrs.update(run_file=str(run_path) if run_path is not None else None, not_run=not_run, failures=failures)
    return df


def load_runs(paths, per_test: bool = False) -> "pd.DataFrame":
    """The cases of run files as a DataFrame, like ``score``'s plus the run's columns (module
    docstring: every column). ``paths``: a run file, a folder (its ``run-*.json``, else
    ``FOLDER/runs/run-*.json``) or a list of them; ``results/baseline.json`` is a run file too.
    Verdicts are judged now, with the current thresholds, one run file at a time (as
    ``ScoringSession.judge`` does), whatever they were when the run was written. A file that is not a
    valid run is a ``RunFileError`` naming it; a missing path a ``FileNotFoundError``.
    ``per_test``: one row per test point instead of one per case."""
    from influence_bench.reporting import frames
    from influence_bench.reporting.schema import load_run
    from influence_bench.spec.thresholds import Thresholds, judge

    thresholds = Thresholds.load()
    columns = (frames.TEST_POINT_FIELDS if per_test else frames.case_columns()) + frames.RUN_FIELDS
    records = []
    for path in frames.run_files(paths):
        run = load_run(path)
        reasons: dict = {}
        verdicts, _ = judge(run.cases, thresholds, tags_of=_registered_tags, reasons=reasons)
        meta = frames.run_record(run)
        columns += [k for k in meta if k not in columns]
        rows = (frames.test_point_records(run.cases, verdicts) if per_test
                else frames.case_records(run.cases, verdicts, reasons))
        records += [{**r, **meta} for r in rows]
    return _frame(records, columns)


def _checked_estimators(estimators) -> list[tuple[Any, str]]:
    """(what to evaluate, its label) per estimator, every spec and instance checked up front."""
    from influence_bench.api.arguments import check_arguments, create, estimator_label, expand_specs
    from influence_bench.api.estimator import Estimator
    from influence_bench.api.registry import REGISTRY
    from influence_bench.errors import RegistryError

    items = [estimators] if isinstance(estimators, (str, Estimator)) else list(estimators)
    items = [x for group in (expand_specs([i]) if isinstance(i, str) else [i] for i in items) for x in group]
    if not items:
        raise ValueError("no estimator given: pass a name, a spec like 'lissa(depth=500)' or an Estimator")
    jobs = []
    for item in items:
        if isinstance(item, str):
            jobs.append((item, estimator_label(create(item))))  # RegistryError naming the name or field
            continue
        if not isinstance(item, Estimator):
            raise TypeError(f"estimator {item!r}: expected a name, a spec like 'lissa(depth=500)' or an "
                            "influence_bench.Estimator instance")
        registered = REGISTRY.get(item.name)  # RegistryError when the name is not registered
        if type(item) is not registered:
            raise RegistryError(f"estimator instance of {type(item).__module__}.{type(item).__qualname__} is named "
                                f"{item.name!r}, which is registered to {registered.__module__}."
                                f"{registered.__qualname__}; register the class under a name of its own "
                                "(influence_bench.register)")
        check_arguments(type(item), _init_values(item))  # its field values have the declared types
        jobs.append((item, estimator_label(item)))
    labels = [label for _, label in jobs]
    if len(set(labels)) < len(labels):
        raise ValueError(f"an estimator is given twice: {', '.join(labels)}")
    return jobs


def _init_values(est) -> dict:
    import dataclasses

    return {f.name: getattr(est, f.name) for f in dataclasses.fields(est) if f.init} \
        if dataclasses.is_dataclass(est) else {}


def _checked_device(device: str) -> str:
    from influence_bench.devices import check_device

    try:
        return check_device(device)
    except ValueError as exc:
        msg = str(exc).replace("--device cpu", "device='cpu'")
        raise ValueError(f"device {msg}") from None


def _registered_tags(name: str) -> frozenset:
    """``session.registered_tags``, imported (with torch) only when an old case lacks its tags."""
    from influence_bench.api.registry import registered_tags

    return registered_tags(name)


def _frame(records: list[dict], columns: list[str]) -> "pd.DataFrame":
    import pandas as pd

    return pd.DataFrame.from_records(records, columns=columns)
