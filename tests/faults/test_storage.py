"""Storage faults: every stored artifact (model cache ``.npz`` and its sidecar ``.json``, the
checkpoint arrays in the same ``.npz``, the curvature record ``*.info.json``, the shipped model, a
ground-truth shard) damaged every way it can be (truncated, flipped bits, empty, forged = a valid
file with wrong content, a pickled object array or not JSON, a newer format), and caches that cannot
be written (a read-only folder, a full disk).

A cache heals ("recovered"): the damage is said in one line on stderr naming the file, the file is
set aside as ``<file>.bad-<n>`` (never deleted) and recomputed, and what is used afterwards is
bit for bit what a clean run gives. A shipped file is never touched: it is reported (a warning
naming it) and the harness falls back to the cache or training ("handled"). A cache that cannot be
written is said in one line and the run goes on without caching, leaving no half-written file
("handled"). The readers and writers refuse with one error naming the path ("clear-error").
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from faults.support import BareTraceback, SilentWrong, cli
from influence_bench import paths
from influence_bench.api.loading import build_context
from influence_bench.data import datasets as data_mod
from influence_bench.groundtruth import CorruptGroundTruthWarning, GroundTruthStore, build, store_key
from influence_bench.hashing import hash_json, sha256_array
from influence_bench.scoring import setting_info as si
from influence_bench.spec import catalog
from influence_bench.training import fit as training
from influence_bench.training import shipped as shipped_models

SID = "iris-logreg-wd1e-3"
SETTING = catalog.get_setting(SID)
storage = pytest.mark.fault


# ---- a clean run, and what the tests compare with -----------------------------------------------

@dataclass
class Clean:
    theta: torch.Tensor
    grad_norm: float
    ckpt: dict  # the checkpoint arrays
    info: dict  # the curvature record
    files: dict  # name -> bytes of the clean model cache folder
    shipped: Path  # a shipped root holding theta* and its curvature record
    delta: np.ndarray  # loo ground truth of removals 0..3 (all test columns)


def _context():
    return build_context(SETTING, data_mod.load(SETTING.data))


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Clean:
    root = tmp_path_factory.mktemp("clean")
    mp = pytest.MonkeyPatch()
    mp.setenv("INFLUENCE_BENCH_CACHE", str(root / "cache"))
    mp.setenv("INFLUENCE_BENCH_SHIPPED_GT", "")
    try:
        ctx = _context()
        assert ctx.theta_source == "trained"
        ctx.checkpoints()
        info = si.setting_info(ctx)
        folder = training.model_cache_path(SETTING).parent
        files = {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.endswith(".lock")}
        z = dict(np.load(training.model_cache_path(SETTING), allow_pickle=False))
        shipped = root / "shipped"
        training.export_model(SETTING, ctx.data, ctx.fm, ctx.theta, ctx.train_grad_norm, ctx.train_steps, shipped)
        shipped_models.write_info(SETTING, shipped, ctx.theta_sha256, info)
        delta = build(ctx, "loo", np.arange(4), GroundTruthStore(root / "gt", shipped=None)).delta
    finally:
        mp.undo()
    return Clean(ctx.theta.clone(), ctx.train_grad_norm, {k: v for k, v in z.items() if k.startswith("ckpt_")},
                 info, files, shipped, delta)


@pytest.fixture
def cache(tmp_path, monkeypatch, clean) -> Path:
    """A cache folder holding the clean model cache entry and curvature record (its ``models``)."""
    monkeypatch.setenv("INFLUENCE_BENCH_CACHE", str(tmp_path / "cache"))
    folder = training.model_cache_path(SETTING).parent
    folder.mkdir(parents=True)
    for name, raw in clean.files.items():
        (folder / name).write_bytes(raw)
    return folder


def npz_path() -> Path:
    return training.model_cache_path(SETTING)


def side_path() -> Path:
    return npz_path().with_suffix(".json")


def info_path(clean: Clean) -> Path:
    (name,) = [n for n in clean.files if n.endswith(".info.json")]
    return npz_path().parent / name


def guarded(fn, *a, **kw):
    """``fn(...)``; an exception escaping it is the bare traceback a user would have seen."""
    try:
        return fn(*a, **kw)
    except (AssertionError, pytest.fail.Exception):
        raise
    except Exception as exc:  # exactly what must not happen
        raise BareTraceback(f"{fn.__name__} raised {type(exc).__name__}: {exc}") from exc


def one_line(err: str, *names: str) -> str:
    """The one ``influence-bench:`` line on stderr, naming every string in ``names``."""
    if "Traceback" in err:
        raise BareTraceback(err[-3000:])
    lines = [ln for ln in err.splitlines() if ln.startswith("influence-bench:")]
    if not lines:
        raise SilentWrong(f"nothing said on stderr where one line was due:\n{err}")
    assert len(lines) == 1, f"{len(lines)} lines where one was due:\n{err}"
    missing = [n for n in names if n not in lines[0]]
    assert not missing, f"the line does not name {missing}:\n{lines[0]}"
    return lines[0]


def assert_set_aside(err: str, bad: Path, damaged: bytes) -> None:
    """One line saying ``bad`` was set aside as ``<bad>.bad-1`` (the damaged entry's other file may be
    the one it blames); the damaged bytes kept there."""
    one_line(err, str(bad.parent), bad.name + ".bad-1", "set aside as")
    aside = bad.with_name(bad.name + ".bad-1")
    assert aside.is_file() and aside.read_bytes() == damaged, "the damaged file was not kept for inspection"


def assert_same_theta(got: torch.Tensor, clean: Clean) -> None:
    if got.dtype != clean.theta.dtype or not torch.equal(got, clean.theta):
        raise SilentWrong(f"theta* used differs from a clean run's by {float((got - clean.theta).abs().max()):.3g}")


def assert_clean_entry(clean: Clean) -> None:
    """The cache entry now on disk holds the clean theta* and checkpoints, and loads silently."""
    z = dict(np.load(npz_path(), allow_pickle=False))
    if not np.array_equal(z["theta"], clean.theta.numpy()) or any(
            not np.array_equal(z[k], v) for k, v in clean.ckpt.items()):
        raise SilentWrong("the rewritten cache entry is not the clean one")
    assert json.loads(side_path().read_text())["theta_sha256"] == sha256_array(z["theta"])


def heal(capsys, clean: Clean):
    """Load the setting (the model cache is read, verified, healed); stderr; then again: silent, cached."""
    capsys.readouterr()
    ctx = guarded(_context)
    err = capsys.readouterr().err
    assert_same_theta(ctx.theta, clean)
    assert ctx.train_grad_norm == clean.grad_norm
    again = guarded(_context)
    assert again.theta_source == "cache" and capsys.readouterr().err == "", "the healed entry did not load silently"
    assert_same_theta(again.theta, clean)
    return ctx, err


def savez(path: Path, **arrays) -> bytes:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)  # numpy's own writer: a pickled object array where one is given
    return path.read_bytes()


def flip_bit_in(raw: bytes, needle: bytes, offset: int = 3, bit: int = 0x10) -> bytes:
    pos = raw.find(needle)
    assert pos >= 0
    out = bytearray(raw)
    out[pos + offset] ^= bit
    return bytes(out)


# ---- the model cache: theta* ------------------------------------------------------------------------

def _damage_npz(kind: str, clean: Clean) -> bytes:
    p = npz_path()
    raw = p.read_bytes()
    z = dict(np.load(p, allow_pickle=False))
    if kind == "truncated":
        p.write_bytes(raw[: len(raw) // 2])
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "bit-flipped":  # one bit of theta's bytes (the zip's CRC or the sidecar's sha256 tells)
        p.write_bytes(flip_bit_in(raw, z["theta"].tobytes()[:8]))
    elif kind == "forged":  # a valid .npz holding another theta*
        savez(p, **{**z, "theta": z["theta"] * (1 + 1e-3)})
    elif kind == "pickled":
        savez(p, **{**z, "theta": np.array(list(z["theta"]) + ["x"], dtype=object)})
    elif kind == "wrong-dtype":
        savez(p, **{**z, "theta": z["theta"].astype(np.float32)})
    elif kind == "wrong-shape":
        savez(p, **{**z, "theta": z["theta"][:-1]})
    elif kind == "npy-not-npz":
        with open(p, "wb") as fh:
            np.save(fh, z["theta"])
    return p.read_bytes()


@storage("storage", "recovered")
@pytest.mark.parametrize("kind", ["truncated", "empty", "bit-flipped", "forged", "pickled", "wrong-dtype",
                                  "wrong-shape", "npy-not-npz"])
def test_damaged_model_npz_is_set_aside_and_retrained(cache, clean, capsys, kind):
    damaged = _damage_npz(kind, clean)
    ctx, err = heal(capsys, clean)
    assert ctx.theta_source == "trained"
    assert_set_aside(err, npz_path(), damaged)
    assert_clean_entry(clean)


def _damage_sidecar(kind: str) -> bytes:
    p = side_path()
    text = p.read_text()
    meta = json.loads(text)

    def resealed(m):  # a self-consistent record: only the numbers can tell
        m = {k: v for k, v in m.items() if k != "record_sha256"}
        return json.dumps({**m, "record_sha256": hash_json(m)}, indent=2)

    if kind == "truncated":
        p.write_text(text[: len(text) // 2])
    elif kind == "empty":
        p.write_text("")
    elif kind == "bit-flipped":  # a digit of grad_norm: still valid JSON, another number
        needle = json.dumps(meta["grad_norm"]).encode()
        p.write_bytes(flip_bit_in(text.encode(), needle, offset=2, bit=0x01))
        assert json.loads(p.read_text())["grad_norm"] != meta["grad_norm"]
    elif kind == "forged":  # a valid, self-consistent sidecar recording another gradient norm
        p.write_text(resealed({**meta, "grad_norm": 1e-3}))
    elif kind == "wrong-keys":
        p.write_text(resealed({k: v for k, v in meta.items() if k != "grad_norm"}))
    elif kind == "not-an-object":
        p.write_text("[1, 2, 3]")
    elif kind == "nan":
        p.write_text(text.replace(json.dumps(meta["grad_norm"]), "NaN"))
    return p.read_bytes()


@storage("storage", "recovered")
@pytest.mark.parametrize("kind", ["truncated", "empty", "bit-flipped", "forged", "wrong-keys", "not-an-object",
                                  "nan"])
def test_damaged_sidecar_is_set_aside_and_retrained(cache, clean, capsys, kind):
    damaged = _damage_sidecar(kind)
    ctx, err = heal(capsys, clean)
    assert ctx.theta_source == "trained"
    assert_set_aside(err, side_path(), damaged)
    assert_clean_entry(clean)


@storage("storage", "recovered")
def test_missing_sidecar_is_an_incomplete_entry_set_aside_and_retrained(cache, clean, capsys):
    side_path().unlink()
    damaged = npz_path().read_bytes()
    _, err = heal(capsys, clean)
    assert_set_aside(err, npz_path(), damaged)
    assert "sidecar" in err and "missing" in err
    assert_clean_entry(clean)


def _legacy_sidecar(clean: Clean) -> None:
    """The sidecar as written before checksums: no format, no sha256."""
    meta = json.loads(side_path().read_text())
    side_path().write_text(json.dumps({k: meta[k] for k in ("setting", "spec_hash", "grad_norm", "steps",
                                                            "checkpoints")}))


@storage("storage", "recovered")
def test_entry_written_before_checksums_is_held_to_its_gradient_norm(cache, clean, capsys):
    _legacy_sidecar(clean)
    ctx = guarded(_context)  # an intact old entry still loads, silently
    assert ctx.theta_source == "cache" and capsys.readouterr().err == ""
    assert_same_theta(ctx.theta, clean)
    z = dict(np.load(npz_path(), allow_pickle=False))
    savez(npz_path(), **{**z, "theta": z["theta"] * (1 + 1e-4)})  # another theta*, nothing to check it against
    damaged = npz_path().read_bytes()
    ctx, err = heal(capsys, clean)
    assert_set_aside(err, npz_path(), damaged)
    assert "gradient norm" in err
    assert_clean_entry(clean)


@storage("storage", "handled")
def test_sidecar_of_a_newer_format_is_left_alone_and_theta_trained_without_caching(cache, clean, capsys):
    meta = json.loads(side_path().read_text())
    side_path().write_text(json.dumps({**meta, "format": 99, "something": "new"}))
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    capsys.readouterr()
    ctx = guarded(_context)
    err = capsys.readouterr().err
    one_line(err, str(side_path()), "newer influence-bench")
    assert ctx.theta_source == "trained"
    assert_same_theta(ctx.theta, clean)
    after = {p.name: p.read_bytes() for p in cache.iterdir() if not p.name.endswith(".lock")}
    assert after == {k: v for k, v in before.items() if not k.endswith(".lock")}  # nothing moved or overwritten


# ---- the checkpoint arrays in the same .npz ---------------------------------------------------------

def _assert_clean_checkpoints(ctx, clean: Clean) -> None:
    ck = ctx.checkpoints()
    thetas = torch.stack([t for t, _ in ck[:-1]]).numpy()
    lrs = np.array([lr for _, lr in ck[:-1]])
    if not (np.array_equal(thetas, clean.ckpt["ckpt_theta"]) and np.array_equal(lrs, clean.ckpt["ckpt_lr"])
            and ck[-1][1] == float(clean.ckpt["ckpt_final_lr"]) and torch.equal(ck[-1][0], clean.theta)):
        raise SilentWrong("the checkpoints used are not a clean run's")


@storage("storage", "recovered")
@pytest.mark.parametrize("kind", ["forged", "pickled", "wrong-shape-before-checksums"])
def test_damaged_checkpoint_arrays_are_set_aside_and_recomputed(cache, clean, capsys, kind):
    z = dict(np.load(npz_path(), allow_pickle=False))
    if kind == "forged":  # valid arrays, other learning-rate weights
        z["ckpt_lr"] = z["ckpt_lr"] * 2
    elif kind == "pickled":
        z["ckpt_lr"] = np.array(list(z["ckpt_lr"]), dtype=object)
    else:  # an entry without checksums holding checkpoints of another size
        _legacy_sidecar(clean)
        z["ckpt_theta"] = z["ckpt_theta"][:, :-1]
    damaged = savez(npz_path(), **z)
    ctx, err = heal(capsys, clean)
    assert_set_aside(err, npz_path(), damaged)
    assert_clean_entry(clean)
    _assert_clean_checkpoints(ctx, clean)


@storage("storage", "recovered")
def test_entry_damaged_after_loading_heals_when_the_checkpoints_are_read(cache, clean, capsys):
    ctx = guarded(_context)
    assert ctx.theta_source == "cache"
    raw = npz_path().read_bytes()
    npz_path().write_bytes(raw[:-300])  # damaged between loading theta* and reading its checkpoints
    damaged = npz_path().read_bytes()
    capsys.readouterr()
    _assert_clean_checkpoints(ctx, clean)  # replayed, bit for bit
    assert_set_aside(capsys.readouterr().err, npz_path(), damaged)
    assert_clean_entry(clean)  # and rewritten from the replay


# ---- the curvature record ---------------------------------------------------------------------------

def _damage_info(kind: str, p: Path) -> bytes:
    doc = json.loads(p.read_text())
    text = p.read_text()
    if kind == "truncated":
        p.write_text(text[: len(text) // 2])
    elif kind == "empty":
        p.write_text("")
    elif kind == "bit-flipped":  # a digit of the top eigenvalue: valid JSON, another number
        needle = json.dumps(doc["info"]["hessian_eigenvalues"]["top"][0]).encode()
        p.write_bytes(flip_bit_in(text.encode(), needle, offset=3, bit=0x01))
        assert json.loads(p.read_text()) != doc
    elif kind == "forged":  # valid and self-consistent, but other test points than theta* gives
        tp = doc["info"]["test_points"]
        info = {**doc["info"], "test_points": {**tp, "highest_loss": tp["highest_loss"] + 1}}
        p.write_text(json.dumps({**doc, "info": info, "sha256": hash_json(info)}))
    elif kind == "not-json":
        p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return p.read_bytes()


@storage("storage", "recovered")
@pytest.mark.parametrize("kind", ["truncated", "empty", "bit-flipped", "forged", "not-json"])
def test_damaged_curvature_record_is_set_aside_and_recomputed(cache, clean, capsys, kind):
    p = info_path(clean)
    damaged = _damage_info(kind, p)
    ctx = guarded(_context)
    capsys.readouterr()
    info = guarded(si.setting_info, ctx)
    assert_set_aside(capsys.readouterr().err, p, damaged)
    if info != clean.info:
        raise SilentWrong("the curvature record used is not a clean run's")
    assert json.loads(p.read_text())["info"] == clean.info  # rewritten
    assert guarded(si.setting_info, _context()) == clean.info and capsys.readouterr().err == ""


@storage("storage", "handled")
def test_curvature_record_of_a_newer_format_is_left_alone(cache, clean, capsys):
    p = info_path(clean)
    p.write_text(json.dumps({"format": 7, "whatever": [1, 2]}))
    before = p.read_bytes()
    ctx = guarded(_context)
    capsys.readouterr()
    info = guarded(si.setting_info, ctx)
    one_line(capsys.readouterr().err, str(p), "newer influence-bench")
    assert info == clean.info and p.read_bytes() == before


# ---- the shipped layer: reported, never touched, the cache or training instead -------------------------

@pytest.fixture
def shipped(tmp_path, monkeypatch, clean) -> Path:
    root = tmp_path / "shipped"
    shutil.copytree(clean.shipped, root)
    monkeypatch.setenv("INFLUENCE_BENCH_SHIPPED_GT", str(root))
    monkeypatch.setenv("INFLUENCE_BENCH_CACHE", str(tmp_path / "empty-cache"))
    return root


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@storage("storage", "handled")
@pytest.mark.parametrize("kind", ["truncated", "forged", "pickled"])
def test_damaged_shipped_model_is_reported_left_alone_and_theta_trained(shipped, clean, kind):
    ctx0 = guarded(_context)
    assert ctx0.theta_source == "shipped"  # intact: used
    p = shipped_models.path_for(SETTING, shipped)
    z = dict(np.load(p, allow_pickle=False))
    if kind == "truncated":
        p.write_bytes(p.read_bytes()[:-500])
    elif kind == "forged":  # another theta* with every checksum made to match: only its gradient norm tells
        meta = json.loads(str(z["meta"]))
        theta = z["theta"] * (1 + 1e-3)
        sums = {**meta["sha256"], "theta": sha256_array(theta)}
        savez(p, **{**z, "theta": theta, "meta": np.array(json.dumps({**meta, "theta_sha256": sums["theta"],
                                                                       "sha256": sums}))})
    else:
        savez(p, **{**z, "theta": np.array(list(z["theta"]), dtype=object)})
    before = _tree(shipped)
    with pytest.warns(shipped_models.ShippedModelWarning, match=re.escape(str(p))):
        ctx = guarded(_context)
    assert ctx.theta_source == "trained"
    assert_same_theta(ctx.theta, clean)
    assert _tree(shipped) == before  # never modified, nothing added


@storage("storage", "handled")
@pytest.mark.parametrize("kind", ["not-json", "forged"])
def test_damaged_shipped_curvature_record_is_reported_and_recomputed(shipped, clean, kind):
    p = shipped_models.info_path_for(SETTING, shipped)
    doc = json.loads(p.read_text())
    if kind == "not-json":
        p.write_text('{"theta_sha256": "')
    else:  # this theta*'s record, with other test points than theta* gives
        p.write_text(json.dumps({**doc, "info": {**doc["info"], "n_train": 7}}))
    before = _tree(shipped)
    ctx = guarded(_context)
    assert ctx.theta_source == "shipped"
    with pytest.warns(shipped_models.ShippedModelWarning, match=re.escape(str(p))):
        info = guarded(si.setting_info, ctx)
    if info != clean.info:
        raise SilentWrong("the curvature record used is not a clean run's")
    assert _tree(shipped) == before


# ---- ground-truth store entries: refused with the path named, recomputed, never wrong ------------------

@pytest.fixture
def gt(tmp_path, monkeypatch, clean):
    monkeypatch.setenv("INFLUENCE_BENCH_CACHE", str(tmp_path / "cache"))
    ctx = _context()
    store = GroundTruthStore(tmp_path / "gt", shipped=None)
    got = build(ctx, "loo", np.arange(4), store).delta
    np.testing.assert_array_equal(got, clean.delta)
    (shard,) = store.shards(store_key(ctx))
    return ctx, store, shard


def _damage_shard(kind: str, shard: Path, ctx) -> None:
    raw = shard.read_bytes()
    z = dict(np.load(shard, allow_pickle=False))
    meta = json.loads(str(z["meta"]))
    if kind == "truncated":
        shard.write_bytes(raw[: len(raw) // 2])
    elif kind == "empty":
        shard.write_bytes(b"")
    elif kind == "bit-flipped":  # inside delta's bytes
        shard.write_bytes(flip_bit_in(raw, z["delta"][1, 2].tobytes()))
    elif kind == "forged":  # valid arrays, other numbers, the meta untouched
        savez(shard, **{**z, "delta": z["delta"] * 1.5})
    elif kind == "pickled":
        savez(shard, **{**z, "delta": np.array(list(z["delta"]), dtype=object)})
    elif kind == "other-key":  # an intact shard of another key
        savez(shard, **{**z, "meta": np.array(json.dumps({**meta, "key": store_key(ctx, "lds").digest}))})
    elif kind == "future-schema":  # a newer writer's array the meta vouches for
        extra = np.ones(len(z["ids"]))
        meta["sha256"]["weights"] = sha256_array(extra)
        savez(shard, **{**z, "weights": extra, "meta": np.array(json.dumps({**meta, "schema": 2}))})
    elif kind == "meta-not-a-record":
        savez(shard, **{**z, "meta": np.array(json.dumps([meta]))})
    elif kind == "mistyped-arrays":  # checksums made to match, ids as text
        ids = np.array([str(i) for i in z["ids"]])
        meta["sha256"]["ids"] = sha256_array(ids)
        savez(shard, **{**z, "ids": ids, "meta": np.array(json.dumps(meta))})


@storage("storage", "recovered")
@pytest.mark.parametrize("kind", ["truncated", "empty", "bit-flipped", "forged", "pickled", "other-key",
                                  "future-schema", "meta-not-a-record", "mistyped-arrays"])
def test_damaged_ground_truth_shard_is_refused_and_recomputed(gt, clean, counting, kind):
    ctx, store, shard = gt
    _damage_shard(kind, shard, ctx)
    damaged = shard.read_bytes()
    counting.clear()
    with pytest.warns(CorruptGroundTruthWarning, match=re.escape(str(shard))):
        got = guarded(build, ctx, "loo", np.arange(4), store).delta
    if not np.array_equal(got, clean.delta):
        raise SilentWrong("ground truth after the damage is not a clean run's")
    assert sorted(i for c in counting for i in c) == [0, 1, 2, 3]  # recomputed, nothing taken from the damaged shard
    (aside,) = shard.parent.glob(shard.name + ".*.corrupt")
    assert aside.read_bytes() == damaged  # kept for inspection
    assert np.array_equal(guarded(build, ctx, "loo", np.arange(4), store).delta, clean.delta)


@storage("storage", "recovered")
def test_damaged_shipped_ground_truth_shard_is_refused_left_alone_and_recomputed(tmp_path, monkeypatch, clean,
                                                                                 counting):
    from influence_bench.groundtruth import ground_truth
    from influence_bench.groundtruth import shipped as gt_shipped

    monkeypatch.setenv("INFLUENCE_BENCH_CACHE", str(tmp_path / "cache"))
    ctx = _context()
    out = tmp_path / "shipped-gt"
    gt_shipped.export(ctx, np.arange(4), GroundTruthStore(tmp_path / "export", shipped=None), out)
    (shard,) = (out / SID).glob("*/shard-*.npz")
    z = dict(np.load(shard, allow_pickle=False))
    savez(shard, **{**z, "delta": z["delta"] + 1e-9})  # plausible numbers, the checksums untouched
    before = _tree(out)
    counting.clear()
    with pytest.warns(CorruptGroundTruthWarning, match=re.escape(str(shard))):
        got = guarded(ground_truth, ctx, np.arange(4), GroundTruthStore(tmp_path / "fresh", shipped=out),
                      cols=ctx.test_idx)
    if not np.array_equal(got, clean.delta[:, ctx.test_idx]):
        raise SilentWrong("ground truth after the damage is not a clean run's")
    assert sorted(i for c in counting for i in c) == [0, 1, 2, 3] and _tree(out) == before


# ---- folders that cannot be written, disks that fill ------------------------------------------------

@contextlib.contextmanager
def read_only(monkeypatch, folder: Path):
    """``folder`` not writable: chmod 555, and as root (whom permissions do not stop) every call that
    would create, rename or remove something in it fails with EACCES, as it would for anyone else."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)

    def inside(p) -> bool:
        p = Path(os.path.abspath(os.fspath(p)))
        return p.parent == folder or p == folder

    def refuse(p):
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(p))

    if os.geteuid() == 0:
        real_open, real_mkdir, real_replace, real_rename, real_link, real_unlink = (
            os.open, os.mkdir, os.replace, os.rename, os.link, os.unlink)
        writing = os.O_CREAT | os.O_WRONLY | os.O_RDWR | os.O_TRUNC

        def fake_open(p, flags, *a, **k):
            if flags & writing and inside(p):
                refuse(p)
            return real_open(p, flags, *a, **k)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", lambda p, *a, **k: refuse(p) if inside(p) else real_mkdir(p, *a, **k))
        monkeypatch.setattr(os, "replace", lambda s, d, **k: refuse(d) if inside(s) or inside(d)
                            else real_replace(s, d, **k))
        monkeypatch.setattr(os, "rename", lambda s, d, **k: refuse(d) if inside(s) or inside(d)
                            else real_rename(s, d, **k))
        monkeypatch.setattr(os, "link", lambda s, d, **k: refuse(d) if inside(d) else real_link(s, d, **k))
        monkeypatch.setattr(os, "unlink", lambda p, **k: refuse(p) if inside(p) else real_unlink(p, **k))
    try:
        yield folder
    finally:
        folder.chmod(0o755)


