"""Which torch devices this machine can run on (the command line's ``--device``, the Python API's
``device=``): checked before anything runs."""

from __future__ import annotations


def check_device(value: str) -> str:
    """``cpu``, or ``cuda`` / ``cuda:N`` naming a CUDA device this machine has."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{value!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return value
    if dev.type != "cuda":
        raise ValueError(f"{value!r}: only cpu and cuda[:N] are supported")
    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device visible"
        raise ValueError(f"{value!r}: this machine has no usable CUDA device ({build}, "
                         f"torch {torch.__version__}); use --device cpu")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise ValueError(f"{value!r}: this machine has {n} CUDA device(s): cuda:0 to cuda:{n - 1}")
    return value
