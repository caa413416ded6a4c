"""Deterministic full-batch training to (near) convergence, cached on disk by the setting's hash.

The cache holds the flat theta* as ``.npz`` (no pickle) plus a JSON record of how it was reached
(the sidecar: gradient norm, steps, the sha256 of theta* and of every array, and of itself).
Next to ``theta`` the same ``.npz`` holds a few training checkpoints for trajectory-based
estimators (TracIn, TRAK): see ``Checkpoints``. Cache entries written before checkpoints existed
still load; their checkpoints are recovered on first use by replaying the (deterministic) fit.

Nothing loaded is trusted unchecked (``_read_entry``): an entry that is unreadable (truncated,
empty, flipped bits, a pickled array, not JSON), inconsistent (wrong dtype or size, a checksum or
the recomputed training gradient norm disagreeing with the sidecar; entries written before the
checksums are held to the gradient norm alone) or incomplete is reported in one line on stderr, set
aside as ``<file>.bad-<n>`` and retrained. A sidecar of a newer format is left alone. A cache folder
that cannot be written, or a disk that fills, is reported and theta* is used without caching.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from influence_bench import tally
from influence_bench.curvature import products as curvature
from influence_bench.data.datasets import Dataset
from influence_bench.hashing import hash_json, sha256_array
from influence_bench.models.flat import FlatModel, build_model
from influence_bench.models.init_weights import init_weights_sha256, load_init_weights, tagged_cache_path
from influence_bench.paths import (
    UnreadableFile,
    cache_dir,
    portable,
    read_json,
    read_npz,
    report,
    report_write_failure,
    set_aside,
    shipped_gt_dir,
    write_json,
    write_npz,
)
from influence_bench.spec.settings import Setting
from influence_bench.training import minibatch
from influence_bench.training import shipped as shipped_models
from influence_bench.training.checkpoints import (  # noqa: F401
    ARRAY_KEYS,
    Checkpoints,
    TrajectoryRecorder,
    _RecordingLBFGS,
    arrays_problem,
)
from influence_bench.training.newton import Preconditioner, newton_cg_batched

DTYPES = {"float64": torch.float64, "float32": torch.float32}
POLISH_LM_STEPS = 200  # the adaptive Levenberg-Marquardt polish, where plain Newton polish stalled


@dataclass
class Trained:
    fm: FlatModel
    theta: torch.Tensor  # theta*, detached
    grad_norm: float
    steps: int
    from_cache: bool  # loaded, not trained (from the cache or the shipped layer)
    source: str = "trained"  # "trained", "cache" or "shipped" (``shipped_models.py``)


def model_cache_path(setting: Setting) -> Path:
    """The cache entry of theta*: keyed by what determines it (``training_hash``) and, when the user
    supplies initial weights (``init_weights.py``), by the weights file's sha256."""
    path = cache_dir() / "models" / f"{setting.id}-{setting.training_hash}.npz"
    return tagged_cache_path(path, init_weights_sha256(setting))


def initial_module(setting: Setting, data: Dataset, dtype, device) -> torch.nn.Module:
    """The setting's model at its initialisation: seeded, or the user's weights where supplied."""
    module = build_model(setting.model, data.n_features, data.n_classes, setting.train.seed, dtype,
                         in_shape=tuple(data.x_train.shape[1:]))
    load_init_weights(setting, module)
    return module.to(device)