@storage("storage", "handled")
def test_read_only_model_cache_folder_trains_without_caching_in_one_line(tmp_path, monkeypatch, clean, capsys):
    monkeypatch.setenv("INFLUENCE_BENCH_CACHE", str(tmp_path / "cache"))
    folder = npz_path().parent
    capsys.readouterr()
    with read_only(monkeypatch, folder):
        ctx = guarded(_context)
        info = guarded(si.setting_info, ctx)
    err = capsys.readouterr().err
    one_line(err, str(folder), "not writable", "Permission denied")  # one line, not one per file
    assert ctx.theta_source == "trained" and info == clean.info
    assert_same_theta(ctx.theta, clean)
    assert list(folder.iterdir()) == []  # nothing half-written


@storage("storage", "handled")
def test_damaged_entry_in_a_read_only_folder_is_reported_and_left_there(cache, monkeypatch, clean, capsys):
    npz_path().write_bytes(b"")
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    capsys.readouterr()
    with read_only(monkeypatch, cache):
        ctx = guarded(_context)
    one_line(capsys.readouterr().err, str(npz_path()), "unreadable", "not writable")
    assert_same_theta(ctx.theta, clean)
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before


@storage("storage", "handled")
def test_cache_folder_that_cannot_be_created_trains_without_caching(tmp_path, monkeypatch, clean, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("INFLUENCE_BENCH_CACHE", str(blocker / "cache"))
    capsys.readouterr()
    ctx = guarded(_context)
    one_line(capsys.readouterr().err, str(npz_path().parent), "not writable")
    assert_same_theta(ctx.theta, clean)


def disk_full(monkeypatch, which: str) -> None:
    """The disk fills while writing a file whose name contains ``which``: half of it reaches the
    temporary file, then ENOSPC (the writer patched, as a full disk would make it fail)."""
    real = paths._write_bytes_synced

    def full(fh, data=None):
        if which in os.path.basename(fh.name):
            if data is not None:
                fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fh, data)

    monkeypatch.setattr(paths, "_write_bytes_synced", full)


