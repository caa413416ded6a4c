"""The ``influence-bench`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from influence_bench.api.registry import REGISTRY, RegistryError
from influence_bench.paths import repo_root
from influence_bench.spec import catalog
from influence_bench.spec.settings import TIERS


def estimator_summary(cls) -> str:
    """First line of the class docstring, else of its module's (dataclasses invent a class doc)."""
    for doc in (cls.__doc__, sys.modules[cls.__module__].__doc__):
        if doc and not doc.startswith(f"{cls.__name__}("):
            return doc.strip().splitlines()[0]
    return ""


def _list(args) -> int:
    if args.what == "estimators":
        for name in REGISTRY.names():
            cls = REGISTRY.get(name)
            doc = estimator_summary(cls)
            tags = ",".join(sorted(cls.tags)) or "-"
            print(f"{name:<16} {tags:<16} {doc}")
    else:
        for s in catalog.select(tier=args.tier):
            print(f"{s.id:<28} {s.tier:<8} v{s.version} {s.spec_hash}  {s.description}")
    return 0


def _score(args) -> int:
    from influence_bench.data.datasets import DataUnavailable
    from influence_bench.scoring.session import ScoringSession

    try:
        REGISTRY.get(args.estimator)
        settings = catalog.select(args.settings, tier=args.tier)
    except (RegistryError, KeyError) as exc:
        print(f"influence-bench: {exc}", file=sys.stderr)
        return 2
    if not settings:
        print(f"influence-bench: no setting matches {args.settings} in tier {args.tier!r}", file=sys.stderr)
        return 2
    session, skipped = ScoringSession(args.device), []
    for s in settings:
        s = s.with_mode(args.mode) if args.mode else s
        print(f"scoring {args.estimator} on {s.id} ({s.ground_truth.mode} ground truth) ...", file=sys.stderr, flush=True)
        protocols = tuple(args.protocol) if args.protocol else None
        session.select(args.estimator, s, protocols)
        try:
            session.evaluate(args.estimator, s, protocols=protocols)
        except DataUnavailable as exc:
            skipped.append(f"{s.id}: {exc}")
            session.not_run(args.estimator, s, f"data unavailable: {exc}")
    cases = session.cases
    _, failures = session.judge()
    reference = [] if args.no_baseline else _reference_cases(args.baseline, cases, args.estimator)
    print(session.table(reference))
    if args.test_points:
        from influence_bench.reporting.table import test_point_table

        print(test_point_table(cases))
    if reference:
        print(f"other estimators' rows: from the baseline {_baseline_path(args.baseline)} (not recomputed)")
    for line in skipped:
        print(f"skipped (data missing) {line}")
    for line in failures:
        print(f"FAIL {line}")
    path = session.write_run(Path(args.results_dir), extra={"tier": args.tier})
    if path is not None:
        print(f"results written to {path}")
    return 1 if failures or any(c.status == "error" for c in cases) else 0


def _baseline_path(given: str | None) -> Path | None:
    if given:
        return Path(given)
    root = repo_root()
    return root / "results" / "baseline.json" if root is not None else None


def _reference_cases(given: str | None, cases: list, estimator: str) -> list:
    """The baseline's cases of the other estimators on the same settings (same spec hash) and protocols."""
    from influence_bench.reporting.schema import RunFileError, load_run

    path = _baseline_path(given)
    if path is None or not path.is_file():
        if given:
            print(f"influence-bench: baseline {path} not found; showing {estimator} alone", file=sys.stderr)
        return []
    try:
        base = load_run(path)
    except RunFileError as exc:
        print(f"influence-bench: {exc}; showing {estimator} alone", file=sys.stderr)
        return []
    here = {(c.setting, c.spec_hash, c.protocol) for c in cases}
    return [c for c in base.cases if c.estimator != estimator and (c.setting, c.spec_hash, c.protocol) in here]


def _compare(args) -> int:
    from influence_bench.reporting.gates import (
        GateSpecError,
        compare_runs,
        format_comparison,
        load_gate_file,
        parse_gate,
    )
    from influence_bench.reporting.schema import RunFileError

    try:  # a bad SPEC, an unreadable file, no cases or an impossible value: exit 2, never a pass
        gates = [parse_gate(g) for g in args.gate]
        run, baseline = load_gate_file(args.run, "run file"), load_gate_file(args.baseline, "baseline")
        res = compare_runs(run, baseline, gates)
    except (GateSpecError, RunFileError) as exc:
        print(f"influence-bench: {exc}", file=sys.stderr)
        return 2
    print(format_comparison(res, args.run, args.baseline))
    return 1 if res.failed else 0


