"""One estimator call, guarded: nothing an estimator does outlives the call it was made in.

Two ways to run it (``Limits.isolation``):

* ``"inline"`` (the default): in this process. Before the call the harness fingerprints what the
  estimator can reach (theta*, the data, the model's parameters and buffers, the context's cached
  arrays) and saves the global state it could change (hooks on the model and torch's global module
  hooks, the model's train/eval mode, the default dtype, grad mode, anomaly detection, the RNG
  states). After the call it restores that state, removes hooks the call left behind (recorded in the
  case's ``diagnostics["harness_warnings"]``) and compares the fingerprints: an estimator that edited
  any of it in place gets an ``error`` case (``ContextMutated``), theta* and the model are put back
  from saved copies, and a context whose data or cached arrays were edited is marked ``poisoned``
  and dropped from the context cache, so nothing (ground truth above all) is computed from it. A
  time limit (``SIGALRM``, main thread) and a memory limit (the soft address-space limit, Linux, CPU)
  bound the call; ``sys.exit`` and every exception end as an error case naming estimator and setting.
* ``"process"``: in a forked child (POSIX, CPU), which also survives what no in-process guard can:
  a segfault, a hang inside C code, ``os._exit``; the child is killed at the time limit. The child
  runs with one torch thread (OpenMP's thread pool does not survive a fork: a child that uses it
  hangs), so its times are recorded as such (``diagnostics["isolation"]``) and are not comparable
  with inline ones.

Limits: ``--time-limit`` / ``--memory-limit`` on the command line and in pytest (``SECONDS`` for
every estimator or ``NAME=SECONDS`` for one), else the estimator class's ``time_limit_s`` /
``memory_limit_mb``, else ``DEFAULT_SECONDS`` and the machine's physical memory.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import select
import signal
import struct
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from influence_bench import tally
from influence_bench.errors import EstimatorError, EstimatorUnsupported
from influence_bench.scoring.measure import Measurement, measure

DEFAULT_SECONDS = 3600.0  # generous: the slowest built-in call on the CPU tiers takes minutes
ISOLATIONS = ("inline", "process")
MAX_DIAGNOSTICS_BYTES = 256 * 1024  # what one case's diagnostics may add to a run file
_GRACE_SECONDS = 5.0  # process isolation: how long past the limit the child may take to report


class ContextMutated(EstimatorError):
    """The estimator edited the context it was given (theta*, data, model, cached arrays) in place."""


class EstimatorTimeout(BaseException):
    """Raised inside the call at its time limit. A ``BaseException``, so that an estimator's own
    ``except Exception`` cannot swallow it."""


@dataclass(frozen=True)
class Limits:
    """Time and memory limits of every estimator call, and how calls are isolated. ``seconds`` and
    ``memory_mb`` map estimator names (``"*"``: every estimator) to limits; ``None`` as a value: no
    limit."""

    seconds: dict = field(default_factory=dict)
    memory_mb: dict = field(default_factory=dict)
    isolation: str = "inline"

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {self.isolation!r}")

    def for_estimator(self, est) -> tuple[float | None, float | None]:
        """(seconds, memory MB) for ``est``: its own entry, else ``"*"``, else the class's
        ``time_limit_s`` / ``memory_limit_mb``, else the defaults."""
        def pick(table: dict, attr: str, default):
            for key in (est.name, "*"):
                if key in table:
                    return table[key]
            own = getattr(type(est), attr, None)
            return default if own is None else own

        return pick(self.seconds, "time_limit_s", DEFAULT_SECONDS), pick(self.memory_mb, "memory_limit_mb", None)

    @classmethod
    def parse(cls, seconds: list[str] | None = None, memory_mb: list[str] | None = None,
              isolation: str | None = None) -> "Limits":
        """From option values: each ``VALUE`` (every estimator) or ``NAME=VALUE``; ``VALUE`` is a
        positive number or ``none``. Raises ``ValueError`` naming the option and the value."""
        return cls(_parse_table("--time-limit", seconds or []), _parse_table("--memory-limit", memory_mb or []),
                   isolation or os.environ.get("INFLUENCE_BENCH_ISOLATION") or "inline")


def _parse_table(option: str, values: list[str]) -> dict:
    out: dict = {}
    for raw in values:
        name, _, value = raw.rpartition("=")
        name = name.strip() or "*"
        v = value.strip().lower()
        if v in ("none", "off", "0"):
            out[name] = None
            continue
        try:
            number = float(v)
        except ValueError:
            raise ValueError(f"{option} {raw!r}: expected SECONDS or NAME=SECONDS with a positive number "
                             "(or 'none')") from None
        if not np.isfinite(number) or number <= 0:
            raise ValueError(f"{option} {raw!r}: the limit must be a positive number (or 'none')")
        out[name] = number
    return out


# ---- fingerprints and saved state ------------------------------------------------------------------
def _crc(t: torch.Tensor) -> tuple:
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return (str(t.dtype), tuple(t.shape), 0)
    raw = flat.view(torch.uint8) if flat.element_size() > 0 else flat
    if raw.device.type == "cpu":
        return (str(t.dtype), tuple(t.shape), zlib.crc32(raw.numpy()))
    total, step = 0, 1 << 26  # a position-weighted byte sum on the device (no copy to the host)
    for s in range(0, raw.numel(), step):
        c = raw[s:s + step].to(torch.int64)
        w = torch.arange(s, s + c.numel(), device=c.device, dtype=torch.int64) % 65521 + 1
        total = (total + int((c * w).sum())) % (1 << 61)
    return (str(t.dtype), tuple(t.shape), total)


def _arrays(value: Any, path: str, out: dict, depth: int = 0) -> None:
    """Every tensor / ndarray in ``value`` (nested in tuples, lists, dicts) by a path name."""
    if isinstance(value, torch.Tensor):
        out[path] = value
    elif isinstance(value, np.ndarray):
        out[path] = torch.from_numpy(value) if value.dtype != object else value
    elif depth < 3 and isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _arrays(v, f"{path}[{i}]", out, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for k, v in value.items():
            _arrays(v, f"{path}[{k!r}]", out, depth + 1)


def _reachable(ctx) -> dict[str, dict[str, Any]]:
    """What an estimator can reach, by part: theta, the data, the model's state, the cache."""
    data: dict = {}
    for k, v in vars(ctx.data).items():
        _arrays(v, f"ctx.data.{k}", data)
    cache: dict = {}
    for k, v in ctx.cache_items():
        _arrays(v, f"ctx.cached({k!r})", cache)
    return {"theta": {"ctx.theta": ctx.theta}, "data": data,
            "model": {f"ctx.model.{k}": v for k, v in ctx.fm.module.state_dict(keep_vars=True).items()},
            "cache": cache}


