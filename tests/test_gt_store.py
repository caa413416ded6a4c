"""The ground-truth store: content addressing, checksums, corruption, kill-and-resume, concurrency."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import context_as_tests_see_it

from influence_bench.api.loading import get_context
from influence_bench.groundtruth import CorruptGroundTruthWarning, GroundTruthStore, build, store_key
from influence_bench.spec import catalog

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "gt_builder_script.py"


@pytest.fixture(scope="module")
def ctx():
    return context_as_tests_see_it(catalog.get_setting("iris-logreg-wd1e-3"))


def _run(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_key_covers_spec_config_data_and_engine_version(ctx, monkeypatch):
    k = store_key(ctx)
    assert set(k.payload) >= {"spec_hash", "ground_truth", "data", "engine"}
    assert store_key(ctx, "lds").digest != k.digest
    from influence_bench.groundtruth import recipes

    kind = ("warm", "newton-cg")  # a new version of the recipe this setting uses
    monkeypatch.setitem(recipes.TABLE, kind, dataclasses.replace(recipes.TABLE[kind], version="something-else"))
    assert store_key(ctx).digest != k.digest


def test_every_array_has_a_verified_checksum(ctx, tmp_path):
    store = GroundTruthStore(tmp_path)
    build(ctx, "loo", np.arange(3), store)
    (shard,) = store.shards(store_key(ctx))
    with np.load(shard, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
    assert set(meta["sha256"]) == {"ids", "delta", "grad_norm", "steps", "converged"}
    assert meta["noise_ceiling"] == 1.0 and meta["ceiling_method"] == "deterministic"


@pytest.mark.parametrize("damage", ["truncate", "flip-a-byte", "garbage"])
def test_corrupt_shard_is_reported_moved_aside_and_recomputed(ctx, tmp_path, counting, damage):
    store = GroundTruthStore(tmp_path)
    want = build(ctx, "loo", np.arange(6), store, chunk=3).delta
    key = store_key(ctx)
    (shard,) = store.shards(key)  # compacted into one
    raw = bytearray(shard.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip-a-byte":  # inside the delta array's data: only the checksum can tell
        with np.load(shard, allow_pickle=False) as z:
            needle = z["delta"][2, 5].tobytes()
        pos = bytes(raw).find(needle)
        assert pos > 0
        raw[pos + 3] ^= 0x10
    else:
        raw = bytearray(b"not an npz at all")
    shard.write_bytes(bytes(raw))
    counting.clear()
    with pytest.warns(CorruptGroundTruthWarning, match=str(shard)):
        got = build(ctx, "loo", np.arange(6), store, chunk=3).delta
    assert sorted(sum(counting, [])) == list(range(6))  # all recomputed, nothing silently used
    np.testing.assert_array_equal(got, want)
    assert list(store.dir(key).glob("*.corrupt"))  # kept aside for inspection
    assert not any(store.dir(key).glob("*.tmp"))


def test_temp_file_of_a_killed_writer_is_cleaned_up(ctx, tmp_path):
    store = GroundTruthStore(tmp_path)
    key = store_key(ctx)
    store.dir(key).mkdir(parents=True)
    orphan = store.dir(key) / ".shard-00000000000000000001-00000000-deadbeef.npz.abc.tmp"
    orphan.write_bytes(b"half a shard")
    build(ctx, "loo", np.arange(4), store, chunk=2)
    assert not orphan.exists() and len(store.shards(key)) == 1


def test_shard_of_another_key_is_not_used(ctx, tmp_path, counting):
    store = GroundTruthStore(tmp_path)
    build(ctx, "loo", np.arange(2), store)
    loo, lds_dir = store.dir(store_key(ctx)), store.dir(store_key(ctx, "lds"))
    lds_dir.mkdir(parents=True)
    for p in loo.glob("shard-*.npz"):
        os.replace(p, lds_dir / p.name)
    with pytest.warns(CorruptGroundTruthWarning, match="belongs to key"):
        assert len(store.load(store_key(ctx, "lds")).ids) == 0


def test_two_builds_are_bit_identical(tmp_path):
    mlp = get_context(catalog.get_setting("iris-mlp-d1-w16-wd1e-3"))
    a = build(mlp, "loo", np.arange(10), GroundTruthStore(tmp_path / "a"), chunk=5)
    b = build(mlp, "loo", np.arange(10), GroundTruthStore(tmp_path / "b"), chunk=5)
    assert a.delta.tobytes() == b.delta.tobytes() and np.abs(a.delta).max() > 1e-4


def test_killed_build_keeps_saved_chunks_and_resumes(ctx, tmp_path, counting):
    store = GroundTruthStore(tmp_path / "store")
    log = tmp_path / "log.jsonl"
    proc = _run([store.root, log, "--n", 40, "--chunk", 8, "--block"])
    try:
        line = proc.stdout.readline()
        assert line.strip() == "saved", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)  # after the first chunk was saved, mid-build
    finally:
        proc.kill()
        proc.wait(30)
    first = json.loads(log.read_text().splitlines()[0])
    assert first == list(range(8))
    key = store_key(ctx)
    np.testing.assert_array_equal(np.sort(store.load(key).ids), np.arange(8))  # kept, readable
    counting.clear()
    got = build(ctx, "loo", np.arange(40), store, chunk=8)
    assert sorted(sum(counting, [])) == list(range(8, 40))  # only the missing ones
    ref = build(ctx, "loo", np.arange(40), GroundTruthStore(tmp_path / "ref"), chunk=8)
    np.testing.assert_allclose(got.delta, ref.delta, rtol=0, atol=1e-12)


def test_two_concurrent_builders_make_one_consistent_store(ctx, tmp_path):
    store = GroundTruthStore(tmp_path / "store")
    logs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    go = tmp_path / "go"
    procs = [_run([store.root, log, "--n", 32, "--chunk", 8, "--go", go, "--sleep", 0.3]) for log in logs]
    for p in procs:  # both loaded and waiting: start them together
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    computed = [i for log in logs if log.exists() for line in log.read_text().splitlines() for i in json.loads(line)]
    assert sorted(computed) == list(range(32))  # every model computed exactly once
    entries = store.load(store_key(ctx))
    assert sorted(entries.ids) == list(range(32)) and len(store.shards(store_key(ctx))) == 1
    ref = build(ctx, "loo", np.arange(32), GroundTruthStore(tmp_path / "ref"), chunk=8)
    np.testing.assert_allclose(entries.lookup(np.arange(32)), ref.delta, rtol=0, atol=1e-12)
