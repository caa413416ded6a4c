"""Shipped (read-only, column-subset) ground truth: used without retraining, verified, never leaking
other columns, and giving the same scores as ground truth computed from scratch."""

import dataclasses

import numpy as np
import pytest

from influence_bench import paths
from influence_bench.api.loading import get_context
from influence_bench.cli.main import main
from influence_bench.groundtruth import (
    CorruptGroundTruthWarning,
    Entries,
    GroundTruthStore,
    MissingColumns,
    build,
    ground_truth,
    shipped,
    store_key,
)
from influence_bench.scoring.runner import compare, evaluate, fixed_removals
from influence_bench.spec import catalog

SID = "iris-logreg-wd1e-3"


@pytest.fixture(scope="module")
def ctx():
    return get_context(catalog.get_setting(SID))


@pytest.fixture
def out(ctx, tmp_path):
    """A shipped root holding loo ground truth of every training point at ctx.test_idx."""
    root = tmp_path / "shipped"
    shipped.export(ctx, np.arange(ctx.n_train), GroundTruthStore(tmp_path / "export-cache", shipped=None), root)
    return root


def _shard(ctx, root):
    (p,) = (root / SID).glob("*/shard-*.npz")
    return p


def test_shipped_root_defaults_to_the_checkout_and_follows_the_env_var(monkeypatch, tmp_path):
    monkeypatch.delenv("INFLUENCE_BENCH_SHIPPED_GT")
    assert paths.shipped_gt_dir() == paths.repo_root() / "results" / "ground-truth"
    monkeypatch.setenv("INFLUENCE_BENCH_SHIPPED_GT", str(tmp_path))
    assert GroundTruthStore(tmp_path / "c").shipped == tmp_path
    monkeypatch.setenv("INFLUENCE_BENCH_SHIPPED_GT", "")
    assert GroundTruthStore(tmp_path / "c").shipped is None


def test_shipped_shard_holds_only_the_evaluated_columns(ctx, out):
    with np.load(_shard(ctx, out), allow_pickle=False) as z:
        assert z["delta"].shape == (ctx.n_train, ctx.n_test) and z["delta"].dtype == np.float64
        np.testing.assert_array_equal(z["cols"], ctx.test_idx)
    assert not list(out.rglob("*.lock"))  # the exporter takes no locks in the shipped tree


def test_shipped_entries_are_used_without_recomputation(ctx, out, tmp_path, counting):
    store = GroundTruthStore(tmp_path / "fresh", shipped=out)
    want = build(ctx, "loo", np.arange(ctx.n_train), GroundTruthStore(tmp_path / "full", shipped=None)).delta
    counting.clear()
    got = ground_truth(ctx, np.arange(ctx.n_train)[::-1], store, cols=ctx.test_idx)
    assert counting == []
    np.testing.assert_array_equal(got, want[::-1][:, ctx.test_idx])
    assert not (tmp_path / "fresh").exists() or not list((tmp_path / "fresh").rglob("shard-*.npz"))


def test_corrupt_shipped_shard_is_reported_ignored_and_left_untouched(ctx, out, tmp_path, counting):
    shard = _shard(ctx, out)
    raw = bytearray(shard.read_bytes())
    with np.load(shard, allow_pickle=False) as z:
        pos = bytes(raw).find(z["delta"][3, 2].tobytes())
    assert pos > 0
    raw[pos + 2] ^= 0x01  # a plausible number, only the checksum can tell
    shard.write_bytes(bytes(raw))
    before = sorted(p.name for p in shard.parent.iterdir())
    store = GroundTruthStore(tmp_path / "fresh", shipped=out)
    with pytest.warns(CorruptGroundTruthWarning, match=str(shard)):
        got = ground_truth(ctx, np.arange(5), store, cols=ctx.test_idx)
    assert sorted(sum(counting, [])) == list(range(5))  # recomputed, not taken from the damaged shard
    assert shard.read_bytes() == bytes(raw) and sorted(p.name for p in shard.parent.iterdir()) == before
    assert len(store.load(store_key(ctx)).ids) == 5  # into the cache
    fresh = build(ctx, "loo", np.arange(5), GroundTruthStore(tmp_path / "full", shipped=None)).delta
    np.testing.assert_array_equal(got, fresh[:, ctx.test_idx])