@storage("storage", "handled")
@pytest.mark.parametrize("which", [".npz", ".json"])
def test_full_disk_while_caching_theta_leaves_nothing_half_written(tmp_path, monkeypatch, clean, capsys, which):
    monkeypatch.setenv("INFLUENCE_BENCH_CACHE", str(tmp_path / "cache"))
    path = npz_path() if which == ".npz" else side_path()
    capsys.readouterr()
    with monkeypatch.context() as m:
        disk_full(m, path.name)
        ctx = guarded(_context)
    one_line(capsys.readouterr().err, str(path), "No space left on device", "not cached")
    assert_same_theta(ctx.theta, clean)
    assert sorted(p.name for p in npz_path().parent.iterdir() if not p.name.endswith(".lock")) == []
    ctx, err = heal(capsys, clean)  # the disk has room again: trained, cached, and the cache is clean
    assert err == ""
    assert_clean_entry(clean)


@storage("storage", "handled")
def test_full_disk_while_caching_the_curvature_record(cache, monkeypatch, clean, capsys):
    p = info_path(clean)
    p.unlink()
    ctx = guarded(_context)
    capsys.readouterr()
    with monkeypatch.context() as m:
        disk_full(m, ".info.json")
        info = guarded(si.setting_info, ctx)
    one_line(capsys.readouterr().err, str(p), "No space left on device")
    assert info == clean.info and not p.exists() and not list(cache.glob(".*.tmp"))


