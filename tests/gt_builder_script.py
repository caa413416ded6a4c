"""Run by tests/test_gt_store.py in a subprocess: build iris-logreg ground truth into a store,
logging the ids of every saved chunk (one JSON line each) to LOG; with --block, sleep forever
after the first chunk so the parent can kill -9 it mid-build."""

import argparse
import json
import os
import sys
import time

import numpy as np

from influence_bench.api.loading import get_context
from influence_bench.groundtruth import GroundTruthStore, build
from influence_bench.spec import catalog

p = argparse.ArgumentParser()
p.add_argument("root")
p.add_argument("log")
p.add_argument("--setting", default="iris-logreg-wd1e-3")
p.add_argument("--n", type=int, default=40)
p.add_argument("--chunk", type=int, default=8)
p.add_argument("--block", action="store_true")
p.add_argument("--go", default=None, help="print 'ready', then wait until this file exists")
p.add_argument("--sleep", type=float, default=0.0, help="seconds to pause after each saved chunk")
args = p.parse_args()

ctx = get_context(catalog.get_setting(args.setting))


def hook(ids):
    with open(args.log, "a") as fh:
        fh.write(json.dumps([int(i) for i in ids]) + "\n")
    print("saved", flush=True)
    if args.block:
        time.sleep(600)
    time.sleep(args.sleep)


if args.go:
    print("ready", flush=True)
    while not os.path.exists(args.go):
        time.sleep(0.01)
build(ctx, "loo", np.arange(args.n), GroundTruthStore(args.root), chunk=args.chunk, on_chunk=hook)
sys.exit(0)
