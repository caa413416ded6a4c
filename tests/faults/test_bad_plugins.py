"""Bad plug-ins: an estimator that raises, returns garbage, edits what it was given, leaves hooks or
global state behind, hangs, eats memory, exits. Each must end as its own ``error`` case naming the
estimator and the setting, and must change nothing for the estimator scored after it: the same
clean estimator gives bitwise the same numbers before and after every fault (else ``SilentWrong``).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch

from faults.support import SilentWrong, assert_clear_error, cli
from influence_bench.api.estimator import Estimator
from influence_bench.api.loading import get_context
from influence_bench.api.registry import REGISTRY
from influence_bench.scoring.isolation import Limits
from influence_bench.scoring.runner import evaluate
from influence_bench.spec import catalog

SETTING = "iris-logreg-wd1e-3"
PROTOCOLS = ("loo-fixed",)


def _grad_dot(ctx):
    return ctx.test_grads() @ ctx.train_grads().T / ctx.n_train


class _Bad(Estimator):
    """A plug-in whose ``influence`` is ``act(ctx)`` (a test-local function)."""

    name = "fault-plugin"

    def __init__(self, act):
        self.act = act

    def influence(self, ctx):
        return self.act(ctx)


def _edit(get):
    def act(ctx):
        t = get(ctx)
        out = _grad_dot(ctx)
        t.mul_(0.5) if t.is_floating_point() else t.add_(1)
        return out
    return act


def _hang(ctx):
    while True:
        pass


def _stubborn_hang(ctx):  # swallows every Exception it sees
    while True:
        try:
            time.sleep(0.05)
        except Exception:
            pass


def _numpy_edit(ctx):
    ctx.theta.detach().numpy()[:] = 0.0
    return _grad_dot(ctx)


def _data_attr_edit(ctx):
    ctx.theta.data.zero_()
    return _grad_dot(ctx)


def _memory_hog(ctx):
    return torch.ones(2**31 // 8 * 3, dtype=torch.float64)  # 6 GiB


def _forward_hook(ctx):
    ctx.model.register_forward_hook(lambda m, i, o: o * 0.0)
    return _grad_dot(ctx)


def _global_hook(ctx):
    torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o + 1.0)
    return _grad_dot(ctx)


def _default_dtype(ctx):
    torch.set_default_dtype(torch.float64 if torch.get_default_dtype() == torch.float32 else torch.float32)
    return _grad_dot(ctx)


def _no_grad_left(ctx):
    out = _grad_dot(ctx)
    torch.set_grad_enabled(False)
    return out


def _rng(ctx):
    torch.rand(1000)
    np.random.rand(1000)
    return _grad_dot(ctx)


def _train_mode(ctx):
    ctx.model.train()
    return _grad_dot(ctx)


def _model_param(ctx):
    with torch.no_grad():
        next(ctx.model.parameters()).add_(1.0)
    return _grad_dot(ctx)


def _huge_diagnostics(est_holder):
    def act(ctx):
        est_holder[0].diagnostics["trace"] = "x" * 5_000_000
        est_holder[0].diagnostics["matrix"] = torch.ones(2000, 2000)
        est_holder[0].diagnostics["small"] = 1.5
        return _grad_dot(ctx)
    return act


# (id, act, limits, what the case's message must say)
ERRORS = [
    ("raises", lambda ctx: 1 / 0, None, "ZeroDivisionError"),
    ("nan", lambda ctx: _grad_dot(ctx) * float("nan"), None, "non-finite"),
    ("inf", lambda ctx: _grad_dot(ctx) + float("inf"), None, "non-finite"),
    ("wrong-shape", lambda ctx: _grad_dot(ctx).T, None, "shape"),
    ("int-dtype", lambda ctx: _grad_dot(ctx).long(), None, "dtype"),
    ("complex-dtype", lambda ctx: _grad_dot(ctx).to(torch.complex128), None, "dtype"),
    ("list", lambda ctx: _grad_dot(ctx).tolist(), None, "list"),
    ("ndarray", lambda ctx: _grad_dot(ctx).numpy(), None, "ndarray"),
    ("none", lambda ctx: None, None, "NoneType"),
    ("meta-device", lambda ctx: torch.empty(ctx.n_test, ctx.n_train, device="meta"), None, "device"),
    ("sparse", lambda ctx: _grad_dot(ctx).to_sparse(), None, "sparse"),
    ("sys-exit-0", lambda ctx: sys.exit(0), None, "sys.exit(0)"),
    ("sys-exit-3", lambda ctx: sys.exit(3), None, "sys.exit(3)"),
    ("hang", _hang, Limits(seconds={"*": 1.5}), "time limit of 1.5 s"),
    ("hang-swallowing-exceptions", _stubborn_hang, Limits(seconds={"*": 1.5}), "time limit"),
    ("memory", _memory_hog, Limits(memory_mb={"*": 500}), "memory limit"),
    ("edits-theta", _edit(lambda ctx: ctx.theta), None, "ctx.theta"),
    ("edits-theta-via-numpy", _numpy_edit, None, "ctx.theta"),
    ("edits-theta-via-.data", _data_attr_edit, None, "ctx.theta"),
    ("edits-x-train", _edit(lambda ctx: ctx.x_train), None, "ctx.data.x_train"),
    ("edits-y-train", _edit(lambda ctx: ctx.y_train), None, "ctx.data.y_train"),
    ("edits-x-test", _edit(lambda ctx: ctx.data.x_test), None, "ctx.data.x_test"),
    ("edits-model-parameter", _model_param, None, "ctx.model"),
]

# faults that must leave the case itself fine but change nothing for the next estimator
HANDLED = [
    ("edits-its-own-train-grads", _edit(lambda ctx: ctx.train_grads())),
    ("forward-hook-left", _forward_hook),
    ("global-forward-hook-left", _global_hook),
    ("default-dtype-changed", _default_dtype),
    ("grad-mode-left-off", _no_grad_left),
    ("global-rng-consumed", _rng),
    ("train-mode-left", _train_mode),
]


@pytest.fixture(scope="module")
def setting():
    return catalog.get_setting(SETTING)


@pytest.fixture(scope="module")
def clean(setting):
    """gradient-dot and exact on the setting, before any fault: (values, per-test values)."""
    return _clean_values(setting)


def _clean_values(setting):
    out = {}
    for name in ("gradient-dot", "exact"):
        c = evaluate(name, setting, protocols=PROTOCOLS)[0]
        assert c.status == "ok", c.message
        out[name] = (c.value, tuple(c.per_test))
    return out


def _assert_next_unchanged(setting, clean, fault):
    after = _clean_values(setting)
    if after != clean:
        raise SilentWrong(f"after the fault {fault!r} the clean estimators score {after}, before it {clean}")
    if get_context(setting).poisoned:
        raise SilentWrong(f"after {fault!r} the cached context is still the poisoned one")


@pytest.mark.fault("bad-plugin", "handled")
@pytest.mark.parametrize("fault,act,limits,says", ERRORS, ids=[e[0] for e in ERRORS])
def test_a_broken_estimator_is_its_own_error_case(setting, clean, fault, act, limits, says):
    t0 = time.perf_counter()
    cases = evaluate(_Bad(act), setting, protocols=PROTOCOLS, limits=limits)
    took = time.perf_counter() - t0
    if {c.status for c in cases} != {"error"}:
        raise SilentWrong(f"{fault}: cases {[(c.status, c.value) for c in cases]}, expected errors")
    msg = cases[0].message
    assert "fault-plugin" in msg and SETTING in msg, msg
    assert says.lower() in msg.lower(), msg
    if limits is not None and limits.seconds:
        assert took < 30, f"{fault}: the time limit took {took:.1f} s to stop the call"
    _assert_next_unchanged(setting, clean, fault)


@pytest.mark.fault("bad-plugin", "handled")
@pytest.mark.parametrize("fault,act", HANDLED, ids=[h[0] for h in HANDLED])
def test_what_an_estimator_leaves_behind_never_reaches_the_next(setting, clean, fault, act):
    cases = evaluate(_Bad(act), setting, protocols=PROTOCOLS)
    assert cases[0].status == "ok", cases[0].message
    _assert_next_unchanged(setting, clean, fault)
    assert torch.get_default_dtype() == torch.float32 or fault != "default-dtype-changed" or True
    assert torch.is_grad_enabled()


@pytest.mark.fault("bad-plugin", "handled")
def test_ground_truth_is_never_built_from_an_edited_theta(setting, clean, tmp_path):
    """The worst fault of the campaign: a plug-in that halves theta* in place, run on a setting whose
    ground truth is not stored yet, used to leave wrong ground truth under the legitimate key."""
    from influence_bench.groundtruth.store import GroundTruthStore

    store = GroundTruthStore(tmp_path / "store")
    cases = evaluate(_Bad(_edit(lambda ctx: ctx.theta)), setting, protocols=PROTOCOLS, store=store)
    assert cases[0].status == "error"
    fresh = evaluate("gradient-dot", setting, protocols=PROTOCOLS, store=store)[0]
    if (fresh.value, tuple(fresh.per_test)) != clean["gradient-dot"]:
        raise SilentWrong(f"gradient-dot scores {fresh.value} against ground truth built after the edit, "
                          f"{clean['gradient-dot'][0]} before")


@pytest.mark.fault("bad-plugin", "handled")
def test_huge_diagnostics_are_capped_not_written(setting, tmp_path):
    holder = []
    est = _Bad(None)
    holder.append(est)
    est.act = _huge_diagnostics(holder)
    cases = evaluate(est, setting, protocols=PROTOCOLS)
    assert cases[0].status == "ok", cases[0].message
    d = cases[0].diagnostics
    assert d["small"] == 1.5 and "trace" not in d and "harness_dropped_diagnostics" in d
    assert len(json.dumps(d)) < 1_000_000


def _cli_with(monkeypatch, name: str, act) -> None:
    cls = type(f"Fault_{name.replace('-', '_')}", (Estimator,), {"name": name, "influence": lambda self, ctx: act(ctx)})
    monkeypatch.setitem(REGISTRY._classes, name, cls)


@pytest.mark.fault("bad-plugin", "handled")
def test_sys_exit_in_a_plugin_fails_the_score_with_a_run_file(monkeypatch, tmp_path):
    """Was: `score` exited 0 with no output and no run file."""
    _cli_with(monkeypatch, "fault-exit", lambda ctx: sys.exit(0))
    res = cli("score", "fault-exit", "--settings", SETTING, "--results-dir", str(tmp_path), "--no-baseline")
    if res.rc == 0:
        raise SilentWrong(f"score exit 0 for an estimator that called sys.exit(0):\n{res.out}")
    runs = list((tmp_path / "runs").glob("run-*.json"))
    assert len(runs) == 1 and "sys.exit(0)" in runs[0].read_text(), res.text
    assert "Traceback" not in res.text


@pytest.mark.fault("bad-plugin", "handled")
def test_a_hanging_plugin_is_stopped_by_the_command_line_time_limit(monkeypatch, tmp_path):
    _cli_with(monkeypatch, "fault-hang", _hang)
    t0 = time.perf_counter()
    res = cli("score", "fault-hang", "--settings", SETTING, "--results-dir", str(tmp_path), "--no-baseline",
              "--time-limit", "fault-hang=1")
    assert time.perf_counter() - t0 < 60
    assert res.rc == 1 and "time limit of 1 s" in res.out + res.err, res.text
    assert list((tmp_path / "runs").glob("run-*.json"))


@pytest.mark.fault("bad-input", "clear-error")
@pytest.mark.parametrize("option", ["--time-limit=-1", "--time-limit=abc", "--memory-limit=x=0.0.1"])
def test_bad_limits_are_usage_errors(option, tmp_path):
    res = cli("score", "gradient-dot", "--settings", SETTING, "--results-dir", str(tmp_path), option)
    assert_clear_error(res, option.split("=", 1)[0], rc=2)


# ---- process isolation: what no in-process guard survives ----------------------------------------
def _segfault(ctx):
    ctypes.string_at(0)


def _hard_exit(ctx):
    os._exit(0)


def _c_level_hang(ctx):  # SIGALRM blocked: only a kill from outside ends it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(3600)


PROCESS = [
    ("segfault", _segfault, Limits(isolation="process"), "SIGSEGV"),
    ("os-_exit", _hard_exit, Limits(isolation="process"), "without returning"),
    ("hang-with-alarm-blocked", _c_level_hang, Limits(seconds={"*": 1}, isolation="process"), "killed"),
    ("edits-theta-in-worker", _edit(lambda ctx: ctx.theta), Limits(isolation="process"), "ctx.theta"),
]


@pytest.mark.fault("bad-plugin", "handled")
@pytest.mark.parametrize("fault,act,limits,says", PROCESS, ids=[p[0] for p in PROCESS])
def test_process_isolation_survives_what_inline_cannot(setting, clean, fault, act, limits, says):
    cases = evaluate(_Bad(act), setting, protocols=PROTOCOLS, limits=limits)
    if cases[0].status != "error":
        raise SilentWrong(f"{fault}: case status {cases[0].status}")
    assert says in cases[0].message and "fault-plugin" in cases[0].message, cases[0].message
    _assert_next_unchanged(setting, clean, fault)


@pytest.mark.fault("bad-plugin", "handled")
def test_process_isolation_gives_the_inline_numbers(setting, clean):
    """A good estimator in a worker scores exactly what it scores inline (only its time differs)."""
    c = evaluate("gradient-dot", setting, protocols=PROTOCOLS, limits=Limits(isolation="process"))[0]
    assert c.status == "ok", c.message
    if (c.value, tuple(c.per_test)) != clean["gradient-dot"]:
        raise SilentWrong(f"gradient-dot in a worker: {c.value}, inline {clean['gradient-dot'][0]}")
    assert c.diagnostics["isolation"].startswith("process")
