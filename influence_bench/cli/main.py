"""The ``influence-bench`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from influence_bench.cli.options import CommandError, check_parsed, device, nonnegative_float, positive_int
from influence_bench.errors import RegistryError, Terminated
from influence_bench.paths import repo_root
from influence_bench.spec import catalog
from influence_bench.spec.settings import TIERS
from influence_bench.trust import TRUST_ENV, TRUST_FLAG, _truthy


def estimator_summary(cls) -> str:
    """The first sentence of the class docstring, else of its module's (dataclasses invent a class
    doc), without a leading ````name````: that repeats the estimator's name."""
    import re

    for doc in (cls.__doc__, sys.modules[cls.__module__].__doc__):
        if doc and not doc.startswith(f"{cls.__name__}("):
            para = " ".join(doc.strip().split("\n\n")[0].split())
            para = re.sub(rf"^``{re.escape(cls.name)}``:\s*", "", para)
            m = re.match(r"(.+?(?<!et al)(?<!e\.g)(?<!i\.e)\.)(\s+[A-Z(]|$)", para)
            return m.group(1) if m else para
    return ""


def _list(args) -> int:
    from influence_bench.reporting.render import Column, Table, render, terminal_width

    width = terminal_width(args.wide)
    if args.what == "estimators":
        from influence_bench.api.registry import REGISTRY

        table = Table([Column("name", "estimator"), Column("tags", "tags", flex=True),
                       Column("about", "what it is", flex=True)],
                      fields=["name", "tags", "about", "status"])
        for name in REGISTRY.names():
            cls = REGISTRY.get(name)
            table.rows.append({"name": name, "tags": ", ".join(sorted(cls.tags)) or "-", "about": estimator_summary(cls),
                               "status": "loaded"})
        for failure in REGISTRY.failures:  # the others are listed; each broken plug-in is one row
            table.rows.append({"name": failure.name, "tags": "NOT LOADED", "about": str(failure),
                               "status": "not loaded"})
    else:
        table = Table([Column("id", "setting"), Column("tier", "tier"), Column("version", "v", "right"),
                       Column("spec_hash", "spec hash"), Column("description", "description", flex=True)])
        for s in catalog.select(tier=args.tier):
            table.rows.append({"id": s.id, "tier": s.tier, "version": s.version, "spec_hash": s.spec_hash,
                               "description": s.description})
    print(render(table, args.format, width))
    return 0


