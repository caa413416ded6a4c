"""``exact``: first-order influence with the explicit Hessian.

``I[j, i] = (1/n) g_j^T (H + damping I)^-1 g_i`` with ``H`` the Hessian of the mean training loss
including weight decay. Solved by Cholesky when ``H + damping I`` is positive definite, else by LU
(an indefinite Hessian at a saddle is reported in the diagnostics), and by the pseudo-inverse when
``H`` is singular: without weight decay the softmax's shift invariance (and, on separable data, a
saturated net) leaves exact null directions, which per-sample gradients do not enter.

Hyperparameters:
    damping     added to the Hessian's diagonal (default 0: the plain influence function).
    max_params  refuse models with more parameters (default 12,000: the Hessian is max_params^2
                floats, 1.2 GB in float64); use ``cg`` or ``lissa`` beyond it.
    max_seconds refuse (``EstimatorUnsupported``) when forming the Hessian (n_params Hessian-vector
                products) would take longer than this at the product time measured on the setting
                (default 120 s).
"""

from dataclasses import dataclass

import torch

from influence_bench import Estimator, EstimatorUnsupported, register
from influence_bench.curvature.products import solve_rows


@register
@dataclass
class Exact(Estimator):
    name = "exact"
    tags = frozenset({"hessian", "second-order"})

    damping: float = 0.0
    max_params: int = 12_000  # the Hessian is max_params^2 floats (1.2 GB in float64 at 12k)
    max_seconds: float = 120.0  # refuse when forming the Hessian (n_params HVPs) would take longer

    def influence(self, ctx):
        if ctx.n_params > self.max_params:
            raise EstimatorUnsupported(
                f"{ctx.n_params} parameters exceed max_params={self.max_params}: the explicit Hessian "
                f"would hold {ctx.n_params ** 2 * 8 / 2**30:.1f} GiB. Use `cg` or `lissa` (implicit "
                "Hessian-vector products) instead, or raise max_params.")
        if not ctx.is_cached("hessian"):
            ctx.check_hvp_budget(ctx.n_params, self.name, self.max_seconds, "the explicit Hessian")
        H = ctx.hessian()
        if self.damping:
            H = H + self.damping * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        g_test, g_train = ctx.test_grads(), ctx.train_grads()
        solved, self.diagnostics["solver"] = solve_rows(H, g_test)  # H^-1 g_j, [n_test, P]
        return solved @ g_train.T / ctx.n_train
