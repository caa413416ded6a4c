"""The ``influence-bench`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import catalog
from .registry import REGISTRY, RegistryError
from .settings import TIERS


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
    from .data import DataUnavailable
    from .results import new_run_path, write_run
    from .runner import evaluate
    from .table import fidelity_table
    from .thresholds import Thresholds, judge

    try:
        REGISTRY.get(args.estimator)
        settings = catalog.select(args.settings, tier=args.tier)
    except (RegistryError, KeyError) as exc:
        print(f"influence-bench: {exc}", file=sys.stderr)
        return 2
    if not settings:
        print(f"influence-bench: no setting matches {args.settings} in tier {args.tier!r}", file=sys.stderr)
        return 2
    cases, skipped = [], []
    for s in settings:
        print(f"scoring {args.estimator} on {s.id} ...", file=sys.stderr, flush=True)
        try:
            cases += evaluate(args.estimator, s, device=args.device)
        except DataUnavailable as exc:
            skipped.append(f"{s.id}: {exc}")
    verdicts, failures = judge(cases, Thresholds.load())
    print(fidelity_table(cases, verdicts))
    for line in skipped:
        print(f"skipped (data missing) {line}")
    for line in failures:
        print(f"FAIL {line}")
    if cases:
        path = write_run(new_run_path(Path(args.results_dir)), cases, extra={"tier": args.tier})
        print(f"results written to {path}")
    return 1 if failures or any(c.status == "error" for c in cases) else 0


def _data(args) -> int:
    from .dataprep import prepare

    try:
        path = prepare(args.name, Path(args.root) if args.root else None)
    except (RuntimeError, OSError) as exc:  # no network, torchvision refusing a corrupt copy, ...
        print(f"influence-bench: could not prepare {args.name}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
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
    sc.add_argument("--results-dir", default="results", help="run files go to DIR/runs/ (default: ./results)")
    sc.set_defaults(func=_score)

    da = sub.add_parser("data", help="datasets: `data prepare NAME` downloads through torchvision -> <root>/NAME.npz")
    da.add_argument("action", choices=["prepare"])
    da.add_argument("name", choices=["mnist", "cifar10"])
    da.add_argument("--root", default=None, help="data root (default: $INFLUENCE_BENCH_DATA or the user cache)")
    da.set_defaults(func=_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
