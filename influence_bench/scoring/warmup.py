"""One-time costs of a process, paid before the first timed estimator call instead of by it.

The first ``torch.func`` transform in a process (``vmap(grad(...))``: ~1.6-1.9 s on these 2-core
machines, once; then ~1 ms) and the first kernels on a device were charged to whichever estimator
ran first: ``exact`` on iris-logreg measured 1.73 s first and 0.009 s second in one process, and
``gradient-dot`` 1.58 s first and 0.004 s second. ``warm_up(device)`` runs each transform the
estimators use (per-example gradients, Hessian-vector products, a Hessian) on a toy problem once per
process and device, so a case's ``wall_time_s`` no longer depends on the order estimators ran in.
"""

from __future__ import annotations

import torch

_DONE: set[str] = set()


def warm_up(device: torch.device | str = "cpu") -> bool:
    """Run the toy transforms on ``device`` (once per process and device); True when it ran now."""
    key = str(torch.device(device))
    if key in _DONE:
        return False
    from torch.func import grad, hessian, jvp, vmap

    for dtype in (torch.float64, torch.float32):
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(3, 2, generator=gen, dtype=dtype).to(device)
        x = torch.randn(5, 3, generator=gen, dtype=dtype).to(device)
        y = torch.zeros(5, dtype=torch.long, device=w.device)

        def loss(w, x, y):
            return torch.nn.functional.cross_entropy((x @ w)[None], y[None])

        with torch.enable_grad():
            vmap(grad(loss), in_dims=(None, 0, 0))(w, x, y)
            jvp(grad(lambda v: loss(v, x[0], y[0])), (w,), (w,))
            hessian(lambda v: loss(v, x[0], y[0]))(w)
            w.detach().requires_grad_(True).sum().backward()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    _DONE.add(key)
    return True