def _score(args) -> int:
    from influence_bench.api.arguments import create, estimator_label, expand_specs
    from influence_bench.cli.bars import ScoreBar
    from influence_bench.data.datasets import DataUnavailable
    from influence_bench.reporting.render import terminal_width
    from influence_bench.scoring.session import ScoringSession

    # every spec is checked (name, fields, types) before anything runs: a usage error, exit 2
    if args.test_points and args.format != "table":
        raise CommandError(f"--test-points is a second table; with --format {args.format} stdout holds one "
                           "document: use the Python API's influence_bench.score(..., per_test=True)")
    args.estimator = expand_specs(args.estimator)  # 'dattri:*': the registered names it matches
    labels = [estimator_label(create(spec)) for spec in args.estimator]
    if len(set(labels)) < len(labels):
        raise CommandError(f"an estimator is given twice: {', '.join(labels)}")
    settings = catalog.select(args.settings, tier=args.tier)
    if not settings:
        print(f"influence-bench: no setting matches {args.settings} in tier {args.tier!r}", file=sys.stderr)
        return 2
    from influence_bench.scoring.isolation import Limits

    try:
        limits = Limits.parse(args.time_limit, args.memory_limit, args.isolation)
    except ValueError as exc:
        print(f"influence-bench: {exc}", file=sys.stderr)
        return 2
    from influence_bench.reporting.schema import RunFileError
    from influence_bench.scoring.session import ResultsDirError

    session, skipped, broken = ScoringSession(args.device, limits=limits), [], []
    try:
        run_path = session.begin(Path(args.results_dir), extra={"tier": args.tier},
                                 resume=Path(args.resume) if args.resume else None)
    except (ResultsDirError, RunFileError) as exc:
        print(f"influence-bench: {exc}", file=sys.stderr)
        return 2
    jobs = [(s.with_mode(args.mode) if args.mode else s, spec, label) for s in settings
            for spec, label in zip(args.estimator, labels)]
    protocols = tuple(args.protocol) if args.protocol else None
    with _stop_on_sigterm(), ScoreBar(len(jobs), enabled=False if args.no_progress else None) as bar:
        try:
            for i, (s, spec, label) in enumerate(jobs, 1):
                session.select(label, s, protocols)
                if session.done(label, s, protocols):
                    bar.say(f"{label} on {s.id}: already in {args.resume}")
                    continue
                bar.start(i, label, s.id, s.ground_truth.mode)
                try:
                    session.evaluate(spec, s, protocols=protocols)
                except DataUnavailable as exc:
                    skipped.append(f"{s.id}: {exc}")
                    session.not_run(label, s, f"data unavailable: {exc}")
                except KeyboardInterrupt:  # Ctrl-C or SIGTERM (errors.Terminated)
                    raise
                except Exception as exc:  # the harness itself failed on this setting: say so, go on with the rest
                    if _debug():
                        raise
                    first = (str(exc).strip().splitlines() or [""])[0][:300]
                    broken.append(f"{s.id}: {type(exc).__name__}: {first}")
                    session.not_run(label, s, f"{type(exc).__name__}: {first}")
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (errors.Terminated)
            why = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C (SIGINT)"
            path = session.write_run(Path(args.results_dir), extra={"tier": args.tier}, partial=f"stopped by {why}")
            kept = (f"{len(session.cases)} finished case(s) kept in {path}; continue with --resume {path}"
                    if path is not None else f"nothing had finished; nothing written ({run_path} not created)")
            print(f"influence-bench: stopped by {why}: {kept}", file=sys.stderr)
            return 143 if isinstance(exc, Terminated) else 130
    cases = session.cases
    _, failures = session.judge()
    reference = [] if args.no_baseline else _reference_cases(args.baseline, cases, labels)
    width = terminal_width(args.wide)
    print(session.table(reference, show_reference=args.show_baseline, fmt=args.format, width=width))
    if args.test_points:
        from influence_bench.reporting.table import test_point_table

        print(test_point_table(cases, args.format, width))
    if args.format == "table":
        from influence_bench.reporting.render import wrap_lines

        lines = []
        if reference:
            shown = "shown with \u2020" if args.show_baseline else "--show-baseline shows their rows"
            lines.append(f"ranks: among the other estimators' rows in the baseline {_baseline_path(args.baseline)} "
                         f"(not recomputed; {shown})")
        lines += ([f"skipped (data missing) {line}" for line in skipped]
                  + [f"ERROR (harness, not the estimator) {line}" for line in broken])
        if failures:
            lines.append(f"FAIL: {len(failures)} floor(s) failed; each is said under its row")
        print("\n".join(wrap_lines(lines, width)) if lines else "", end="\n" if lines else "")
    else:  # machine formats: stdout holds the data alone; the verdict lines go to stderr
        for line in [f"skipped (data missing) {x}" for x in skipped] + [f"ERROR (harness) {x}" for x in broken] \
                + [f"FAIL {x}" for x in failures]:
            print(line, file=sys.stderr)
    path = session.write_run(Path(args.results_dir), extra={"tier": args.tier})
    if path is not None:
        print(f"results written to {path}", file=sys.stdout if args.format == "table" else sys.stderr)
    return 1 if failures or broken or any(c.status == "error" for c in cases) else 0


def _debug() -> bool:
    """``--debug`` (``main`` sets the variable) or ``INFLUENCE_BENCH_DEBUG``, read as ``main`` reads it."""
    return _truthy(os.environ.get("INFLUENCE_BENCH_DEBUG"))


