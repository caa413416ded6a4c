"""``influence-bench paper``: reproduce Basu et al. (2021) under its own protocol and the converged
one, and write the side-by-side table, the detail and horizon tables and the figures."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

PARTS = ("iris", "horizon", "mnist")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _run(args) -> int:
    from influence_bench.data.datasets import DataUnavailable
    from influence_bench.paper import study
    from influence_bench.reporting.runfiles import write_run
    from influence_bench.reporting.schema import RunFileError, load_run
    from influence_bench.spec.catalog import UnknownSetting

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_path = out / "paper-run.json"
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        print(f"influence-bench paper: unknown part(s) {bad}; known: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if args.tables_only:
        try:
            run = load_run(run_path)
        except (RunFileError, OSError) as exc:
            print(f"influence-bench paper: --tables-only needs a finished run in {run_path}: {exc}", file=sys.stderr)
            return 2
        cases, agreements = run.cases, [study.Agreement(**a) for a in run.extra.get("paper_agreements", [])]
        return _write(out, cases, agreements, [study.NotRun(**n) for n in run.extra.get("paper_not_run", [])])

    cases, agreements, not_run = [], [], []
    t0 = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    def save(new=()) -> None:  # after every estimator: a killed run keeps what it finished
        cases.extend(new)
        write_run(run_path, cases, {"paper_agreements": [a.to_json() for a in agreements], "paper_parts": parts,
                                    "paper_not_run": [n.to_json() for n in not_run]})

    try:
        if "iris" in parts:
            for fam in ("paper", "converged"):
                settings = study.iris_family(fam, _ints(args.depths), _ints(args.widths), _floats(args.weight_decays))
                study.score(settings, args.estimators.split(","), args.device, protocols=None, progress=progress,
                            on_cases=save, not_run=not_run)
        if "horizon" in parts:
            for base in args.horizon_settings.split(","):
                hp = dict(study.HORIZON_ESTIMATORS)
                ests = [(e, hp.get(e, {})) for e in args.horizon_estimators.split(",") if e]
                _, ags = study.horizon(base, _ints(args.horizons), ests, device=args.device, progress=progress,
                                       on_cases=save)
                agreements.extend(ags)
                save()
        if "mnist" in parts:
            try:
                study.mnist(args.device, progress=progress, on_cases=save)
            except DataUnavailable as exc:  # the Iris parts still make their tables
                progress(f"mnist part not run: {exc}")
    except (UnknownSetting, DataUnavailable, ValueError) as exc:
        print(f"influence-bench paper: {exc}", file=sys.stderr)
        return 2
    save()
    progress(f"done: {len(cases)} cases in {run_path}")
    return _write(out, cases, agreements, not_run)


def _write(out: Path, cases, agreements, not_run) -> int:
    from influence_bench.paper import figures, numbers, tables

    rows = tables.side_by_side(cases)
    figs = [figures.sweep(cases, out, "depth"), figures.sweep(cases, out, "width", numbers.PAPER_WIDTH),
            figures.horizon(cases, agreements, out), figures.test_points(cases, out)]
    md = ["# Basu et al. (2021), reproduced", "",
          "Ours under the paper's protocol (`*-paper` settings: Adam-trained theta*, leave-one-out by 100 more "
          "epochs of Adam from theta*, 3 replicates) and under the converged one (Newton-converged theta* and "
          "leave-one-out). `exact` on Iris, top-40 removals (loo-topk), mean Spearman over 10 test points with its "
          "95% CI; a verdict compares the two ends of a sweep by their CIs. Paper numbers tagged [S] come from "
          "secondary summaries (docs/protocol.md).", "",
          *tables.side_by_side_markdown(rows), "", "## Every Iris setting", "", *tables.detail_markdown(cases), ""]
    if not_run:
        md += ["Not scored (their leave-one-out ground truth is undefined):", ""]
        md += [f"* `{n.setting}` ({n.mode}): {n.reason}" for n in not_run] + [""]
    if agreements:
        md += ["## The retraining horizon as an axis", "", *tables.horizon_markdown(cases, agreements)]
    md += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figs if f is not None]
    (out / "paper.md").write_text("\n".join(md) + "\n")
    for r in rows:
        print(textwrap.fill(f"{r.finding.what} -- paper {r.finding.paper}", 100))
        for fam in tables.FAMILIES:
            print(textwrap.fill(f"{fam} protocol: {r.ours[fam]}; {r.verdict[fam]}", 100, initial_indent="  ",
                                subsequent_indent="    "))
    print(f"tables: {out / 'paper.md'}; figures: {', '.join(f.name for f in figs if f is not None)}")
    (out / "paper-verdicts.json").write_text(json.dumps(
        [{"finding": r.finding.key, "ours": r.ours, "verdict": r.verdict} for r in rows], indent=2))
    return 0


def add_parser(sub) -> None:
    from influence_bench.paper import plan as study  # the defaults only: --help imports no torch
    from influence_bench.spec.catalog_iris_paper import DEPTHS, WEIGHT_DECAYS, WIDTHS

    p = sub.add_parser("paper", help="reproduce Basu et al. (2021) under its own and the converged protocol",
                       description=__doc__,
                       epilog="example: influence-bench paper --out results/paper   (Iris, horizon and MNIST parts; "
                              "27 min on 2 idle CPU cores from an empty cache)")
    p.add_argument("--out", default="results/paper", metavar="DIR", help="run file, tables and figures")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--depths", default=",".join(map(str, DEPTHS)))
    p.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    p.add_argument("--weight-decays", default=",".join(map(str, WEIGHT_DECAYS)))
    p.add_argument("--estimators", default=",".join(study.IRIS_ESTIMATORS), help="estimators of the Iris part")
    p.add_argument("--horizons", default=",".join(map(str, study.HORIZONS)), help="epochs of warm Adam retraining")
    p.add_argument("--horizon-settings", default=",".join(study.HORIZON_SETTINGS))
    p.add_argument("--horizon-estimators", default=",".join(e for e, _ in study.HORIZON_ESTIMATORS),
                   help="estimators of the horizon study (exact-ggn at the PBRF's damping)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tables-only", action="store_true", help="redraw tables and figures from DIR/paper-run.json")
    p.set_defaults(func=_run)
