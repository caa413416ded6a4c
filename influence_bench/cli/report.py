"""``influence-bench report``: a Markdown page with PNG figures from run files."""

from __future__ import annotations

import sys
from pathlib import Path


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


def add_parser(sub) -> None:
    rp = sub.add_parser("report", help="Markdown report with PNG figures from run files")
    rp.add_argument("runs", nargs="*", metavar="RUN.json", help="default: the newest run in --results-dir")
    rp.add_argument("--out", required=True, metavar="DIR")
    rp.add_argument("--results-dir", default="results")
    rp.set_defaults(func=_report)