class _stop_on_sigterm:
    """While scoring, SIGTERM raises ``Terminated`` (the main thread only; elsewhere nothing changes)."""

    def __enter__(self):
        import signal
        import threading

        self.old = None
        if threading.current_thread() is threading.main_thread():
            def stop(signum, frame):
                raise Terminated()

            self.old = signal.signal(signal.SIGTERM, stop)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def _baseline_path(given: str | None) -> Path | None:
    if given:
        return Path(given)
    root = repo_root()
    return root / "results" / "baseline.json" if root is not None else None


def _reference_cases(given: str | None, cases: list, estimators: list[str]) -> list:
    """The baseline's cases of the other estimators on the same settings (same spec hash) and protocols."""
    from influence_bench.reporting.schema import RunFileError, load_run

    path = _baseline_path(given)
    alone = f"showing {', '.join(estimators)} alone"
    if path is None or not path.is_file():
        if given:
            print(f"influence-bench: baseline {path} not found; {alone}", file=sys.stderr)
        return []
    try:
        base = load_run(path)
    except RunFileError as exc:
        print(f"influence-bench: {exc}; {alone}", file=sys.stderr)
        return []
    here = {(c.setting, c.spec_hash, c.protocol) for c in cases}
    return [c for c in base.cases if c.estimator not in estimators and (c.setting, c.spec_hash, c.protocol) in here]


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
    if args.format == "table":
        from influence_bench.reporting.render import terminal_width, wrap_lines

        print("\n".join(wrap_lines(format_comparison(res, args.run, args.baseline).splitlines(),
                                   terminal_width(args.wide))))
    else:
        from influence_bench.reporting.render import Column, Table, render

        table = Table([Column("section", "section"), Column("case", "case"), Column("detail", "detail", flex=True)])
        for name in res.SECTIONS:
            table.rows += [{"section": name, "case": f.label, "detail": f.detail} for f in getattr(res, name)]
        table.rows += [{"section": "empty_gate", "case": g, "detail": "compared no case"} for g in res.empty_gates]
        table.rows.append({"section": "verdict", "case": "GATE FAILED" if res.failed else "gate passed",
                           "detail": f"{res.unchanged} within tolerance or noise"})
        print(render(table, args.format))
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
    import torch

    if args.what == "methods":
        return _bench_methods(args)
    if len(args.setting) != 1:
        raise CommandError(f"bench ground-truth takes one setting, got {len(args.setting)}")
    args.setting = args.setting[0]

    from influence_bench.api.loading import get_context
    from influence_bench.data.datasets import DataUnavailable
    from influence_bench.groundtruth import bench as gt_bench
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
    rtol = args.rtol if args.rtol is not None else (1e-6 if ctx.dtype == torch.float64 else 1e-4)
    failures = gt_bench.problems(r, rtol)
    for line in failures:
        print(f"FAIL: {line}")
    return 1 if failures else 0