def _fingerprints(parts: dict) -> dict:
    return {part: {name: _crc(t) if isinstance(t, torch.Tensor) else repr(t) for name, t in arrays.items()}
            for part, arrays in parts.items()}


def _hook_dicts(module: torch.nn.Module) -> dict:
    return {name: value for name, value in vars(module).items()
            if name.startswith("_") and "hooks" in name and isinstance(value, dict)}


def _global_hook_dicts() -> dict:
    mod = torch.nn.modules.module
    return {name: value for name, value in vars(mod).items()
            if name.startswith("_global_") and "hooks" in name and isinstance(value, dict)}


@dataclass
class _Saved:
    theta: torch.Tensor
    model_state: dict
    modules: list
    hooks: list  # [(owner description, the dict object, a copy of it)]
    training: list
    requires_grad: list
    default_dtype: torch.dtype
    grad_enabled: bool
    anomaly: bool
    rng: tuple
    fingerprints: dict


def _save(ctx) -> _Saved:
    module = ctx.fm.module
    modules = list(module.named_modules())
    hooks = [(f"model module {name or '(root)'!r}", d, dict(d)) for name, m in modules for d in _hook_dicts(m).values()]
    hooks += [("torch.nn.modules.module", d, dict(d)) for d in _global_hook_dicts().values()]
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return _Saved(
        theta=ctx.theta.detach().clone(),
        model_state={k: v.detach().clone() for k, v in module.state_dict().items()},
        modules=[(name, id(m)) for name, m in modules],
        hooks=hooks,
        training=[(m, m.training) for _, m in modules],
        requires_grad=[(p, p.requires_grad) for p in module.parameters()],
        default_dtype=torch.get_default_dtype(),
        grad_enabled=torch.is_grad_enabled(),
        anomaly=torch.is_anomaly_enabled(),
        rng=(torch.get_rng_state(), cuda_rng, np.random.get_state(), random.getstate()),
        fingerprints=_fingerprints(_reachable(ctx)),
    )