def _baseline(args) -> int:
    from influence_bench.reporting.gates import load_gate_file, merge_baseline, write_baseline
    from influence_bench.reporting.schema import RunFileError, load_run

    try:  # a run a gate could not use (no cases, NaN, impossible values) makes no baseline either
        runs = [load_gate_file(p, "run file") for p in args.runs]
    except RunFileError as exc:
        print(f"influence-bench: {exc}", file=sys.stderr)
        return 2
    out, existing = Path(args.out), None
    if out.exists():
        try:
            existing = load_run(out)
        except RunFileError as exc:  # unreadable: nothing in it to keep
            print(f"influence-bench: note: replacing an unreadable baseline: {exc}", file=sys.stderr)
    merged, replaced = merge_baseline(runs, existing)  # later runs win per case
    if replaced and not args.allow_errors:
        more = f" (and {len(replaced) - 1} more)" if len(replaced) > 1 else ""
        print(f"influence-bench: baseline update refused: {replaced[0]}{more}; a failed run must not replace a "
              f"good baseline value: rerun it, or pass --allow-errors to write the errors", file=sys.stderr)
        return 1
    for line in replaced[:5] + ([f"... and {len(replaced) - 5} more"] if len(replaced) > 5 else []):
        print(f"influence-bench: --allow-errors: {line}", file=sys.stderr)
    for c in merged.cases:  # a gate needs values and CIs; long traces (residual histories) stay in the runs
        c.diagnostics = {k: v for k, v in c.diagnostics.items() if not (isinstance(v, list) and len(v) > 32)}
    merged.extra = {**merged.extra, "baseline_of": [Path(p).name for p in args.runs]}
    try:
        path = write_baseline(out, merged)
    except (OSError, ValueError) as exc:  # ValueError: a NaN deep in a case's diagnostics (JSON has none)
        print(f"influence-bench: cannot write the baseline {out}: {exc} (the old file is unchanged)", file=sys.stderr)
        return 2
    print(f"baseline written to {path} ({len(merged.cases)} cases from {len(runs)} run file(s))")
    return 0


def _report(args) -> int:
    from influence_bench.reporting.report import write_report
    from influence_bench.reporting.schema import RunFileError, load_run

    paths = args.runs or sorted(Path(args.results_dir, "runs").glob("run-*.json"))[-1:]
    if not paths:
        print(f"influence-bench: no run files given and none in {args.results_dir}/runs", file=sys.stderr)
        return 2
    try:
        runs = [load_run(p) for p in paths]
    except RunFileError as exc:
        print(f"influence-bench: {exc}", file=sys.stderr)
        return 2
    page = write_report(runs, Path(args.out))
    print(f"report written to {page}")
    return 0