def _bench_methods(args) -> int:
    import json

    import torch

    from influence_bench.api.arguments import expand_specs
    from influence_bench.reporting.render import Column, Table, render, terminal_width
    from influence_bench.scoring.method_bench import DEFAULT_SETTINGS, default_estimators, per_method, time_estimators

    settings = catalog.select(args.setting or list(DEFAULT_SETTINGS), tier=None)
    if not settings:
        raise CommandError(f"no setting matches {args.setting}")
    names = expand_specs(args.estimator) if args.estimator else default_estimators()
    if not names:
        raise CommandError("no method has a peer implementation registered; install the peer libraries' adapters: "
                           "pip install -e 'plugins/peers[all]' (README: peer libraries)")
    from influence_bench.scoring.isolation import Limits

    try:
        limits = Limits.parse(args.time_limit)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    torch.set_num_threads(args.threads)
    timed = time_estimators(settings, names, args.repeats, args.device, limits=limits,
                            log=lambda line: print(f"influence-bench: {line}", file=sys.stderr))
    rows = per_method(timed)

    def sec(v):
        return "n/a" if v is None else f"{v:.3g}"

    def rho(v):
        return "n/a" if v is None else f"{v:.3f}"

    table = Table([Column("method", "method"), Column("ours", "ours"), Column("ours_time_s", "s", "right", sec),
                   Column("ours_spearman", "Spearman", "right", rho), Column("peer", "fastest peer", flex=True),
                   Column("peer_time_s", "s", "right", sec), Column("peer_spearman", "Spearman", "right", rho),
                   Column("ratio", "ours/peer", "right", lambda v: "n/a" if v is None else f"{v:.2f}")],
                  group_key="setting")
    for r in rows:
        note = f"peers that failed: {', '.join(r['failed_peers'])}" if r["failed_peers"] else ""
        table.rows.append({**r, **({"_note": note} if note else {})})
    table.notes.append(f"time: fastest of {args.repeats} calls, {args.threads} torch thread(s); Spearman: mean over "
                       "test points on loo-fixed; ours/peer <= 1: ours at least as fast")
    print(render(table, "table", terminal_width(False)))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "timed": [dict(vars(t), library=t.library)
                                                                         for t in timed]}, indent=2))
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the option, and where the usage is, instead of the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n{self.prog}: `{self.prog} --help` shows the usage\n")


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("influence-bench")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        from influence_bench import __version__

        return __version__


def _output_options(parser) -> None:
    from influence_bench.reporting.render import FORMATS

    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="table (default: fits 100 columns), markdown, csv or json (stdout holds the data alone)")
    parser.add_argument("--wide", action="store_true", help="tables as wide as their content (every column)")


EPILOGS = {
    "main": """examples:
  influence-bench list estimators
  influence-bench score exact --settings 'iris-*'
  influence-bench score 'lissa(depth=500,scale=10)' cg --settings iris-logreg-wd1e-3 --format csv
  influence-bench compare results/runs/run-XXXX.json --baseline results/baseline.json
  influence-bench report results/runs/run-XXXX.json --html report/

`influence-bench COMMAND --help` shows a command's options; docs/protocol.md the protocol.""",
    "list": """examples:
  influence-bench list estimators
  influence-bench list settings --tier smoke --format markdown""",
    "score": """examples:
  influence-bench score exact --settings 'iris-*'
  influence-bench score 'lissa(depth=500,scale=10)' cg --settings iris-logreg-wd1e-3
  influence-bench score my-estimator --trust-cwd-estimators --tier smoke --format json > scores.json
  influence-bench score trak --settings 'cifar10-5k-*' --tier standard
  influence-bench score trak --tier standard --resume results/runs/run-XXXX.jsonl

Each case is judged against thresholds.toml (pass, FAIL, xfail); the exit status is 1 when
one fails. A killed run keeps what finished in results/runs/run-*.jsonl: --resume picks up
the rest.""",
    "compare": """examples:
  influence-bench compare results/runs/run-XXXX.json --gate spearman:-0.05 --gate time:+25%
  influence-bench compare results/runs/run-XXXX.json --baseline results/baseline.json --format json""",
}