@storage("storage", "clear-error")
def test_writers_fail_with_one_error_naming_the_path_and_keep_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.npz"
    paths.write_npz(target, x=np.arange(3))
    old = target.read_bytes()
    disk_full(monkeypatch, "a.npz")
    with pytest.raises(paths.WriteFailed) as info:
        paths.write_npz(target, x=np.arange(1000))
    assert str(target) in str(info.value) and "No space left on device" in str(info.value)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert target.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["a.npz"]


@storage("storage", "clear-error")
def test_readers_refuse_damaged_files_with_one_error_naming_the_path(tmp_path):
    good = tmp_path / "good.npz"
    paths.write_npz(good, x=np.arange(5.0))
    raw = good.read_bytes()
    cases = {"truncated.npz": raw[:-40], "empty.npz": b"", "flipped.npz": flip_bit_in(raw, np.arange(5.0).tobytes()),
             "text.npz": b"hello"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    savez(tmp_path / "pickled.npz", x=np.array([{"a": 1}], dtype=object))
    with open(tmp_path / "array.npz", "wb") as fh:
        np.save(fh, np.arange(3))
    for name in [*cases, "pickled.npz", "array.npz"]:
        with pytest.raises(paths.UnreadableFile) as info:
            paths.read_npz(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and info.value.path == tmp_path / name
    for name, data in {"empty.json": b"", "cut.json": b'{"a": [1, 2', "nan.json": b'{"a": NaN}',
                       "latin1.json": b'{"a": "\xe9"}'}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(paths.UnreadableFile, match=re.escape(str(tmp_path / name))):
            paths.read_json(tmp_path / name)
    assert paths.read_npz(good)["x"].tolist() == [0, 1, 2, 3, 4]


# ---- the command line ------------------------------------------------------------------------------

@storage("storage", "recovered")
def test_score_with_a_damaged_model_cache_heals_in_one_line(cache, clean, tmp_path):
    npz_path().write_bytes(npz_path().read_bytes()[:100])
    damaged = npz_path().read_bytes()
    res = cli("score", "exact", "--settings", SID, "--no-baseline", "--results-dir", str(tmp_path / "results"))
    assert res.rc == 0, res.err[-2000:]
    assert_set_aside(res.err, npz_path(), damaged)
    assert "results written to" in res.out
    assert_clean_entry(clean)