def test_column_subset_entries_never_serve_other_columns(ctx, out, tmp_path, counting):
    store = GroundTruthStore(tmp_path / "fresh", shipped=out)
    key = store_key(ctx)
    part = store.load_shipped(key, ctx.test_idx)
    assert len(part.ids) == ctx.n_train
    with pytest.raises(MissingColumns, match="hold only test columns"):
        part.lookup(np.arange(3))  # all columns asked of a column-subset entry
    other = int(np.setdiff1d(np.arange(ctx.data.x_test.shape[0]), ctx.test_idx)[0])
    with pytest.raises(MissingColumns, match=f"lack test columns \\[{other}\\]"):
        part.restrict(np.array([ctx.test_idx[0], other]))
    with pytest.raises(ValueError, match="different test columns"):
        part.merge(Entries.empty(key.n_test))
    # all columns, or one column more than shipped: recomputed into the cache, finite everywhere
    full = ground_truth(ctx, np.arange(4), store)
    assert sorted(sum(counting, [])) == [0, 1, 2, 3] and full.shape == (4, key.n_test) and np.isfinite(full).all()
    counting.clear()
    wider = ground_truth(ctx, np.arange(6), store, cols=np.array([other, *ctx.test_idx]))
    assert sorted(sum(counting, [])) == [4, 5] and np.isfinite(wider).all()  # 0-3 are in the cache now
    # a different choice of test points (e.g. theta* moved on another machine) is not served either
    moved = dataclasses.replace(ctx, test_idx=np.array([other, *ctx.test_idx[1:]]), _cache={})
    counting.clear()
    ground_truth(moved, np.arange(8), store, cols=moved.test_idx)
    assert sorted(sum(counting, [])) == [6, 7]


def test_compare_on_shipped_ground_truth_is_finite_and_identical(ctx, out, tmp_path, counting):
    from influence_bench.api.registry import REGISTRY
    from influence_bench.scoring.runner import run_estimator

    influence, _ = run_estimator(REGISTRY.create("exact"), ctx)
    counting.clear()
    for protocol in ("loo-fixed", "loo-topk"):
        p1, a1, c1, *_ = compare(influence, ctx, protocol, GroundTruthStore(tmp_path / f"fresh-{protocol}", shipped=out))
        assert np.isfinite(a1).all() and c1 == 1.0  # deterministic retraining
        p2, a2, *_ = compare(influence, ctx, protocol, GroundTruthStore(tmp_path / "full", shipped=None))
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(p1, p2)
    assert sum(counting, []) == sorted(sum(counting, [])) == list(range(ctx.n_train))  # only the "full" store


def test_cli_ship_then_fresh_cache_run_matches_a_run_that_computed_everything(ctx, tmp_path, counting, capsys):
    out = tmp_path / "shipped"
    assert main(["ground-truth", "ship", SID, "--estimator", "exact", "--out", str(out),
                 "--root", str(tmp_path / "export-cache")]) == 0
    assert "shipped" in capsys.readouterr().out
    assert main(["ground-truth", "ship", SID, "--out", str(out), "--check"]) == 0
    assert "OK" in capsys.readouterr().out
    counting.clear()
    shipped_cases = evaluate("exact", ctx.setting, store=GroundTruthStore(tmp_path / "fresh", shipped=out))
    assert counting == []  # nothing retrained
    full_cases = evaluate("exact", ctx.setting, store=GroundTruthStore(tmp_path / "full", shipped=None))
    assert counting  # this one did retrain
    key = lambda c: (c.protocol, c.metric)  # noqa: E731
    for a, b in zip(sorted(shipped_cases, key=key), sorted(full_cases, key=key)):
        assert (a.protocol, a.metric, a.status) == (b.protocol, b.metric, "ok")
        assert a.per_test == b.per_test and a.value == b.value and a.noise_ceiling == b.noise_ceiling