def _restore_global_state(ctx, saved: _Saved) -> list[str]:
    """Put back what the call may have changed outside the context's tensors; say what was put back."""
    notes = []
    for owner, d, before in saved.hooks:
        added = [k for k in d if k not in before]
        if added or len(d) != len(before):
            notes.append(f"removed {len(added)} hook(s) the estimator left on {owner}")
            d.clear()
            d.update(before)
    for m, was in saved.training:
        if m.training != was:
            m.train(was)
            notes.append(f"restored the model's {'train' if was else 'eval'} mode")
            break
    for p, was in saved.requires_grad:
        p.requires_grad_(was)
    if torch.get_default_dtype() != saved.default_dtype:
        notes.append(f"restored torch's default dtype {saved.default_dtype} (the estimator left "
                     f"{torch.get_default_dtype()})")
        torch.set_default_dtype(saved.default_dtype)
    if torch.is_grad_enabled() != saved.grad_enabled:
        notes.append(f"restored grad mode ({'enabled' if saved.grad_enabled else 'disabled'})")
        torch.set_grad_enabled(saved.grad_enabled)
    if torch.is_anomaly_enabled() != saved.anomaly:
        notes.append("restored anomaly detection")
        torch.autograd.set_detect_anomaly(saved.anomaly)
    cpu, cuda, np_state, py_state = saved.rng
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(np_state)
    random.setstate(py_state)
    return notes


def _check_and_repair(ctx, saved: _Saved, who: str) -> None:
    """Compare the fingerprints; repair theta* and the model, poison the context for the rest.
    Raises ``ContextMutated`` naming what changed."""
    after = _fingerprints(_reachable(ctx))
    changed = []
    for part, before in saved.fingerprints.items():
        now = after.get(part, {})
        changed += [name for name in before if now.get(name) != before[name]]
    structure = [(name, id(m)) for name, m in ctx.fm.module.named_modules()] != saved.modules
    if not changed and not structure:
        return
    with torch.no_grad():
        if "ctx.theta" in changed:
            ctx.theta.copy_(saved.theta)
        try:
            ctx.fm.module.load_state_dict(saved.model_state)
        except (RuntimeError, KeyError):  # the structure changed: nothing to load into
            pass
    poisoned = [n for n in changed if not (n == "ctx.theta" or n.startswith("ctx.model."))] + (
        ["the model's modules"] if structure else [])
    if poisoned:
        ctx.poison(f"{who} edited {', '.join(poisoned[:4])} in place")
        from influence_bench.api.loading import forget_contexts

        forget_contexts()
    listed = ", ".join((changed + (["the model's modules"] if structure else []))[:4])
    raise ContextMutated(
        f"{who} edited what the harness gave it in place ({listed}): estimators must treat the context as "
        "read-only (clone before editing). Case recorded as an error; "
        + ("theta* and the model were restored from saved copies" if not poisoned else
           "the context was discarded and is rebuilt for the next estimator"))