GLOBAL_FLAGS = ("--debug", TRUST_FLAG)  # accepted anywhere on the command line (``main`` takes them out)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="influence-bench", description=__doc__, epilog=EPILOGS["main"],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"influence-bench {_version()}")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of a failure instead of its one-line message "
                        "(also: INFLUENCE_BENCH_DEBUG=1)")
    p.add_argument(TRUST_FLAG, action="store_true",
                   help=f"import the estimator plug-ins in ./estimators of the working directory (their code runs; "
                        f"also: {TRUST_ENV}=1, or trust-cwd-estimators = true under [tool.influence-bench] in "
                        "./pyproject.toml). Without it they are not imported")
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="list estimators or settings", epilog=EPILOGS["list"],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ls.add_argument("what", choices=["estimators", "settings"])
    ls.add_argument("--tier", choices=TIERS, default=None)
    _output_options(ls)
    ls.set_defaults(func=_list)

    sc = sub.add_parser("score", help="fidelity table of estimators on the selected settings", epilog=EPILOGS["score"],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sc.add_argument("estimator", nargs="+", metavar="ESTIMATOR",
                    help="a registered name, or NAME(field=value,...) with hyperparameters, e.g. 'lissa(depth=500)' "
                         "(quote it for the shell), or a glob of names ('dattri:*'); several are scored one after "
                         "the other")
    sc.add_argument("--settings", action="append", default=None, metavar="GLOB",
                    help="setting ids or globs (repeatable); default: all of the tier")
    sc.add_argument("--tier", choices=TIERS, default="smoke")
    sc.add_argument("--device", type=device, default="cpu", help="cpu (default), cuda or cuda:N")
    sc.add_argument("--protocol", action="append", default=None, choices=["loo-fixed", "loo-topk", "lds"],
                    help="protocol (repeatable); default: the setting's (loo-fixed and loo-topk; loo-fixed alone on CNNs)")
    sc.add_argument("--mode", choices=["warm", "scratch", "pbrf"], default=None,
                    help="ground-truth mode (default: each setting's own, warm)")
    sc.add_argument("--results-dir", default="results", help="run files go to DIR/runs/ (default: ./results)")
    sc.add_argument("--baseline", default=None, metavar="FILE",
                    help="show the other estimators' rows from this run file (default: the checkout's "
                         "results/baseline.json, when there is one)")
    sc.add_argument("--no-baseline", action="store_true", help="no baseline: neither ranks nor rows")
    sc.add_argument("--show-baseline", action="store_true",
                    help="also print the baseline's rows of the other estimators (marked \u2020), not only the ranks")
    sc.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal)")
    _output_options(sc)
    sc.add_argument("--time-limit", action="append", default=[], metavar="[NAME=]SECONDS",
                    help="time limit of one estimator call (default 3600 s or the class's time_limit_s); a call "
                         "past it is stopped and its case is an error")
    sc.add_argument("--memory-limit", action="append", default=[], metavar="[NAME=]MB",
                    help="memory one estimator call may add (default: the machine's physical memory; Linux, CPU)")
    sc.add_argument("--isolation", choices=["inline", "process"], default=None,
                    help="inline (default): guarded calls in this process; process: each call in a forked worker "
                         "(survives segfaults and hangs in C code; one torch thread, times not comparable)")
    sc.add_argument("--resume", default=None, metavar="RUN",
                    help="continue a run stopped early (its run-*.json, or the run-*.jsonl journal a killed run "
                         "leaves): its cases are kept, the missing ones scored, and the same run file completed")
    sc.add_argument("--test-points", action="store_true",
                    help="also print Pearson/Spearman at the highest- and the median-loss test point apart")
    sc.set_defaults(func=_score)

    from influence_bench.cli import groundtruth as cli_groundtruth

    cli_groundtruth.add_parser(sub)

    cp = sub.add_parser("compare", help="regression gate: compare a run file against a baseline",
                        epilog=EPILOGS["compare"], formatter_class=argparse.RawDescriptionHelpFormatter)
    _output_options(cp)
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

    from influence_bench.cli import report as cli_report

    cli_report.add_parser(sub)

    be = sub.add_parser("bench", help="benchmarks: `bench ground-truth SETTING` (batched engine vs sequential "
                                      "loop), `bench methods [SETTING ...]` (ours vs the fastest peer library)")
    be.add_argument("what", choices=["ground-truth", "methods"])
    be.add_argument("setting", metavar="SETTING", nargs="*",
                    help="ground-truth: one setting; methods: settings (default: iris-mlp-d2-w16-wd1e-3 "
                         "mnist5k-logreg-wd1e-3)")
    be.add_argument("--estimator", action="append", default=[], metavar="NAME",
                    help="methods: estimators or globs to time (repeatable; default: every method that a peer "
                         "library implements, ours and the peers')")
    be.add_argument("--repeats", type=positive_int, default=3, help="methods: calls timed per estimator (fastest "
                                                                     "counts; default 3)")
    be.add_argument("--threads", type=positive_int, default=1, help="methods: torch threads (default 1)")
    be.add_argument("--time-limit", action="append", default=[], metavar="[NAME=]SECONDS",
                    help="methods: stop a call past this (repeatable; the case is then an error naming the limit)")
    be.add_argument("--n", type=positive_int, default=None, help="first N removals of the loo-fixed set (default: all)")
    be.add_argument("--device", type=device, default="cpu", help="cpu (default), cuda or cuda:N")
    be.add_argument("--rtol", type=nonnegative_float, default=None,
                    help="largest disagreement allowed, relative to the largest |delta| (default 1e-6 for float64 "
                         "settings; 1e-4 for float32 ones, whose hundreds of SGD steps amplify the rounding of "
                         "a differently ordered reduction, e.g. vmap's grouped convolutions)")
    be.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")
    be.set_defaults(func=_bench)

    da = sub.add_parser("data", help="datasets: `data prepare NAME` downloads through torchvision -> <root>/NAME.npz")
    da.add_argument("action", choices=["prepare"])
    da.add_argument("name", choices=["mnist", "cifar10"])
    da.add_argument("--root", default=None, help="data root (default: $INFLUENCE_BENCH_DATA or the user cache)")
    da.set_defaults(func=_data)
    return p