def _data(args) -> int:
    from influence_bench.data.prepare import prepare

    try:
        path = prepare(args.name, Path(args.root) if args.root else None)
    except (RuntimeError, OSError) as exc:  # no network, torchvision refusing a corrupt copy, ...
        print(f"influence-bench: could not prepare {args.name}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def _bench(args) -> int:
    import json

    import numpy as np

    from influence_bench.api.loading import get_context
    from influence_bench.data.datasets import DataUnavailable
    from influence_bench.groundtruth.bench import bench_ground_truth, format_bench
    from influence_bench.scoring.runner import fixed_removals

    try:
        ctx = get_context(catalog.get_setting(args.setting), args.device)
    except (KeyError, DataUnavailable) as exc:
        print(f"influence-bench: {exc}", file=sys.stderr)
        return 2
    removed = fixed_removals(ctx)
    if args.n is not None:
        removed = removed[:args.n]
    r = bench_ground_truth(ctx, np.asarray(removed))
    print(format_bench(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r.to_json(), indent=2))
    tol = args.rtol * max(r.max_abs_delta, 1e-300)
    if r.max_abs_diff > tol:
        print(f"FAIL: batched and sequential retraining disagree by {r.max_abs_diff:.3g} > {tol:.3g}")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="influence-bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="list estimators or settings")
    ls.add_argument("what", choices=["estimators", "settings"])
    ls.add_argument("--tier", choices=TIERS, default=None)
    ls.set_defaults(func=_list)

    sc = sub.add_parser("score", help="fidelity table for one estimator on the selected settings")
    sc.add_argument("estimator")
    sc.add_argument("--settings", action="append", default=None, metavar="GLOB",
                    help="setting ids or globs (repeatable); default: all of the tier")
    sc.add_argument("--tier", choices=TIERS, default="smoke")
    sc.add_argument("--device", default="cpu")
    sc.add_argument("--protocol", action="append", default=None, choices=["loo-fixed", "loo-topk", "lds"],
                    help="protocol (repeatable); default: the setting's (loo-fixed and loo-topk; loo-fixed alone on CNNs)")
    sc.add_argument("--mode", choices=["warm", "scratch", "pbrf"], default=None,
                    help="ground-truth mode (default: each setting's own, warm)")
    sc.add_argument("--results-dir", default="results", help="run files go to DIR/runs/ (default: ./results)")
    sc.add_argument("--baseline", default=None, metavar="FILE",
                    help="show the other estimators' rows from this run file (default: the checkout's "
                         "results/baseline.json, when there is one)")
    sc.add_argument("--no-baseline", action="store_true", help="show only ESTIMATOR's rows")
    sc.add_argument("--test-points", action="store_true",
                    help="also print Pearson/Spearman at the highest- and the median-loss test point apart")
    sc.set_defaults(func=_score)

    from influence_bench.cli import groundtruth as cli_groundtruth

    cli_groundtruth.add_parser(sub)

    cp = sub.add_parser("compare", help="regression gate: compare a run file against a baseline")
    cp.add_argument("run", help="run file (results/runs/run-*.json)")
    cp.add_argument("--baseline", default="results/baseline.json")
    cp.add_argument("--gate", action="append", default=[], metavar="SPEC",
                    help="METRIC:TOLERANCE, e.g. spearman:-0.05 (absolute drop), pearson:-10%%, time:+25%% "
                         "(repeatable; default spearman:-0.05)")
    cp.set_defaults(func=_compare)

    bl = sub.add_parser("baseline", help="write the baseline that `compare` and `--baseline` gate against")
    bl_sub = bl.add_subparsers(dest="action", required=True)
    up = bl_sub.add_parser("update", help="baseline := these run files (later files win per case); refuses to "
                                          "replace a good value with an error or a skip")
    up.add_argument("runs", nargs="+", metavar="RUN.json")
    up.add_argument("--out", default="results/baseline.json",
                    help="written atomically, keeping the existing file's mode (default results/baseline.json)")
    up.add_argument("--allow-errors", action="store_true",
                    help="write even where an error or skipped case replaces a good value (of the file at --out or "
                         "of an earlier run file); without it that is refused (exit 1)")
    up.set_defaults(func=_baseline)

    from influence_bench.cli import paper as cli_paper
    from influence_bench.cli import verdicts as cli_verdicts

    cli_verdicts.add_parsers(sub, bl_sub)
    cli_paper.add_parser(sub)

    rp = sub.add_parser("report", help="Markdown report with PNG figures from run files")
    rp.add_argument("runs", nargs="*", metavar="RUN.json", help="default: the newest run in --results-dir")
    rp.add_argument("--out", required=True, metavar="DIR")
    rp.add_argument("--results-dir", default="results")
    rp.set_defaults(func=_report)

    be = sub.add_parser("bench", help="benchmarks: `bench ground-truth SETTING` (batched engine vs sequential loop)")
    be.add_argument("what", choices=["ground-truth"])
    be.add_argument("setting", metavar="SETTING")
    be.add_argument("--n", type=int, default=None, help="first N removals of the loo-fixed set (default: all)")
    be.add_argument("--device", default="cpu")
    be.add_argument("--rtol", type=float, default=1e-6,
                    help="largest disagreement allowed, relative to the largest |delta| (default 1e-6)")
    be.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")
    be.set_defaults(func=_bench)

    da = sub.add_parser("data", help="datasets: `data prepare NAME` downloads through torchvision -> <root>/NAME.npz")
    da.add_argument("action", choices=["prepare"])
    da.add_argument("name", choices=["mnist", "cifar10"])
    da.add_argument("--root", default=None, help="data root (default: $INFLUENCE_BENCH_DATA or the user cache)")
    da.set_defaults(func=_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "ground-truth":
        return args.func(args)
    from influence_bench.groundtruth.ray_executor import RayUnavailable
    from influence_bench.spec.catalog import UnknownSetting

    try:
        return args.func(args)
    except (UnknownSetting, ValueError, RayUnavailable) as exc:
        print(f"influence-bench: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
