"""theta* shipped beside the ground truth: used instead of training when it matches the setting and
its data, refused (with a warning) when damaged or trained on other data; ground truth and the
curvature record are keyed by theta*; the shipped-ground-truth check holds stochastic recipes to
their replicates' own noise and still catches a changed entry."""

import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from influence_bench import paths, tally
from influence_bench.api.loading import get_context
from influence_bench.groundtruth import GroundTruthStore, build, shipped, store_key
from influence_bench.groundtruth.shipped import NOISE_FRACTION, replicate_noise
from influence_bench.scoring.runner import fixed_removals
from influence_bench.scoring.session import shipped_violation
from influence_bench.scoring.setting_info import setting_info
from influence_bench.spec import catalog
from influence_bench.spec.settings import GroundTruthSpec
from influence_bench.training import fit as training
from influence_bench.training import shipped as shipped_models

SID = "iris-logreg-wd1e-3"


@pytest.fixture
def root(tmp_path):
    """A shipped root holding theta* and all-points loo ground truth of SID (trained here)."""
    out = tmp_path / "shipped"
    ctx = get_context(catalog.get_setting(SID))  # the shipped layer is off in tests/: trained here
    shipped.export(ctx, fixed_removals(ctx), GroundTruthStore(tmp_path / "export-cache", shipped=None), out,
                   info=setting_info(ctx))
    return out


def _no_fit(monkeypatch):
    def fit(*a, **k):
        raise AssertionError("theta* was trained although it is shipped")

    monkeypatch.setattr(training, "fit", fit)


def test_shipped_theta_is_used_and_nothing_is_trained(root, monkeypatch, tmp_path):
    local = get_context(catalog.get_setting(SID))
    monkeypatch.setenv("INFLUENCE_BENCH_SHIPPED_GT", str(root))
    monkeypatch.setenv("INFLUENCE_BENCH_CACHE", str(tmp_path / "empty-cache"))
    _no_fit(monkeypatch)
    before = tally.snapshot()
    ctx = get_context(catalog.get_setting(SID))
    assert ctx.theta_source == "shipped" and torch.equal(ctx.theta, local.theta)
    np.testing.assert_array_equal(ctx.test_idx, local.test_idx)
    ckpt = ctx.checkpoints()  # TracIn / TRAK read them from the shipped file, no replay
    assert torch.equal(ckpt[-1][0], ctx.theta) and len(ckpt) > 1
    assert build(ctx, "loo", fixed_removals(ctx), GroundTruthStore(), cols=ctx.test_idx).delta.shape == (120, 10)
    assert tally.since(before) == Counter()  # nothing trained, nothing computed
    assert not (tmp_path / "empty-cache" / "models").exists()  # and nothing written to the cache