def test_ship_check_fails_on_a_corrupt_or_stale_shipped_folder(ctx, out, capsys):
    shard = _shard(ctx, out)
    stale = out / SID / "warm-loo-0000000000000000"
    stale.mkdir()
    assert main(["ground-truth", "ship", SID, "--out", str(out), "--check"]) == 1
    assert str(stale) in capsys.readouterr().out
    stale.rmdir()
    shard.write_bytes(shard.read_bytes()[:-100])
    assert main(["ground-truth", "ship", SID, "--out", str(out), "--check"]) == 1
    assert str(shard) in capsys.readouterr().out


def test_export_prunes_stale_key_folders_and_keeps_shipped_ids(ctx, out, tmp_path, counting):
    stale = out / SID / "warm-loo-0000000000000000"
    stale.mkdir()
    counting.clear()
    path, entries, removed = shipped.export(ctx, fixed_removals(ctx)[:3], GroundTruthStore(tmp_path / "c2"), out)
    assert removed == [stale] and not stale.exists() and counting == []  # all already shipped
    assert len(entries.ids) == ctx.n_train and path == _shard(ctx, out)


CHECKOUT_SHIPPED = paths.repo_root() / "results" / "ground-truth"


@pytest.mark.parametrize("sid", sorted(p.name for p in CHECKOUT_SHIPPED.iterdir() if p.is_dir())
                         if CHECKOUT_SHIPPED.is_dir() else [])
def test_checkout_shipped_ground_truth_still_matches_the_code(sid, monkeypatch):
    """Committed ground truth cannot silently drift, on any machine: theta* is shipped and verifies,
    the ground truth lies under the current key (which hashes theta*), holds the evaluated test
    points, verifies, and a sample recomputed from the shipped theta* matches (deterministic
    recipes to 1e-6, stochastic ones to a quarter of their replicates' disagreement)."""
    from influence_bench.data.datasets import DataUnavailable

    monkeypatch.setenv("INFLUENCE_BENCH_SHIPPED_GT", str(CHECKOUT_SHIPPED))
    try:
        c = get_context(catalog.get_setting(sid))
    except DataUnavailable as exc:
        pytest.skip(f"{sid}: {exc}")
    assert c.theta_source == "shipped"
    ok, lines = shipped.check(c, CHECKOUT_SHIPPED, sample=2)
    print("\n".join(lines))
    assert ok, "\n".join(lines) + f"\nre-export: influence-bench ground-truth ship {sid}"


def test_ship_refuses_to_write_into_the_cache_root(tmp_path, capsys):
    root = tmp_path / "cache" / "ground-truth"
    assert main(["ground-truth", "ship", SID, "--estimator", "exact", "--out", str(root), "--root", str(root)]) == 2
    assert "cannot be the cache root" in capsys.readouterr().err and not root.exists()


def test_recomputed_sample_checks_the_converged_flags_and_an_empty_sample_fails(ctx, tmp_path):
    """A stored flag that the recomputation contradicts (a good row marked unconverged would be
    dropped from scoring unnoticed) is a mismatch; so is having nothing converged to recompute."""
    from influence_bench.groundtruth.entries import UNCONVERGED

    ids = np.array([3, 40])
    stored = build(ctx, "loo", ids, GroundTruthStore(tmp_path / "s", shipped=None), cols=ctx.test_idx)
    ok, line = shipped._recompute(ctx, stored, ids, 0, 1e-6, None)
    assert ok and line.endswith("OK"), line
    stored.converged = stored.converged.copy()
    stored.converged[0] = UNCONVERGED
    ok, line = shipped._recompute(ctx, stored, ids, 0, 1e-6, None)
    assert not ok and "converged flags differ" in line, line
    ok, line = shipped._recompute(ctx, stored, ids[:0], 0, 1e-6, None)
    assert not ok and "no converged entry to recompute" in line
