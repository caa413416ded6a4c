"""Optional user-supplied initial weights for a setting (e.g. pretrained ImageNet ResNet-50).

Where training looks, first match wins:

1. ``$INFLUENCE_BENCH_INIT_WEIGHTS_<ID>``: a file path; ``<ID>`` is the setting id upper-cased with
   every character other than A-Z and 0-9 replaced by ``_``
   (``imagenet10k-resnet50-wd1e-4`` -> ``INFLUENCE_BENCH_INIT_WEIGHTS_IMAGENET10K_RESNET50_WD1E_4``).
   A variable naming a missing file is an error, not a silent fallback.
2. ``<data root>/weights/<setting-id>.pt`` or ``.npz`` (data root: ``$INFLUENCE_BENCH_DATA``).

The file is a ``state_dict`` of the setting's module (parameter and buffer names as in
``cnn.py`` / torchvision), read without pickle: ``.pt`` through ``torch.load(weights_only=True)``
(a plain ``{name: tensor}``, or one nested under a ``"state_dict"`` key), ``.npz`` through
``np.load(allow_pickle=False)`` with one array per name. Every parameter of the module must be
present with its shape (``strict`` loading); values are cast to the module's dtype. BatchNorm
running statistics in the file replace the frozen mean-0 / variance-1 ones (the BatchNorm layers
stay in eval mode, see ``cnn.py``).

The weights change theta*, so everything keyed on the setting must carry their sha256: the
trained-model cache (``tagged_cache_path``) and the ground-truth store key. Without a weights file
nothing changes (same paths, same keys as before).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from influence_bench.paths import data_dir
from influence_bench.spec.settings import Setting

ENV_PREFIX = "INFLUENCE_BENCH_INIT_WEIGHTS_"
SUFFIXES = (".pt", ".npz")


class InitWeightsError(ValueError):
    """A weights file exists but cannot be used for this setting; the message says why."""


def env_var(setting_id: str) -> str:
    return ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", setting_id.upper())


def find_init_weights(setting: Setting) -> Path | None:
    """The weights file for ``setting`` (see the module docstring), or None."""
    given = os.environ.get(env_var(setting.id))
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise InitWeightsError(f"{env_var(setting.id)}={given}: no such file")
        return path
    for suffix in SUFFIXES:
        path = data_dir() / "weights" / f"{setting.id}{suffix}"
        if path.is_file():
            return path
    return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def init_weights_sha256(setting: Setting) -> str | None:
    """sha256 of the setting's weights file, or None without one (for cache and store keys)."""
    path = find_init_weights(setting)
    return None if path is None else sha256_file(path)


def _why_refused(exc: Exception) -> str:
    """The line of torch's (many-line) weights-only refusal that says what was refused."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if "unsupported global" in low or ("global" in low and "blocked" in low) or "unsupported operand" in low:
            return ln
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` from a ``.pt`` (weights_only) or ``.npz`` (no pickle) file."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.as_tensor(z[k]) for k in z.files}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refused (not plain tensors) or not a torch file
        raise InitWeightsError(f"{path}: refused, not a weights-only torch state_dict ({_why_refused(exc)}); nothing "
                               "in it was run. Save plain tensors (torch.save(module.state_dict(), path)) or an "
                               ".npz of arrays") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InitWeightsError(f"{path}: expected a state_dict {{name: tensor}}, got {type(obj).__name__}")
    return dict(obj)


def load_init_weights(setting: Setting, module: nn.Module) -> tuple[bool, str | None]:
    """Load the setting's user-supplied weights into ``module`` in place, if there are any.

    Returns ``(applied, sha256 of the file)``, or ``(False, None)`` without a weights file.
    Raises ``InitWeightsError`` for a file that does not fit the module (names, shapes).
    """
    path = find_init_weights(setting)
    if path is None:
        return False, None
    sd = read_state_dict(path)
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                 f"wrong shape {wrong[:5]}" if wrong else ""]
        raise InitWeightsError(f"{path} does not fit setting {setting.id!r} ({setting.model.family}): "
                               + "; ".join(p for p in parts if p))
    cast = {k: sd[k].to(own[k].dtype) if k in sd else own[k] for k in own}
    module.load_state_dict(cast, strict=True)
    return True, sha256_file(path)


def tagged_cache_path(path: Path, sha256: str | None) -> Path:
    """``<stem>-init<sha[:16]><suffix>`` beside ``path`` when weights were applied, else ``path``."""
    if sha256 is None:
        return path
    return path.with_name(f"{path.stem}-init{sha256[:16]}{path.suffix}")
