"""The read-only context of an estimator call: fingerprints of what the estimator can reach (theta*,
the data, the model's parameters and buffers, the cached arrays) and the global state it can change
(hooks on the model and torch's global module hooks, train/eval mode, ``requires_grad``, the default
dtype, grad mode, anomaly detection, the RNG states), saved before the call (``save``), put back
after it (``restore_global_state``) and compared (``check_and_repair``). How a call uses them:
``isolation.py``."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from influence_bench.errors import EstimatorError


class ContextMutated(EstimatorError):
    """The estimator edited the context it was given (theta*, data, model, cached arrays) in place."""


def _crc(t: Any) -> tuple:
    """A fingerprint of a tensor or an array: dtype, shape and a checksum of the bytes (or, for a kind
    that cannot be read as bytes, dtype and shape alone, never an error)."""
    try:
        if isinstance(t, np.ndarray):
            if t.dtype == object:
                return ("object", t.shape)
            return (str(t.dtype), t.shape, zlib.crc32(np.ascontiguousarray(t).tobytes()))
        return _crc_tensor(t)
    except Exception:  # noqa: BLE001 - quantized, nested, ...: compared by what can be read
        return ("unread", type(t).__name__, str(getattr(t, "dtype", "")), tuple(getattr(t, "shape", ())))


def _crc_tensor(t: torch.Tensor) -> tuple:
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.resolve_conj().resolve_neg()
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
        out[path] = value
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
    return {part: {name: _crc(t) for name, t in arrays.items()} for part, arrays in parts.items()}


def _hook_dicts(module: torch.nn.Module) -> dict:
    return {name: value for name, value in vars(module).items()
            if name.startswith("_") and "hooks" in name and isinstance(value, dict)}


def _global_hook_dicts() -> dict:
    mod = torch.nn.modules.module
    return {name: value for name, value in vars(mod).items()
            if name.startswith("_global_") and "hooks" in name and isinstance(value, dict)}


@dataclass
class Saved:
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


def save(ctx) -> Saved:
    module = ctx.fm.module
    modules = list(module.named_modules())
    hooks = [(f"model module {name or '(root)'!r}", d, dict(d)) for name, m in modules for d in _hook_dicts(m).values()]
    hooks += [("torch.nn.modules.module", d, dict(d)) for d in _global_hook_dicts().values()]
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return Saved(
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


def restore_global_state(ctx, saved: Saved) -> list[str]:
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


def check_and_repair(ctx, saved: Saved, who: str) -> None:
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
