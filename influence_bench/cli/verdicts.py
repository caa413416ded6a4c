"""``influence-bench mutants`` (mutation testing of the floors) and ``influence-bench baseline
floors`` (the measured floors, from a baseline run)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path


def _mutants(args) -> int:
    from influence_bench.data.datasets import DataUnavailable
    from influence_bench.scoring import mutants
    from influence_bench.spec import catalog

    settings = catalog.select(args.settings, tier=args.tier)
    chosen = args.mutant or mutants.names()
    unknown = sorted(set(chosen) - set(mutants.names()))
    if unknown:
        print(f"influence-bench mutants: unknown mutant(s) {unknown}; known: {', '.join(mutants.names())}",
              file=sys.stderr)
        return 2
    try:
        outcomes = mutants.run_mutants(chosen, settings, device=args.device,
                                       progress=lambda m: print(m, file=sys.stderr, flush=True))
    except DataUnavailable as exc:
        print(f"influence-bench mutants: {exc}", file=sys.stderr)
        return 2
    for o in outcomes if args.verbose else []:
        killers = ", ".join(f"{s} ({p})" for s, _, p in o.failed) or "nothing"
        print(textwrap.fill(f"{o.mutant} failed on {len(o.failed)}: {killers}", 100, subsequent_indent="  "))
    print(mutants.table(outcomes))
    return 0 if all(o.killed for o in outcomes) else 1


def _floors(args) -> int:
    from influence_bench.api.registry import builtin_estimators
    from influence_bench.reporting.schema import RunFileError, load_run
    from influence_bench.scoring.session import registered_tags
    from influence_bench.spec import measured
    from influence_bench.spec.thresholds import Thresholds, ThresholdsError

    try:
        run = load_run(args.run)
        general = Thresholds.load(measured=False)
    except (RunFileError, ThresholdsError) as exc:
        print(f"influence-bench: {exc}", file=sys.stderr)
        return 2
    floors = measured.measured_floors(run.cases, set(builtin_estimators()), general, args.margin,
                                      tags_of=registered_tags)
    out = Path(args.out) if args.out else Path(__file__).resolve().parents[1] / "spec" / "measured_floors.toml"
    out.write_text(measured.to_toml(floors, Path(args.run).name, args.margin))
    known = sum(bool(f.known_failure) for f in floors)
    print(f"measured floors written to {out}: {len(floors) - known} floors, {known} generated known failures")
    return 0


def add_parsers(sub, baseline_sub) -> None:
    from influence_bench.spec.measured import DEFAULT_MARGIN
    from influence_bench.spec.settings import TIERS

    mu = sub.add_parser("mutants", help="mutation testing: broken variants of `exact` that the floors must fail")
    mu.add_argument("--tier", choices=TIERS, default="smoke")
    mu.add_argument("--settings", action="append", default=None, metavar="GLOB")
    mu.add_argument("--mutant", action="append", default=None, metavar="NAME", help="only this mutant (repeatable)")
    mu.add_argument("--device", default="cpu")
    mu.add_argument("-v", "--verbose", action="store_true", help="list the cases that killed each mutant")
    mu.set_defaults(func=_mutants)

    fl = baseline_sub.add_parser("floors", help="write the measured floors (measured_floors.toml) from a run")
    fl.add_argument("run", metavar="RUN.json", help="the baseline run (results/baseline.json)")
    fl.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                    help=f"floor = measured mean Spearman minus this (default {DEFAULT_MARGIN})")
    fl.add_argument("--out", default=None, help="default: the packaged influence_bench/spec/measured_floors.toml")
    fl.set_defaults(func=_floors)
