"""Content hashes used in cache and store keys: of arrays (dtype, shape and bytes) and of JSON."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch


def sha256_array(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def sha256_tensors(*tensors: torch.Tensor) -> str:
    """One sha256 over several tensors (each one's dtype, shape and bytes, in order)."""
    h = hashlib.sha256()
    for t in tensors:
        a = np.ascontiguousarray(t.detach().cpu().numpy())
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
