"""``exact-ggn``: first-order influence with the explicit generalised Gauss-Newton matrix.

``I[j, i] = (1/n) g_j^T (G + damping I)^-1 g_i`` with
``G = (1/n) sum_i J_i^T A_i J_i + weight_decay I`` -- the Hessian of the training objective with
the second derivatives of the network itself dropped (``J_i`` the Jacobian of sample i's outputs,
``A_i`` the Hessian of the loss in the outputs: ``diag(p_i) - p_i p_i^T`` with ``p_i`` the softmax
for cross-entropy, the identity for squared error). ``G`` is positive semi-definite plus weight
decay, so unlike the Hessian of a deep net it is never indefinite; for a model linear in its
parameters (logistic regression, ridge) it *equals* the Hessian and this estimator equals ``exact``.

Hyperparameters:
    damping     added to G's diagonal (default 0).
    max_params  refuse models with more parameters (the explicit G is max_params^2 floats).

Diagnostics: the solver used, and the smallest / largest eigenvalue of ``G + damping I`` when the
model is small enough to afford the eigendecomposition (``eig_below`` parameters).
"""

from dataclasses import dataclass

import torch

from influence_bench import Estimator, EstimatorUnsupported, register
from influence_bench.curvature.products import solve_rows


@register
@dataclass
class ExactGGN(Estimator):
    name = "exact-ggn"
    tags = frozenset({"hessian", "ggn", "second-order"})

    damping: float = 0.0
    max_params: int = 12_000  # G is max_params^2 floats (1.2 GB in float64 at 12k)
    eig_below: int = 3_000  # record G's extreme eigenvalues when P is at most this

    def influence(self, ctx):
        if ctx.n_params > self.max_params:
            raise EstimatorUnsupported(
                f"{ctx.n_params} parameters exceed max_params={self.max_params}: the explicit Gauss-Newton "
                f"matrix would hold {ctx.n_params ** 2 * 8 / 2**30:.1f} GiB. Use `cg` with curvature='ggn' "
                "(implicit Gauss-Newton-vector products), `kfac`/`ekfac` if available, or raise max_params.")
        G = ctx.ggn()
        if self.damping:
            G = G + self.damping * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        if ctx.n_params <= self.eig_below:
            ev = torch.linalg.eigvalsh(G)
            self.diagnostics["eig_min"] = float(ev[0])
            self.diagnostics["eig_max"] = float(ev[-1])
        g_test, g_train = ctx.test_grads(), ctx.train_grads()
        # G is positive semi-definite: singular only without weight decay and damping
        solved, self.diagnostics["solver"] = solve_rows(G, g_test, semidefinite=True)
        return solved @ g_train.T / ctx.n_train
