"""``influence-bench ground-truth ship SETTING... [--estimator NAME ...] [--tier smoke] [--check]``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from influence_bench import metrics
from influence_bench.spec import catalog


def _settings(args) -> list:
    if args.settings:
        return [catalog.get_setting(s) for s in args.settings]
    return catalog.select(tier=args.tier)


def _ship(args) -> int:
    """Runs with the shipped layer pointed at the folder shipped to or checked, so every context is
    built from the theta* shipped there (or trained, when none is shipped yet)."""
    import os

    from influence_bench.paths import repo_root, shipped_gt_dir

    out = Path(args.out) if args.out else shipped_gt_dir()
    if out is None:
        out = (repo_root() or Path.cwd()) / "results" / "ground-truth"
    before = os.environ.get("INFLUENCE_BENCH_SHIPPED_GT")
    os.environ["INFLUENCE_BENCH_SHIPPED_GT"] = str(out)
    try:
        return _ship_to(args, out)
    finally:
        if before is None:
            os.environ.pop("INFLUENCE_BENCH_SHIPPED_GT", None)
        else:
            os.environ["INFLUENCE_BENCH_SHIPPED_GT"] = before


def _ship_to(args, out: Path) -> int:
    from influence_bench.api.loading import get_context
    from influence_bench.api.registry import builtin_estimators
    from influence_bench.cli.progress import Progress
    from influence_bench.data.datasets import DataUnavailable
    from influence_bench.groundtruth import GroundTruthStore, engine, shipped, store_key
    from influence_bench.scoring.setting_info import setting_info

    cache = GroundTruthStore(args.root, shipped=None) if args.root else GroundTruthStore(shipped=None)
    if out.resolve() == cache.root.resolve():
        raise ValueError(f"the shipped root {out} cannot be the cache root (compaction would remove its shards)")
    from influence_bench.scoring import mutants
    from influence_bench.scoring.runner import removals

    # the mutants' removals too: `influence-bench mutants` and its suite retrain nothing either
    estimators = args.estimator or builtin_estimators() + [mutants.create(n) for n in mutants.names()]
    failed = False
    for setting in _settings(args):
        if setting.ground_truth.mode not in ("warm", "scratch"):
            print(f"{setting.id}: mode {setting.ground_truth.mode!r} cannot be shipped yet; skipped")
            continue
        try:
            ctx = get_context(setting, args.device)
        except DataUnavailable as exc:
            print(f"{setting.id}: skipped, data unavailable ({exc})", file=sys.stderr)
            failed = failed or args.check
            continue
        if args.check:
            ok, lines = shipped.check(ctx, out, args.sample, args.tol, compare_training=args.train)
            print("\n".join(lines))
            failed = failed or not ok
            continue
        ids = removals(ctx, estimators)
        have = GroundTruthStore(cache.root, shipped=out).load_for(store_key(ctx, "loo"), ctx.test_idx).ids
        reps = engine.n_replicates(ctx)
        bar = Progress(f"{setting.id} ship", len(ids) * reps, int(np.isin(ids, have).sum()))
        path, entries, stale = shipped.export(ctx, ids, cache, out, chunk=args.chunk,
                                              on_chunk=lambda part: bar.update(len(part)), info=setting_info(ctx))
        bar.draw(final=True)
        for p in stale:
            print(f"{setting.id}: removed stale key folder {p}")
        ceiling = (f", split-half reliability {entries.noise_ceiling:.3f} over {reps} replicates (noise ceiling "
                   f"{metrics.attainable_correlation(entries.noise_ceiling):.3f})" if reps > 1 else "")
        print(f"{setting.id}: shipped {len(entries.ids)} removals x {len(entries.cols)} test columns{ceiling}, "
              f"{path.stat().st_size} bytes: {path}; theta* ({ctx.theta_source}, sha256 {ctx.theta_sha256[:16]}) "
              f"beside it")
    return 1 if failed else 0


def add_parser(gsub, common) -> None:
    s = gsub.add_parser("ship", parents=[common], help="write (or --check) the ground truth shipped in results/")
    s.add_argument("settings", nargs="*", metavar="SETTING", help="default: every setting of --tier")
    s.add_argument("--tier", default="smoke", help="settings of this tier when none are named (default smoke)")
    s.add_argument("--estimator", action="append", default=None, metavar="NAME",
                   help="whose loo-topk removals to ship (repeatable; default: every built-in estimator and "
                        "every mutant of `influence-bench mutants`)")
    s.add_argument("--out", default=None,
                   help="shipped root (default: $INFLUENCE_BENCH_SHIPPED_GT or the checkout's results/ground-truth)")
    s.add_argument("--chunk", type=int, default=32, help="models per chunk")
    s.add_argument("--check", action="store_true",
                   help="verify what is shipped (theta* and ground truth) and recompute --sample entries from the "
                        "shipped theta* (a stochastic recipe's replicates share them out, each recomputing at "
                        "least one)")
    s.add_argument("--sample", type=int, default=3, metavar="K")
    s.add_argument("--tol", type=float, default=None,
                   help="max deviation relative to max |delta| (default 1e-6; for stochastic minibatch recipes "
                        "a quarter of the replicates' own disagreement on the sampled entries)")
    s.add_argument("--train", action="store_true",
                   help="with --check: also train theta* here and report how far it lies from the shipped one "
                        "(parameter distance, test points chosen alike); informational, never fails")
    s.set_defaults(func=_ship)
