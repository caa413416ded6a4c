"""``influence-bench ground-truth build | verify | info | convergence`` (and ``ship``: ``cli_ship.py``)."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from influence_bench import metrics
from influence_bench.cli.options import CommandError, device, nonnegative_float, nonnegative_int, positive_int
from influence_bench.cli.progress import Progress  # noqa: F401
from influence_bench.spec import catalog
from influence_bench.spec.settings import TIERS

PROTOCOL_KIND = {"loo-fixed": "loo", "loo-topk": "loo", "lds": "lds"}


def _ids(ctx, protocol: str, estimator: str | None, device: str) -> np.ndarray:
    from influence_bench.api.registry import REGISTRY
    from influence_bench.groundtruth import lds
    from influence_bench.scoring.runner import fixed_removals, run_estimator, topk_removals

    if protocol == "loo-fixed":
        return fixed_removals(ctx)
    if protocol == "lds":
        return np.arange(lds.DEFAULT.n_subsets)
    if not estimator:
        raise CommandError("--protocol loo-topk removes each estimator's own top-k points: give --estimator NAME")
    influence, _ = run_estimator(REGISTRY.create(estimator), ctx)
    return np.unique(topk_removals(influence, ctx.setting.protocol.topk))


def _build(args) -> int:
    from influence_bench.api.loading import get_context
    from influence_bench.groundtruth import GroundTruthStore, build, store_key

    store = GroundTruthStore(args.root) if args.root else GroundTruthStore()
    kind = PROTOCOL_KIND[args.protocol]
    for sid in args.settings:
        setting = catalog.get_setting(sid).with_mode(args.mode or catalog.get_setting(sid).ground_truth.mode)
        ctx = get_context(setting, args.device)
        ids = _ids(ctx, args.protocol, args.estimator, args.device)
        have = np.isin(ids, store.load(store_key(ctx, kind)).ids).sum()
        bar = Progress(f"{sid} {args.protocol}", len(ids), int(have))
        build(ctx, kind, ids, store, chunk=args.chunk, executor=args.executor, workers=args.workers,
              ray_address=args.ray_address, on_chunk=lambda part: bar.update(len(part)))
        bar.draw(final=True)
        print(f"{sid} {args.protocol}: {len(ids)} models stored in {store.dir(store_key(ctx, kind))}")
    return 0


def _verify(args) -> int:
    from influence_bench.api.loading import get_context
    from influence_bench.groundtruth import GroundTruthStore, store_key
    from influence_bench.groundtruth.builder import compute

    store = GroundTruthStore(args.root) if args.root else GroundTruthStore()
    ctx = get_context(catalog.get_setting(args.setting), args.device)
    kind = PROTOCOL_KIND[args.protocol]
    stored = store.load(store_key(ctx, kind))
    if not len(stored.ids):
        print(f"influence-bench: no {kind} ground truth stored for {args.setting} "
              f"(run `influence-bench ground-truth build {args.setting} --protocol {args.protocol}`)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    ids = np.sort(rng.choice(stored.ids, size=min(args.sample, len(stored.ids)), replace=False))
    t0 = time.perf_counter()
    fresh = compute(ctx, kind, ids).delta
    old = stored.lookup(ids)
    dev = np.abs(fresh - old)
    worst = int(ids[np.unravel_index(dev.argmax(), dev.shape)[0]])
    rel = float(dev.max() / max(np.abs(old).max(), 1e-300))
    ok = rel <= args.tol
    print(f"{args.setting} {kind}: recomputed {len(ids)} of {len(stored.ids)} stored entries in "
          f"{time.perf_counter() - t0:.1f}s; max |deviation| {dev.max():.3e} (entry {worst}), "
          f"relative to max |delta| {rel:.3e}; tolerance {args.tol:g}: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def _info(args) -> int:
    from influence_bench.api.loading import get_context
    from influence_bench.groundtruth import GroundTruthStore, build, engine
    from influence_bench.groundtruth.builder import replicate_keys

    store = GroundTruthStore(args.root) if args.root else GroundTruthStore()
    ctx = get_context(catalog.get_setting(args.setting), args.device)
    print(f"{args.setting} (spec {ctx.setting.spec_hash}, mode {ctx.setting.ground_truth.mode}), store {store.root}")

    for kind, protocols in (("loo", "loo-fixed, loo-topk"), ("lds", "lds")):
        keys = replicate_keys(ctx, kind)
        for r, key in enumerate(keys):
            i = store.info(key)
            grad = f"{i['max_grad_norm']:.1e}" if i["max_grad_norm"] is not None else "-"
            rep = f" replicate {r}/{len(keys)}" if engine.stochastic(ctx) else ""
            ceiling = "" if engine.stochastic(ctx) else f"noise ceiling {i['noise_ceiling']:.2f}, "
            print(f"  {kind:<4} ({protocols}){rep}: {i['entries']} entries in {i['shards']} shard(s), {i['bytes']} bytes, "
                  f"{ceiling}max grad norm {grad}, key {i['key']}\n       {i['path']}")
            shipped = store.load_shipped(key, ctx.test_idx)
            if len(shipped.ids):
                print(f"       shipped: {len(shipped.ids)} entries at the {ctx.n_test} evaluated test points in {store.shipped}")
        if kind == "loo" and len(keys) > 1:
            got = [store.load_for(k, ctx.test_idx) for k in keys]
            common = got[0].ids[np.all([np.isin(got[0].ids, g.ids) for g in got], axis=0)]
            if len(common) > 2:
                reliability = build(ctx, kind, common, store, cols=ctx.test_idx).noise_ceiling  # holds the reliability
                print(f"  split-half reliability over {len(keys)} replicates, {len(common)} removals, evaluated "
                      f"test points: {reliability:.3f}; noise ceiling (attainable correlation, its square root): "
                      f"{metrics.attainable_correlation(reliability):.3f}")
    return 0


def _convergence(args) -> int:
    from influence_bench.api.loading import get_context
    from influence_bench.groundtruth import GroundTruthStore
    from influence_bench.groundtruth.convergence import HEADER, convergence

    store = GroundTruthStore(args.root) if args.root else GroundTruthStore()
    settings = [catalog.get_setting(s) for s in args.settings] if args.settings else catalog.select(tier=args.tier)
    print(HEADER)
    for s in settings:
        print(convergence(get_context(s, args.device), store).line())
    return 0


def add_parser(sub) -> None:
    gt = sub.add_parser("ground-truth", help="build, verify or inspect stored ground truth")
    gsub = gt.add_subparsers(dest="gt_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", type=device, default="cpu", help="cpu (default), cuda or cuda:N")
    common.add_argument("--root", default=None, help="store root (default: $INFLUENCE_BENCH_CACHE/ground-truth)")

    b = gsub.add_parser("build", parents=[common], help="retrain what the store does not hold yet")
    b.add_argument("settings", nargs="+", metavar="SETTING")
    b.add_argument("--protocol", choices=sorted(PROTOCOL_KIND), default="loo-fixed")
    b.add_argument("--mode", choices=["warm", "scratch", "pbrf"], default=None,
                   help="ground-truth mode (default: the setting's; see docs/protocol.md)")
    b.add_argument("--estimator", default=None, help="for loo-topk: whose top-k points to remove")
    b.add_argument("--executor", choices=["local", "ray"], default="local")
    b.add_argument("--workers", type=positive_int, default=2, help="Ray CPUs when starting a local Ray instance")
    b.add_argument("--ray-address", default=None, help="address of an existing Ray cluster")
    b.add_argument("--chunk", type=positive_int, default=32, help="models per chunk (one saved shard each)")
    b.set_defaults(func=_build)

    v = gsub.add_parser("verify", parents=[common], help="recompute K random stored entries and compare")
    v.add_argument("setting", metavar="SETTING")
    v.add_argument("--protocol", choices=sorted(PROTOCOL_KIND), default="loo-fixed")
    v.add_argument("--sample", type=positive_int, default=5, metavar="K")
    v.add_argument("--seed", type=nonnegative_int, default=0)
    v.add_argument("--tol", type=nonnegative_float, default=1e-6,
                   help="max deviation relative to max |delta| (default 1e-6)")
    v.set_defaults(func=_verify)

    i = gsub.add_parser("info", parents=[common], help="what is stored for a setting")
    i.add_argument("setting", metavar="SETTING")
    i.set_defaults(func=_info)

    c = gsub.add_parser("convergence", parents=[common],
                        help="how far the stored loo ground truth converged (shipped root and cache)")
    c.add_argument("settings", nargs="*", metavar="SETTING", help="default: every setting of --tier")
    c.add_argument("--tier", choices=TIERS, default="smoke")
    c.set_defaults(func=_convergence)

    from influence_bench.cli import ship as cli_ship

    cli_ship.add_parser(gsub, common)
