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
import select
import signal
import struct
from typing import Any

import numpy as np
import torch

from influence_bench import tally
from influence_bench.errors import EstimatorError, EstimatorUnsupported
from influence_bench.scoring.context_guard import (  # noqa: F401  (ContextMutated: re-exported)
    ContextMutated,
    check_and_repair,
    restore_global_state,
    save,
)
from influence_bench.scoring.limits import (  # noqa: F401  (re-exported: the call's limits)
    DEFAULT_SECONDS,
    EstimatorTimeout,
    Limits,
    memory_limit,
    out_of_memory,
    time_limit,
)
from influence_bench.scoring.measure import Measurement, measure

MAX_DIAGNOSTICS_BYTES = 256 * 1024  # what one case's diagnostics may add to a run file
_GRACE_SECONDS = 5.0  # process isolation: how long past the limit the child may take to report


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
    saved = save(ctx)
    notes: list[str] = []
    failure: BaseException | None = None
    out, mem = None, None
    with measure(ctx.device) as m:
        try:
            with memory_limit(memory_mb, ctx.device, notes) as mem, time_limit(seconds, notes):
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
            if out_of_memory(exc) and mem is not None:
                failure = EstimatorError(f"{who} ran out of its memory limit ({mem:,.0f} MB beyond what was in use) "
                                         f"and was stopped; raise it with --memory-limit {est.name}=MB")
            else:
                failure = EstimatorError(f"{who} raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    notes += restore_global_state(ctx, saved)
    if notes:
        est.diagnostics["harness_warnings"] = notes
    check_and_repair(ctx, saved, who)  # a mutation outranks whatever else happened
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