def test_shipped_files_say_what_they_hold(root):
    setting = catalog.get_setting(SID)
    meta = json.loads(shipped_models.path_for(setting, root).with_suffix(".json").read_text())
    assert meta["training_hash"] == setting.training_hash and meta["setting"] == SID
    assert len(meta["theta_sha256"]) == 64 and len(meta["data_sha256"]) == 64 and meta["grad_norm"] < 1e-9
    info = json.loads(shipped_models.info_path_for(setting, root).read_text())
    assert info["theta_sha256"] == meta["theta_sha256"] and info["info"]["n_params"] == 15
    assert oct(os.stat(shipped_models.path_for(setting, root)).st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("damage", ["plausible-number", "truncated"])
def test_damaged_shipped_theta_warns_and_trains(root, monkeypatch, tmp_path, damage):
    path = shipped_models.path_for(catalog.get_setting(SID), root)
    if damage == "plausible-number":  # a valid npz whose theta differs from its checksum
        z = dict(np.load(path, allow_pickle=False))
        z["theta"][3] += 1e-6
        with open(path, "wb") as fh:
            np.savez(fh, **z)
        match = "checksum mismatch in \\['theta'\\]"
    else:
        path.write_bytes(path.read_bytes()[:-200])
        match = "is unusable"
    damaged = path.read_bytes()
    monkeypatch.setenv("INFLUENCE_BENCH_SHIPPED_GT", str(root))
    monkeypatch.setenv("INFLUENCE_BENCH_CACHE", str(tmp_path / "c"))
    with pytest.warns(shipped_models.ShippedModelWarning, match=match):
        ctx = get_context(catalog.get_setting(SID))
    assert ctx.theta_source == "trained"
    assert path.read_bytes() == damaged  # never modified


def test_shipped_theta_trained_on_other_data_is_not_used(root, monkeypatch, tmp_path):
    setting = catalog.get_setting(SID)
    monkeypatch.setenv("INFLUENCE_BENCH_SHIPPED_GT", str(root))
    monkeypatch.setenv("INFLUENCE_BENCH_CACHE", str(tmp_path / "c"))
    ds = get_context(setting).data
    other = dataclasses.replace(ds, x_train=ds.x_train * (1 + 1e-12))  # e.g. the JPEG vs the original pixels
    with pytest.warns(shipped_models.ShippedModelWarning, match="trained on other data"):
        got = training.train(setting, other)
    assert got.source == "trained"
    assert training.train(setting, ds).source == "shipped"


def test_user_initial_weights_bypass_the_shipped_theta(root, monkeypatch):
    monkeypatch.setattr(shipped_models, "init_weights_sha256", lambda s: "f" * 64)
    assert shipped_models.load(catalog.get_setting(SID), "x", root) is None


def test_ground_truth_key_and_curvature_record_follow_theta():
    from influence_bench.scoring.setting_info import info_cache_path

    ctx = get_context(catalog.get_setting(SID))
    moved = dataclasses.replace(ctx, theta=ctx.theta + 1e-15 * torch.sign(ctx.theta), _cache={})
    assert moved.theta_sha256 != ctx.theta_sha256
    assert store_key(moved).digest != store_key(ctx).digest
    assert store_key(moved).payload["theta"] == moved.theta_sha256
    assert info_cache_path(moved) != info_cache_path(ctx)


def test_check_reports_a_context_that_does_not_hold_the_shipped_theta(root):
    ctx = get_context(catalog.get_setting(SID))
    moved = dataclasses.replace(ctx, theta=ctx.theta * (1 + 1e-9), _cache={})
    ok, lines = shipped.check(moved, root, sample=1)
    assert not ok and "other than the shipped one" in lines[0]


# ---- stochastic recipes: tolerance from the replicates' own disagreement ------------------------

def _sgd_setting():
    s = catalog.get_setting("iris-mlp-d1-w16-wd1e-3")
    gt = GroundTruthSpec(mode="warm", retrain="sgd", lr=0.05, momentum=0.9, batch_size=30, steps=40, replicates=2)
    return dataclasses.replace(s, id="iris-mlp-d1-w16-sgdgt", ground_truth=gt)


def test_replicate_noise_is_the_largest_replicate_disagreement():
    from influence_bench.groundtruth import Entries

    cols = np.array([0, 1])
    a = Entries(np.arange(3), np.array([[1.0, -2.0], [0.5, 0.0], [0.1, 0.2]]), np.zeros(3), np.zeros(3, np.int64),
                cols=cols)
    b = dataclasses.replace(a, delta=a.delta + np.array([[0.0, 0.5], [0.1, 0.0], [0.0, 0.0]]))
    assert replicate_noise([a, b], np.array([0, 1]), cols) == pytest.approx(0.5 / 2.0)
    assert replicate_noise([a, b], np.array([2]), cols) == 0.0
    assert replicate_noise([a], np.array([0]), cols) is None


@given(st.lists(st.integers(0, 10_000), unique=True, max_size=12), st.integers(1, 5))
def test_the_sample_is_shared_out_among_the_replicates(ids, replicates):
    ids = np.sort(np.array(ids, dtype=np.int64))
    shares = [shipped.share(ids, r, replicates) for r in range(replicates)]
    assert all(set(s) <= set(ids) for s in shares)
    if replicates == 1 or len(ids) == 0:
        assert all(np.array_equal(s, ids) for s in shares)
    elif len(ids) >= replicates:  # a partition of the sample, no replicate without an entry
        assert sorted(np.concatenate(shares).tolist()) == ids.tolist() and all(len(s) >= 1 for s in shares)
    else:  # fewer entries than replicates: one each, every entry recomputed
        assert all(len(s) == 1 for s in shares) and set(np.concatenate(shares)) == set(ids)


def test_stochastic_check_tolerates_rounding_and_fails_a_changed_entry(tmp_path, monkeypatch):
    setting = _sgd_setting()
    out = tmp_path / "shipped"
    monkeypatch.setenv("INFLUENCE_BENCH_SHIPPED_GT", str(out))
    ctx = get_context(setting)
    shipped.export(ctx, np.arange(12), GroundTruthStore(tmp_path / "c", shipped=None), out)
    ctx = get_context(setting)  # from the theta* just shipped
    assert ctx.theta_source in ("shipped", "cache", "trained")
    ok, lines = shipped.check(ctx, out, sample=4, seed=1)
    assert ok, "\n".join(lines)
    tol_lines = [ln for ln in lines if "recomputed 2" in ln]  # the sample of 4 shared by the 2 replicates
    assert len(tol_lines) == 2 and all(f"= {NOISE_FRACTION:g} x the replicates' disagreement" in ln
                                       for ln in tol_lines)
    # a change of the retraining code moves entries by about the replicates' disagreement: fails
    key = store_key(ctx, "loo", replicate=1)
    shard = next(shipped.key_dir(out, key).glob("shard-*.npz"))
    entries = GroundTruthStore(out, shipped=None)._read_shard(shard, key)
    noisy = dataclasses.replace(entries, delta=entries.delta * 1.5)
    arrays, meta = GroundTruthStore.shard_payload(key, noisy, "x")
    from influence_bench.paths import write_npz

    write_npz(shard, meta=np.array(json.dumps(meta)), **arrays)  # valid checksums: only the numbers lie
    ok, lines = shipped.check(ctx, out, sample=4, seed=1)
    assert not ok and any("replicate 1" in ln and "MISMATCH" in ln for ln in lines), "\n".join(lines)


def test_ship_check_can_report_a_theta_trained_here(root, capsys, monkeypatch):
    from influence_bench.cli.main import main

    assert main(["ground-truth", "ship", SID, "--out", str(root), "--check", "--train", "--sample", "1"]) == 0
    out = capsys.readouterr().out
    assert "theta* trained on this machine differs from the shipped one by 0.00e+00" in out
    assert "10/10 of the same test points" in out and "verified and in use" in out


# ---- the pytest plugin: a shipped setting that trains or retrains fails ------------------------

def test_shipped_violation_names_the_setting_and_the_fix(root, monkeypatch):
    monkeypatch.setenv("INFLUENCE_BENCH_SHIPPED_GT", str(root))
    setting = catalog.get_setting(SID)
    work = Counter({(tally.COMPUTED, SID): 7})
    msg = shipped_violation("exact", setting, work)
    assert "computed 7 ground-truth entries" in msg and f"ground-truth ship {SID}" in msg
    assert shipped_violation("exact", setting, Counter()) is None
    assert shipped_violation("exact", setting, Counter({(tally.COMPUTED, "other"): 3})) is None
    other = catalog.get_setting("iris-mlp-d1-w16-wd1e-3")  # nothing shipped for it in this root
    assert shipped_violation("exact", other, Counter({(tally.TRAINED, other.id): 1})) is None


def _suite(root: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "INFLUENCE_BENCH_SHIPPED_GT": str(root), "INFLUENCE_BENCH_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "pytest", "suites/test_fidelity.py", "-k", f"exact-{SID}",
                           "-p", "no:cacheprovider", "-q", "--results-dir", str(cache / "results")],
                          cwd=paths.repo_root(), env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_suite_fails_when_a_shipped_setting_retrains_and_says_zero_when_it_does_not(root, tmp_path):
    setting = catalog.get_setting(SID)
    theta_only = tmp_path / "theta-only"
    (theta_only / SID).mkdir(parents=True)
    for p in (root / SID).glob("model-*"):
        (theta_only / SID / p.name).write_bytes(p.read_bytes())
    bad = _suite(theta_only, tmp_path / "c1")  # theta* shipped, its ground truth missing
    assert bad.returncode == 1, bad.stdout[-3000:]
    assert f"{SID} ships theta* and ground truth" in bad.stdout and "computed 120 ground-truth entries" in bad.stdout
    good = _suite(root, tmp_path / "c2")
    assert good.returncode == 0, good.stdout[-3000:]
    assert "fidelity cases trained 0 models and computed 0 ground-truth entries" in good.stdout
    assert shipped_models.path_for(setting, root).is_file()


def test_committed_records_name_no_machine_path(monkeypatch, tmp_path):
    """Records that are committed or compared across machines write the data root as a variable."""
    from influence_bench.paths import portable

    monkeypatch.setenv("INFLUENCE_BENCH_DATA", str(tmp_path / "data"))
    assert portable(str(tmp_path / "data" / "mnist.npz")) == "$INFLUENCE_BENCH_DATA/mnist.npz"
    assert portable(f"torchvision:{tmp_path / 'data'}") == "torchvision:$INFLUENCE_BENCH_DATA"
    root = paths.repo_root()
    for p in [root / "results" / "baseline.json", *(root / "results" / "ground-truth").rglob("model-*.json")]:
        assert '"data_source": "/' not in p.read_text(), p  # an absolute path of the exporting machine


def test_every_shipped_full_batch_theta_is_a_minimiser():
    """Leave-one-out retraining is compared with theta*: a theta* that is no stationary point leaves
    nothing to converge to (iris d3 v1 shipped ||grad|| 5.8e-6 and 0 of 120 removals converged).
    Every full-batch smoke setting's shipped theta* is stationary to 2e-8 (measured: at most 1.1e-8, d3 v2)."""
    root = paths.repo_root() / "results" / "ground-truth"
    worst = {}
    for s in catalog.select(tier="smoke"):
        path = shipped_models.path_for(s, root)
        if s.train.minibatch or path is None or not path.is_file():
            continue
        worst[s.id] = json.loads(path.with_suffix(".json").read_text())["grad_norm"]
    assert len(worst) >= 8, sorted(worst)
    assert max(worst.values()) <= 2e-8, {k: v for k, v in worst.items() if v > 2e-8}