# ---- limits ------------------------------------------------------------------------------------
@contextmanager
def _time_limit(seconds: float | None, notes: list[str]):
    if not seconds:
        yield
        return
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        notes.append(f"time limit {seconds:g} s not enforced (not the main thread); use --isolation process")
        yield
        return

    def fire(signum, frame):
        raise EstimatorTimeout()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _vm_size_bytes() -> int | None:
    try:
        m = re.search(r"VmSize:\s+(\d+)", open("/proc/self/status").read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def physical_memory_mb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        return None


@contextmanager
def _memory_limit(memory_mb: float | None, device: torch.device, notes: list[str]):
    """The soft address-space limit at what is mapped now plus ``memory_mb`` (default: the machine's
    physical memory), so that an estimator that allocates more fails inside its own call instead of
    bringing the out-of-memory killer to the whole run. Linux and CPU only: CUDA maps huge address
    ranges of its own."""
    try:
        import resource
    except ImportError:  # pragma: no cover - non-POSIX
        yield None
        return
    vm = _vm_size_bytes()
    limit_mb = memory_mb if memory_mb is not None else physical_memory_mb()
    cuda_on = torch.cuda.is_available() and torch.cuda.is_initialized()
    if vm is None or limit_mb is None or device.type != "cpu" or cuda_on:
        if memory_mb is not None:
            notes.append(f"memory limit {memory_mb:g} MB not enforced on {device} here")
        yield None
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    new = vm + int(limit_mb * 2**20)
    for cap in (soft, hard):
        if cap != resource.RLIM_INFINITY:
            new = min(new, cap)
    resource.setrlimit(resource.RLIMIT_AS, (new, hard))
    try:
        yield limit_mb
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "Cannot allocate memory" in str(exc)


# ---- the call ----------------------------------------------------------------------------------
def call(est, ctx, limits: Limits | None = None) -> tuple[Any, Measurement]:
    """``est.influence(ctx)`` under ``limits``: (its return value, time and memory). Raises
    ``EstimatorUnsupported`` (a refusal), ``EstimatorError`` (everything else that went wrong, with
    the reason) or ``KeyboardInterrupt``. Adds ``harness_warnings`` and ``isolation`` to
    ``est.diagnostics`` where there is something to say."""
    limits = limits or Limits()
    if getattr(ctx, "poisoned", ""):
        raise ContextMutated(f"the context of setting {ctx.setting.id!r} was edited in place earlier "
                             f"({ctx.poisoned}); rebuild it (loading.get_context) before scoring on it")
    if limits.isolation == "process":
        if ctx.device.type != "cpu" or not hasattr(os, "fork"):
            est.diagnostics["isolation"] = f"inline (process isolation needs a CPU context and fork; {ctx.device})"
        else:
            return _call_in_child(est, ctx, limits)
    return _call_inline(est, ctx, limits)


def _where(est, ctx) -> str:
    return f"estimator {est.name!r} on setting {ctx.setting.id!r}"


def _call_inline(est, ctx, limits: Limits) -> tuple[Any, Measurement]:
    import traceback

    who = _where(est, ctx)
    seconds, memory_mb = limits.for_estimator(est)
    saved = _save(ctx)
    notes: list[str] = []
    failure: BaseException | None = None
    out, mem = None, None
    with measure(ctx.device) as m:
        try:
            with _memory_limit(memory_mb, ctx.device, notes) as mem, _time_limit(seconds, notes):
                out = est.influence(ctx)
        except KeyboardInterrupt:
            raise
        except EstimatorTimeout:
            failure = EstimatorError(f"{who} exceeded its time limit of {seconds:g} s and was stopped; raise it "
                                     f"with --time-limit {est.name}=SECONDS (or the class's time_limit_s)")
        except EstimatorUnsupported as exc:
            failure = exc
        except SystemExit as exc:
            failure = EstimatorError(f"{who} called sys.exit({exc.code!r}); an estimator must return its "
                                     "matrix or raise EstimatorError")
        except EstimatorError as exc:
            failure = exc
        except BaseException as exc:  # noqa: BLE001 - every failure of a plug-in becomes its case's error
            if _out_of_memory(exc) and mem is not None:
                failure = EstimatorError(f"{who} ran out of its memory limit ({mem:,.0f} MB beyond what was in use) "
                                         f"and was stopped; raise it with --memory-limit {est.name}=MB")
            else:
                failure = EstimatorError(f"{who} raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    notes += _restore_global_state(ctx, saved)
    if notes:
        est.diagnostics["harness_warnings"] = notes
    _check_and_repair(ctx, saved, who)  # a mutation outranks whatever else happened
    if failure is not None:
        raise failure
    return out, m


# ---- process isolation -------------------------------------------------------------------------
def _call_in_child(est, ctx, limits: Limits) -> tuple[Any, Measurement]:
    from influence_bench.api.estimator import check_output

    who = _where(est, ctx)
    seconds, _ = limits.for_estimator(est)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 0
        try:
            os.close(r)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
            import faulthandler

            faulthandler.disable()  # a crash is reported by the parent in one line, not as a C stack dump
            torch.set_num_threads(1)  # OpenMP's pool does not survive a fork
            before = tally.snapshot()
            header: dict = {"ok": False}
            body = b""
            try:
                out, m = _call_inline(est, ctx, limits)  # its own alarm first; the parent kills past the grace
                arr = check_output(out, est.name, ctx.setting.id, (ctx.n_test, ctx.n_train), ctx.device).numpy()
                buf = io.BytesIO()
                np.save(buf, arr, allow_pickle=False)
                body = buf.getvalue()
                header = {"ok": True, "seconds": m.seconds, "peak": m.peak_memory_mb, "start": m.start_memory_mb,
                          "scope": m.memory_scope}
            except EstimatorUnsupported as exc:
                header = {"ok": False, "kind": "unsupported", "message": str(exc)}
            except BaseException as exc:  # noqa: BLE001
                header = {"ok": False, "kind": "error", "message": str(exc) or type(exc).__name__}
            header["diagnostics"] = _safe_json(est.diagnostics)
            header["tally"] = [[what, sid, n] for (what, sid), n in tally.since(before).items()]
            blob = json.dumps(header).encode()
            _write_all(w, struct.pack("<QQ", len(blob), len(body)) + blob + body)
        except BaseException:  # noqa: BLE001
            status = 70
        finally:
            os._exit(status)
    os.close(w)
    deadline = None if not seconds else seconds + _GRACE_SECONDS
    try:
        data, timed_out = _read_until_eof(r, deadline)
    except KeyboardInterrupt:
        _kill(pid)
        raise
    finally:
        os.close(r)
    if timed_out:
        _kill(pid)
        raise EstimatorError(f"{who} exceeded its time limit of {seconds:g} s in its worker process and was killed; "
                             f"raise it with --time-limit {est.name}=SECONDS")
    _, status = os.waitpid(pid, 0)
    if len(data) < 16:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            raise EstimatorError(f"{who} crashed its worker process ({signal.Signals(sig).name}) and returned nothing")
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
        raise EstimatorError(f"{who} ended its worker process (exit status {code}) without returning a result "
                             "(os._exit?)")
    n_head, n_body = struct.unpack("<QQ", data[:16])
    header = json.loads(data[16:16 + n_head])
    est.diagnostics.update(header.get("diagnostics") or {})
    est.diagnostics["isolation"] = "process (forked worker, 1 torch thread)"
    for what, sid, n in header.get("tally", []):
        tally.add(what, sid, n)
    if not header["ok"]:
        raise (EstimatorUnsupported if header.get("kind") == "unsupported" else EstimatorError)(header["message"])
    out = torch.from_numpy(np.load(io.BytesIO(data[16 + n_head:16 + n_head + n_body]), allow_pickle=False))
    m = Measurement(header["seconds"], header["peak"], header["start"], header["scope"])
    return out, m


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_until_eof(fd: int, deadline_s: float | None) -> tuple[bytes, bool]:
    import time

    chunks, end = [], None if deadline_s is None else time.monotonic() + deadline_s
    while True:
        wait = None if end is None else max(0.0, end - time.monotonic())
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            return b"".join(chunks), True
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


# ---- diagnostics that fit a run file ------------------------------------------------------------
def _safe_json(d: dict) -> dict:
    """``d`` as JSON-able values (tensors and arrays as lists, anything else as its ``repr``), or, past
    ``MAX_DIAGNOSTICS_BYTES``, its small entries plus a note of what was dropped."""
    def conv(v, depth=0):
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        if isinstance(v, np.ndarray):
            return v.tolist() if v.size <= 100_000 else f"<array of shape {list(v.shape)}, dropped>"
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, float) and not np.isfinite(v):
            return repr(v)  # run files are strict JSON
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if depth < 6 and isinstance(v, (list, tuple)):
            return [conv(x, depth + 1) for x in v]
        if depth < 6 and isinstance(v, dict):
            return {str(k): conv(x, depth + 1) for k, x in v.items()}
        return repr(v)[:1000]

    out = {str(k): conv(v) for k, v in d.items()}
    text = json.dumps(out, default=str)
    if len(text) <= MAX_DIAGNOSTICS_BYTES:
        return out
    sizes = {k: len(json.dumps(v, default=str)) for k, v in out.items()}
    kept = {k: v for k, v in out.items() if sizes[k] <= 4096}
    dropped = sorted(k for k in out if k not in kept)
    kept["harness_dropped_diagnostics"] = (f"{', '.join(dropped)}: {sum(sizes[k] for k in dropped):,} bytes of "
                                           f"diagnostics over the {MAX_DIAGNOSTICS_BYTES:,}-byte limit")
    return kept


def safe_diagnostics(d: dict) -> dict:
    """What the runner records of an estimator's diagnostics (``_safe_json``)."""
    return _safe_json(d)