def _take_global_flags(argv: list[str]) -> tuple[list[str], set[str]]:
    """``GLOBAL_FLAGS`` wherever they stand (before ``--``), taken out of ``argv``."""
    rest, given = [], set()
    for i, a in enumerate(argv):
        if a == "--":
            rest += argv[i:]
            break
        if a in GLOBAL_FLAGS:
            given.add(a)
        else:
            rest.append(a)
    return rest, given


def _first_line(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) else str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _path_in_traceback(exc: BaseException) -> str | None:
    """The file an OSError without a file name (ENOSPC) was about: the innermost frame holding a path
    (``Path.write_text``'s ``self``) or an open file under a usual name."""
    import io

    tb, frames = exc.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for key in ("self", "path", "tmp", "file", "fh", "f", "fid", "filename", "out"):
            value = frame.f_locals.get(key)
            if isinstance(value, os.PathLike):
                return os.fspath(value)
            if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str):
                return value.name
    return None


def _os_error(exc: OSError) -> str:
    import errno

    from influence_bench.paths import cache_dir

    path = exc.filename if exc.filename is not None else _path_in_traceback(exc)
    what = exc.strerror or _first_line(exc)
    if exc.errno == errno.ENOSPC:
        where = f"writing {path}" if path is not None else f"(the cache is {cache_dir()})"
        return (f"no space left on device {where}: free some space, or write elsewhere "
                "(--results-dir / --out, INFLUENCE_BENCH_CACHE)")
    if path is not None:
        other = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return f"{path}{other}: {what}"
    return f"{type(exc).__name__}: {what}"


