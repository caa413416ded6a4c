"""``influence-bench report``: a Markdown page (``--out``) and / or a static HTML page (``--html``)
with PNG figures from run files."""

from __future__ import annotations

import sys
from pathlib import Path


def _report(args) -> int:
    from influence_bench.reporting.schema import RunFileError, load_run

    if not args.out and not args.html:
        print("influence-bench report: give --out DIR (Markdown report), --html DIR (HTML page), or both",
              file=sys.stderr)
        return 2
    paths = args.runs or sorted(Path(args.results_dir, "runs").glob("run-*.json"))[-1:]
    if not paths:
        print(f"influence-bench: no run files given and none in {args.results_dir}/runs", file=sys.stderr)
        return 2
    try:
        runs = [load_run(p) for p in paths]
    except RunFileError as exc:
        print(f"influence-bench: {exc}", file=sys.stderr)
        return 2
    for folder, module, writer in ((args.out, "report", "write_report"), (args.html, "html", "write_html")):
        if folder:
            try:
                mod = __import__(f"influence_bench.reporting.{module}", fromlist=[writer])
                page = getattr(mod, writer)(runs, Path(folder))
            except OSError as exc:
                print(f"influence-bench report: cannot write to {folder} ({exc.strerror or exc}); choose another "
                      "folder", file=sys.stderr)
                return 2
            print(f"report written to {page}")
    return 0


def add_parser(sub) -> None:
    rp = sub.add_parser("report", help="Markdown and/or static HTML report with PNG figures from run files")
    rp.add_argument("runs", nargs="*", metavar="RUN.json", help="default: the newest run in --results-dir")
    rp.add_argument("--out", metavar="DIR", help="write DIR/report.md and its PNGs")
    rp.add_argument("--html", metavar="DIR", help="write DIR/index.html (self-contained offline: inline CSS/JS, "
                                                  "PNGs beside it)")
    rp.add_argument("--results-dir", default="results")
    rp.set_defaults(func=_report)