def _objective_grad(fm: FlatModel, data: Dataset, weight_decay: float):
    def g(t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            t = t.detach().requires_grad_(True)
            return torch.autograd.grad(curvature.objective(fm, t, data.x_train, data.y_train, weight_decay), t)[0]
    return g


def train_lbfgs(fm: FlatModel, theta0: torch.Tensor, data: Dataset, weight_decay: float,
                max_steps: int, grad_tol: float, recorder: TrajectoryRecorder | None = None,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, float, int]:
    """Full-batch L-BFGS (strong Wolfe) on the training objective until ||grad|| < grad_tol.

    With a ``recorder``, every accepted iterate is reported to it (same trajectory).
    """
    theta = theta0.clone().requires_grad_(True)
    kw = dict(lr=1.0, max_iter=max_steps, history_size=50, tolerance_grad=grad_tol, tolerance_change=0.0,
              line_search_fn="strong_wolfe")
    if recorder is None:
        opt = torch.optim.LBFGS([theta], **kw)
    else:
        opt = _RecordingLBFGS([theta], recorder, _objective_grad(fm, data, weight_decay), **kw)

    def closure():
        opt.zero_grad()
        loss = curvature.objective(fm, theta, data.x_train, data.y_train, weight_decay, weights)
        loss.backward()
        return loss

    steps = 0
    for _ in range(10):  # LBFGS may stop early on a flat line search; restart a few times
        opt.step(closure)
        steps = opt.state[opt._params[0]]["n_iter"]
        g = torch.autograd.grad(curvature.objective(fm, theta, data.x_train, data.y_train, weight_decay, weights),
                                theta)[0]
        if g.norm() < grad_tol or steps >= max_steps:
            break
    gnorm = float(g.norm())
    return theta.detach(), gnorm, int(steps)


def fit(fm: FlatModel, theta0: torch.Tensor, data: Dataset, setting: Setting,
        recorder: TrajectoryRecorder | None = None, weights: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, float, int]:
    """L-BFGS to ``lbfgs_tol``, then Newton polish to ``grad_tol``; returns (theta*, ||grad||, steps).

    A ``recorder`` sees every L-BFGS iterate (the result is the same with or without one).
    ``weights`` ([n], full-batch recipes only): per-point weights of the objective (0 = removed),
    for scratch retraining.
    """
    spec = setting.train
    with reproducible_threads(spec.weight_decay == 0 or spec.minibatch):
        if spec.minibatch:
            if weights is not None:
                raise ValueError("minibatch fits take their weights through minibatch.train")
            return _fit_minibatch(fm, theta0, data, setting, recorder)
        return _fit(fm, theta0, data, setting, recorder, weights)


def minibatch_recipe(setting: Setting, n_train: int) -> "minibatch.Recipe":
    """The minibatch training recipe of ``setting`` (``epochs`` whole epochs of ``n // batch_size`` steps)."""
    t = setting.train
    if t.lr <= 0 or t.batch_size < 1 or t.epochs < 1:
        raise ValueError(f"setting {setting.id!r}: {t.optimizer} training needs lr > 0, batch_size >= 1 and "
                         f"epochs >= 1; got lr={t.lr}, batch_size={t.batch_size}, epochs={t.epochs}")
    return minibatch.Recipe(t.optimizer, t.lr, t.batch_size, t.epochs * (n_train // t.batch_size), t.momentum)


def _fit_minibatch(fm: FlatModel, theta0: torch.Tensor, data: Dataset, setting: Setting,
                   recorder: TrajectoryRecorder | None = None) -> tuple[torch.Tensor, float, int]:
    """Minibatch training (``minibatch.py``); the recorder receives the end-of-epoch checkpoints,
    each weighted by the learning rate times the steps it stands for (TracInCP's weighting)."""
    n = data.x_train.shape[0]
    recipe = minibatch_recipe(setting, n)
    per_epoch = n // recipe.batch_size
    theta, kept, at = minibatch.fit(fm, theta0, data.x_train, data.y_train, setting.weight_decay, recipe,
                                    setting.train.seed, per_epoch, max_keep=recorder.max_keep if recorder else 10)
    if recorder is not None:
        bounds = np.concatenate([[0], at, [recipe.steps]])
        recorder.fixed = Checkpoints(kept, at, recipe.lr * np.diff(bounds[:-1]).astype(np.float64),
                                     float(recipe.lr * (bounds[-1] - bounds[-2])), recipe.steps)
    gnorm = float(_objective_grad(fm, data, setting.weight_decay)(theta).norm())
    return theta, gnorm, recipe.steps


@contextlib.contextmanager
def reproducible_threads(pin: bool):
    """Fits whose end point depends on rounding run on one thread. Without weight decay a net has
    no minimiser: L-BFGS runs its whole budget along a flat valley. Minibatch SGD is chaotic over
    its thousand steps. In both, rounding differences (the order of a multi-threaded reduction)
    grow into a different end point, so theta* (and the test points chosen from its losses, which
    key the shipped ground truth) would depend on the machine's thread count. With weight decay a
    full-batch fit converges to one minimiser whatever the rounding, and keeps every thread."""
    if not pin:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(fm: FlatModel, theta0: torch.Tensor, data: Dataset, setting: Setting,
         recorder: TrajectoryRecorder | None = None, weights: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, float, int]:
    spec = setting.train
    theta, gnorm, steps = train_lbfgs(fm, theta0, data, spec.weight_decay, spec.max_steps, spec.lbfgs_tol, recorder,
                                      weights)
    if recorder is not None:
        recorder.theta_end = theta.clone()
    if gnorm > spec.grad_tol and spec.newton_steps > 0:
        # Newton-CG polish with a line search; deep tanh nets have near-flat directions where
        # undamped steps stall, so damping (Levenberg-Marquardt) is raised until it helps.
        # (with ``weights`` the unweighted Hessian only preconditions: removing points changes it by O(1/n))
        H = curvature.hessian(fm, theta, data.x_train, data.y_train, spec.weight_decay)
        ones = (torch.ones(1, data.x_train.shape[0], dtype=theta.dtype, device=theta.device) if weights is None
                else weights[None].to(theta.dtype))
        # Last, adaptive Levenberg-Marquardt steps (the damping follows the gain ratio) with a longer
        # budget: on iris d3 and d6 (wd 1e-3) the first two stopped at ||grad|| 5.8e-6 and 1.1e-6.
        for damping, adaptive, budget in ((0.0, False, spec.newton_steps), (1e-4, False, spec.newton_steps),
                                          (1e-4, True, POLISH_LM_STEPS)):
            res = newton_cg_batched(fm, theta, ones, data.x_train, data.y_train, spec.weight_decay,
                                    Preconditioner.from_hessian(H, damping), budget,
                                    spec.grad_tol, damping=damping, cg_iters=10, adaptive=adaptive)
            gn = float(res.grad_norm[0])
            if math.isfinite(gn) and gn < gnorm:
                theta, gnorm, steps = res.theta[0], gn, steps + int(res.steps[0])
            if gnorm < spec.grad_tol:
                break
    return theta, gnorm, steps


def train(setting: Setting, data: Dataset, device: str = "cpu", use_cache: bool = True) -> Trained:
    """theta* for ``setting``: loaded from the shipped layer or the cache if present and verified,
    else trained and stored. A damaged or inconsistent cache entry is reported (one line on stderr),
    set aside as ``<file>.bad-<n>`` and retrained; a cache that cannot be written is reported and
    theta* is trained without caching."""
    dtype = DTYPES[setting.train.dtype]
    fm = FlatModel(initial_module(setting, data, dtype, device))
    if not use_cache:
        return _train_here(setting, data, fm, device)[0]
    got = _load_shipped(setting, data, fm, device, dtype)  # first: the shipped ground truth was computed from it
    if got is not None:
        return got
    path = model_cache_path(setting)
    problem = None
    if _present(path):
        try:
            return _read_entry(path, setting, data, fm, device, dtype)[0]
        except (BadEntry, _FutureEntry) as exc:
            problem = exc  # acted on under the lock (another process may be repairing it)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError as exc:
        where = f"the model cache folder {path.parent} is not writable ({_reason(exc)})"
        if problem is not None:
            report(f"{problem}, and {where}, so it stays where it is; theta* of {setting.id} is trained here "
                   "without caching")
        else:
            report_write_failure(path.parent, exc, f"{where}; theta* of {setting.id} is trained here without caching")
        return _train_here(setting, data, fm, device)[0]
    try:
        cacheable = True
        if _present(path):  # read again under the lock: another process may have repaired it
            try:
                return _read_entry(path, setting, data, fm, device, dtype)[0]
            except _FutureEntry as exc:
                report(f"{exc}; it is left as it is, and theta* of {setting.id} is trained here without caching")
                cacheable = False
            except BadEntry as bad:
                cacheable = _set_aside_entry(path, bad, setting, "retrained")
        trained, ckpt = _train_here(setting, data, fm, device)
        if cacheable:
            _write_entry(path, setting, trained.theta, trained.grad_norm, trained.steps, ckpt)
    finally:
        lock.release()
    return trained


def _train_here(setting: Setting, data: Dataset, fm: FlatModel, device) -> tuple[Trained, Checkpoints]:
    rec = TrajectoryRecorder()
    tally.add(tally.TRAINED, setting.id)
    theta, gnorm, steps = fit(fm, fm.flat().to(device), data, setting, rec)
    ckpt = _finish(rec, fm, data, setting, theta)
    return Trained(fm, theta, gnorm, steps, from_cache=False), ckpt


# ---- the model cache: verified on load, healed when damaged ------------------------------------

MODEL_FORMAT = 2  # of the sidecar: 1 (no "format" field) before checksums; 2 adds theta_sha256, sha256, record_sha256
# The training gradient norm recomputed at a loaded theta* must agree with the recorded one to
# GRAD_RTOL relative or the dtype's GRAD_ATOL: measured on every shipped smoke model, recomputation
# on 1 or 2 threads differs by at most 2.7e-2 relative where the norm is rounding noise (1.3e-15,
# iris d8) and 3.9e-7 absolute in float32 (mnist5k CNN); a wrong theta* is off by orders of magnitude.
GRAD_RTOL = 5e-2
GRAD_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5}


class BadEntry(Exception):
    """A model cache file that cannot be used: ``path`` the file at fault, ``state`` "unreadable",
    "inconsistent" or "incomplete", ``why`` what failed."""

    def __init__(self, path: Path, state: str, why: str):
        super().__init__(f"model cache {path} is {state} ({why})")
        self.path, self.state, self.why = Path(path), state, why


class _FutureEntry(Exception):
    def __init__(self, path: Path, fmt):
        super().__init__(f"model cache {path} was written by a newer influence-bench (format {fmt})")
        self.path, self.fmt = Path(path), fmt


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _reason(exc: OSError) -> str:
    return getattr(exc, "reason", None) or exc.strerror or f"{type(exc).__name__}: {exc}"


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def grad_norm_agrees(now: float, recorded: float, dtype) -> bool:
    """Whether a recomputed training gradient norm matches the recorded one (``GRAD_RTOL``, ``GRAD_ATOL``)."""
    return math.isfinite(now) and abs(now - recorded) <= GRAD_RTOL * max(now, recorded) + GRAD_ATOL.get(dtype, 1e-5)


def _entry_record(setting: Setting, arrays: dict[str, np.ndarray], grad_norm: float, steps: int,
                  ckpt_meta: dict | None) -> dict:
    meta = {"format": MODEL_FORMAT, "setting": setting.id, "spec_hash": setting.spec_hash,
            "grad_norm": float(grad_norm), "steps": int(steps)}
    if ckpt_meta is not None:
        meta["checkpoints"] = ckpt_meta
    meta["theta_sha256"] = sha256_array(arrays["theta"])
    meta["sha256"] = {k: sha256_array(v) for k, v in arrays.items()}
    meta["record_sha256"] = hash_json(meta)
    return meta


def _write_entry(path: Path, setting: Setting, theta: torch.Tensor, grad_norm: float, steps: int,
                 ckpt: Checkpoints, ckpt_meta: dict | None = None) -> bool:
    """theta* and its checkpoints, then the sidecar that vouches for them (each atomically). A failed
    write (disk full, folder not writable) is reported and leaves no entry behind; returns success."""
    arrays = {"theta": theta.detach().cpu().numpy(), **ckpt.to_arrays()}
    meta = _entry_record(setting, arrays, grad_norm, steps, ckpt_meta or _ckpt_meta(ckpt))
    written = False
    try:
        write_npz(path, **arrays)
        written = True
        write_json(path.with_suffix(".json"), meta)
    except OSError as exc:
        if written:  # no sidecar vouches for it (it would not be trusted): take it back
            with contextlib.suppress(OSError):
                path.unlink()
        where = getattr(exc, "path", path)
        report_write_failure(path.parent, exc, f"could not write the model cache {where} ({_reason(exc)}); theta* "
                                               f"of {setting.id} is not cached")
        return False
    return True


def _read_entry(path: Path, setting: Setting, data: Dataset, fm: FlatModel, device, dtype,
                expect_theta: np.ndarray | None = None) -> tuple[Trained, dict, dict]:
    """(Trained, arrays, sidecar) of the cache entry at ``path``, verified: both files readable, the
    sidecar well formed and of this setting, theta* of the model's dtype and size and finite, every
    array matching the sidecar's sha256 (entries written before checksums: none to match), the
    checkpoint arrays well formed and matching the sidecar's record, and the training gradient norm
    at theta* matching the recorded one (skipped when ``expect_theta`` is given and equals theta*:
    the caller's theta* was verified already). Raises ``BadEntry`` or ``_FutureEntry``."""
    side = path.with_suffix(".json")
    if not path.is_file():
        raise BadEntry(path, "unreadable", "not a regular file")
    try:
        z = read_npz(path)
    except UnreadableFile as exc:
        raise BadEntry(path, "unreadable", exc.why) from None
    except OSError as exc:
        raise BadEntry(path, "unreadable", _reason(exc)) from None
    try:
        meta = read_json(side)
    except FileNotFoundError:
        raise BadEntry(path, "incomplete", f"its sidecar {side.name} is missing") from None
    except UnreadableFile as exc:
        raise BadEntry(side, "unreadable", exc.why) from None
    except OSError as exc:
        raise BadEntry(side, "unreadable", _reason(exc)) from None
    if not isinstance(meta, dict):
        raise BadEntry(side, "unreadable", f"a JSON {type(meta).__name__}, not an object")
    fmt = meta.get("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise BadEntry(side, "inconsistent", f"format {fmt!r}")
    if fmt > MODEL_FORMAT:
        raise _FutureEntry(side, fmt)
    if fmt >= 2 and meta.get("record_sha256") != hash_json({k: v for k, v in meta.items() if k != "record_sha256"}):
        raise BadEntry(side, "inconsistent", "its content does not match its record_sha256")
    if meta.get("setting") != setting.id:
        raise BadEntry(side, "inconsistent", f"it describes setting {meta.get('setting')!r}, not {setting.id!r}")
    grad_norm, steps = meta.get("grad_norm"), meta.get("steps")
    if not (_finite_number(grad_norm) and grad_norm >= 0):
        raise BadEntry(side, "inconsistent", f"grad_norm {grad_norm!r}")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0):
        raise BadEntry(side, "inconsistent", f"steps {steps!r}")
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    theta = z.get("theta")
    if theta is None:
        raise BadEntry(path, "inconsistent", f"no theta array (arrays: {sorted(z)})")
    if theta.dtype != np_dtype or theta.shape != (fm.n_params,):
        raise BadEntry(path, "inconsistent", f"theta is {theta.dtype} {list(theta.shape)}, the model has "
                                             f"{np_dtype} [{fm.n_params}]")
    if not np.isfinite(theta).all():
        raise BadEntry(path, "inconsistent", "theta has non-finite values")
    if fmt >= 2:
        sums = meta.get("sha256")
        if not isinstance(sums, dict) or meta.get("theta_sha256") != sums.get("theta"):
            raise BadEntry(side, "inconsistent", "its checksums are malformed")
        if meta["theta_sha256"] != sha256_array(theta):
            raise BadEntry(path, "inconsistent", f"theta's sha256 {sha256_array(theta)[:16]} is not the "
                                                 f"{str(meta['theta_sha256'])[:16]} its sidecar records")
        if set(z) - set(sums):
            raise BadEntry(path, "inconsistent", f"arrays {sorted(set(z) - set(sums))} are not in its sidecar")
        wrong = sorted(k for k in z if sums[k] != sha256_array(z[k]))
        if wrong:
            raise BadEntry(path, "inconsistent", f"checksum mismatch in {wrong}")
        lost = set(sums) - set(z)
        if lost and lost != set(ARRAY_KEYS):  # all checkpoint arrays gone: an entry without checkpoints
            raise BadEntry(path, "inconsistent", f"arrays {sorted(lost)} of its sidecar are missing")
    ckpt_meta = meta.get("checkpoints")
    problem = arrays_problem(z, fm.n_params, np_dtype, ckpt_meta if isinstance(ckpt_meta, dict) else None)
    if problem:
        raise BadEntry(path, "inconsistent", problem)
    theta_t = torch.as_tensor(theta).to(device, dtype)
    if expect_theta is None or not np.array_equal(theta, expect_theta):
        now = float(_objective_grad(fm, data, setting.weight_decay)(theta_t).norm())
        if not grad_norm_agrees(now, grad_norm, dtype):
            raise BadEntry(path, "inconsistent", f"the training gradient norm at its theta* is {now:.3e}, its "
                                                 f"sidecar records {grad_norm:.3e}")
    return Trained(fm, theta_t, float(grad_norm), int(steps), from_cache=True, source="cache"), z, meta


def _set_aside_entry(path: Path, bad: BadEntry, setting: Setting, then: str) -> bool:
    """Rename both files of the damaged entry at ``path`` to ``<file>.bad-<n>`` and report it in one
    line; False (reported) when they cannot be moved: then nothing is written over them."""
    moved = []
    try:
        for p in (path, path.with_suffix(".json")):
            if _present(p):
                moved.append(set_aside(p))
    except OSError as exc:
        report(f"{bad}; it could not be set aside ({_reason(exc)}), so theta* of {setting.id} is {then} "
               "without caching")
        return False
    first = next((m for m in moved if m.name.startswith(bad.path.name + ".bad-")), moved[0] if moved else None)
    others = "".join(f" (with {m.name})" for m in moved if m != first)
    report(f"{bad}; set aside as {first}{others} and {then}")
    return True


def _load_shipped(setting: Setting, data: Dataset, fm: FlatModel, device, dtype) -> Trained | None:
    got = shipped_models.load(setting, data.fingerprint())
    if got is None:
        return None
    z, meta = got
    path = shipped_models.path_for(setting, shipped_gt_dir())
    theta = z["theta"]
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    grad_norm, steps = meta.get("grad_norm"), meta.get("steps")
    problem = None
    if theta.shape != (fm.n_params,) or theta.dtype != np_dtype:
        problem = f"it holds {theta.size} {theta.dtype} parameters, the model has {fm.n_params} {np_dtype}"
    elif not np.isfinite(theta).all():
        problem = "theta has non-finite values"
    elif not (_finite_number(grad_norm) and grad_norm >= 0) or not (isinstance(steps, int) and steps >= 0):
        problem = f"grad_norm {grad_norm!r} / steps {steps!r}"
    else:
        ckpt_meta = meta.get("checkpoints")
        problem = arrays_problem(z, fm.n_params, np_dtype, ckpt_meta if isinstance(ckpt_meta, dict) else None)
    theta_t = torch.as_tensor(theta)
    if problem is None:
        theta_t = theta_t.to(device)
        now = float(_objective_grad(fm, data, setting.weight_decay)(theta_t).norm())
        if not grad_norm_agrees(now, grad_norm, dtype):
            problem = f"the training gradient norm at its theta* is {now:.3e}, it records {grad_norm:.3e}"
    if problem is not None:
        warnings.warn(f"shipped model {path} is unusable ({problem}); training theta* of {setting.id!r} here "
                      "instead (the shipped file is left as it is)", shipped_models.ShippedModelWarning,
                      stacklevel=3)
        return None
    return Trained(fm, theta_t, float(grad_norm), int(steps), from_cache=True, source="shipped")


def export_model(setting: Setting, data: Dataset, fm: FlatModel, theta: torch.Tensor, grad_norm: float,
                 steps: int, root: Path) -> Path:
    """Write theta* and its checkpoints into the shipped root (``shipped_models.write``)."""
    ckpt = checkpoints(setting, data, fm, theta)
    meta = {"grad_norm": float(grad_norm), "steps": int(steps), "checkpoints": _ckpt_meta(ckpt),
            "data_sha256": data.fingerprint(), "data_source": portable(data.source), "dtype": setting.train.dtype}
    return shipped_models.write(setting, root, {"theta": theta.detach().cpu().numpy(), **ckpt.to_arrays()}, meta)


def _finish(rec: TrajectoryRecorder, fm: FlatModel, data: Dataset, setting: Setting,
            theta_star: torch.Tensor) -> Checkpoints:
    if rec.fixed is not None:  # minibatch training: the epoch checkpoints as they were kept
        return rec.fixed
    end = rec.theta_end if rec.theta_end is not None else theta_star
    return rec.finish(end, theta_star, _objective_grad(fm, data, setting.weight_decay)(end))


def _ckpt_meta(ckpt: Checkpoints) -> dict:
    return {"steps": [int(s) for s in ckpt.steps], "lrs": [float(v) for v in ckpt.lrs],
            "final_lr": ckpt.final_lr, "n_lbfgs": ckpt.n_lbfgs}


def checkpoints(setting: Setting, data: Dataset, fm: FlatModel, theta: torch.Tensor,
                use_cache: bool = True) -> Checkpoints:
    """The training checkpoints of ``setting`` (see ``Checkpoints``), from the model cache.

    A cache entry without them (written before checkpoints existed), or one holding another theta*,
    or none, is recovered by replaying the deterministic fit from the same initialisation; the
    given theta* stays the final checkpoint (``replay_diff`` says how far the replay's own end
    point is from it) and, if the entry holds this theta*, the checkpoints are added to it. A
    damaged entry is reported, set aside and rewritten from the replay when that reproduces
    theta* bit for bit.
    """
    path = model_cache_path(setting)
    device, dtype = theta.device, theta.dtype
    theta_np = theta.detach().cpu().numpy()

    def same_model(z: dict) -> bool:  # the entry is this theta* (not, e.g., one trained on other data)
        return "theta" in z and np.array_equal(z["theta"], theta_np)

    if use_cache:
        got = shipped_models.load(setting, data.fingerprint())
        if got is not None and "ckpt_theta" in got[0] and same_model(got[0]):
            with contextlib.suppress(ValueError):  # malformed: refused (and reported) when theta* was loaded
                return Checkpoints.from_arrays(got[0], device, dtype, fm.n_params)

    def entry():  # (arrays, sidecar) of the verified entry holding this theta*, else None
        _, z, meta = _read_entry(path, setting, data, fm, device, dtype, expect_theta=theta_np)
        return (z, meta) if same_model(z) else None

    damaged = False
    if use_cache and _present(path):
        try:
            got = entry()
            if got is not None and "ckpt_theta" in got[0]:
                return Checkpoints.from_arrays(got[0], device, dtype, fm.n_params)
        except BadEntry:
            damaged = True
        except _FutureEntry:
            pass
    replay_fm = FlatModel(initial_module(setting, data, dtype, device))
    rec = TrajectoryRecorder()
    theta_replay, gnorm, steps = fit(replay_fm, replay_fm.flat().to(device), data, setting, rec)
    ckpt = _finish(rec, replay_fm, data, setting, theta)  # the cached theta* is the final checkpoint
    ckpt.replay_diff = float((theta_replay - theta).abs().max())
    if not (use_cache and (damaged or _present(path))):
        return ckpt
    try:
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError:
        return ckpt  # a cache that cannot be written: the checkpoints are not kept
    try:
        if not _present(path):
            return ckpt
        try:
            got = entry()
        except BadEntry as bad:
            same = ckpt.replay_diff == 0.0
            if _set_aside_entry(path, bad, setting, "its checkpoints replayed" + (" and rewritten" if same else "")) \
                    and same:
                _write_entry(path, setting, theta, gnorm, steps, ckpt)
            return ckpt
        except _FutureEntry:
            return ckpt
        if got is not None and "ckpt_theta" not in got[0]:  # add them to the entry
            meta = got[1]
            _write_entry(path, setting, theta, meta["grad_norm"], meta["steps"], ckpt,
                         {**_ckpt_meta(ckpt), "replay_diff": ckpt.replay_diff})
    finally:
        lock.release()
    return ckpt