def describe_error(exc: BaseException, command: str | None = None) -> tuple[int, list[str]]:
    """Exit status and the one or two lines that say what failed: 2 for a usage error (a bad option,
    an unknown name), 1 for anything else."""
    from influence_bench.data.datasets import DataUnavailable
    from influence_bench.errors import EstimatorError, EstimatorUnsupported
    from influence_bench.models.init_weights import InitWeightsError
    from influence_bench.reporting.gates import GateSpecError
    from influence_bench.reporting.schema import RunFileError
    from influence_bench.spec.catalog import UnknownSetting
    from influence_bench.spec.thresholds import ThresholdsError

    usage = (RegistryError, UnknownSetting, GateSpecError, CommandError)
    if isinstance(exc, usage):
        return 2, [_first_line(exc)]
    if command == "ground-truth" and (type(exc) is ValueError or type(exc).__name__ == "RayUnavailable"):
        return 2, [_first_line(exc)]  # the ground-truth commands' own checks (ship, ray)
    if isinstance(exc, OSError):
        return 1, [_os_error(exc)]
    said = (DataUnavailable, InitWeightsError, RunFileError, ThresholdsError, EstimatorError, EstimatorUnsupported)
    if isinstance(exc, said) or type(exc).__module__.startswith("influence_bench"):
        return 1, [_first_line(exc)]
    return 1, [f"{type(exc).__name__}: {_first_line(exc)}",
               "an unexpected failure; `influence-bench --debug ...` (or INFLUENCE_BENCH_DEBUG=1) shows the traceback"]


def _quiet_stdout() -> None:
    """After a closed pipe (``... | head``): what is still buffered goes to /dev/null, not into a second
    BrokenPipeError at exit (the recipe of Python's signal docs)."""
    if sys.stdout is not sys.__stdout__:
        return
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _say(lines: list[str]) -> None:
    try:
        for line in lines:
            print(f"influence-bench: {line}", file=sys.stderr)
    except (BrokenPipeError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """The command line (see ``_main``); the environment variables ``--debug`` and
    ``--trust-cwd-estimators`` set for the command's own processes are put back afterwards, so a
    caller running several commands in one process (the tests) gets no flag it did not give."""
    saved = {k: os.environ.get(k) for k in ("INFLUENCE_BENCH_DEBUG", TRUST_ENV)}
    try:
        return _main(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _main(argv: list[str] | None = None) -> int:
    """Every failure ends here as one or two lines naming what failed and what to do, exit 2 for a
    usage error and 1 otherwise (``--debug`` or INFLUENCE_BENCH_DEBUG=1: the traceback instead);
    Ctrl-C: one line, exit 130; stdout closed by the reader (``| head``): quietly, exit 141."""
    import traceback
    import warnings

    # torch's own deprecation notice on importing torchvision's scripted ops: not the user's business
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    argv, flags = _take_global_flags(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in flags or _truthy(os.environ.get("INFLUENCE_BENCH_DEBUG"))
    if "--debug" in flags:
        os.environ["INFLUENCE_BENCH_DEBUG"] = "1"  # the commands' own guards (and child processes) see it too
    if TRUST_FLAG in flags:
        os.environ[TRUST_ENV] = "1"  # processes started from here (Ray workers) decide alike
    command, said = None, []
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        bad = check_parsed(args)  # options of commands whose parsers do not check them (`type=`)
        if bad:
            raise CommandError(bad)
        rc = args.func(args) or 0
        sys.stdout.flush()
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM where a command turns it into one (errors.Terminated)
        if debug:
            traceback.print_exc()
        term = type(exc).__name__ == "Terminated"
        _say(["stopped by SIGTERM" if term else "interrupted (Ctrl-C)"])
        # CPython marks a KeyboardInterrupt that left an exec() of a string (dataclasses build their
        # methods so, e.g. while torch imports) as unhandled even though it is caught here, and
        # `python -m` then ends by killing itself with SIGINT (exit -2, not 130); every exec() of a
        # string clears that mark first, so an empty one does
        exec("", {})  # noqa: S102
        return 143 if term else 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except Exception as exc:  # noqa: BLE001 - the one error path: every failure is said, not dumped
        rc, said = describe_error(exc, command)
        if debug:
            traceback.print_exc()
        else:
            _say(said)
    registry = sys.modules.get("influence_bench.api.registry")  # loaded: the command used plug-ins
    reg = registry.REGISTRY if registry is not None else None
    notes = [] if reg is None else list(reg.notes) + ([str(f) for f in reg.failures] if command != "list" else [])
    _say([n for n in notes if not any(n in line for line in said)])
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
