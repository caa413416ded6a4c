"""``representer``: representer point selection (Yeh et al. 2018) on the final layer.

At a stationary point of ``J = (1/n) sum_i L_i + (lam/2) ||theta||^2`` the final layer's
``W~ = [W | b]`` (``f~ = [features; 1]``: the bias is regularised too) satisfies
``(1/n) sum_i dL_i/dPhi_i f~_i^T + lam W~ = 0``, so with ``alpha_i = -1/(lam n) dL_i/dPhi_i`` (Yeh et al.'s
``-1/(2 lam' n)`` for their ``lam' ||W||^2``, ``lam' = lam/2``) the output on any input decomposes as

    Phi(x_t) = sum_i alpha_i (f~_i . f~_t)          (exactly, nothing left over)

``decomposition`` returns the terms ``alpha_i k(i, t)`` (``[n_test, n_train, C]``). Conversion to
docs/protocol.md's sign convention: removing training point i deletes its term, so the output of test
point t moves by ``-alpha_i k(i, t)`` and, to first order, its loss by

    I[t, i] = -dL_t/dPhi_t . alpha_i k(i, t)
            = (1/n) (dL_t/dPhi_t . dL_i/dPhi_i) (f~_t . f~_i) / lam,

positive when point i pushes the test output where its loss wants it (helping). This equals
last-layer gradient-dot divided by ``lam``, i.e. influence on the final layer with its Hessian
replaced by ``lam I`` (the other representer weights are held fixed: no retraining response).

Hyperparameters:
    weight_decay: ``lam`` (default None: the setting's weight decay, for which the decomposition
        of theta* is exact; the estimator refuses ``lam = 0``).
"""

from dataclasses import dataclass

import torch

from influence_bench import Estimator, EstimatorUnsupported, register
from influence_bench.curvature.kfac import final_features, output_loss_grad


@register
@dataclass
class Representer(Estimator):
    name = "representer"
    tags = frozenset({"gradient-only", "last-layer"})

    weight_decay: float | None = None

    def _lam(self, ctx) -> float:
        lam = ctx.weight_decay if self.weight_decay is None else self.weight_decay
        if not lam > 0:
            raise EstimatorUnsupported("representer points need an L2 regulariser (weight decay > 0): "
                                       f"alpha_i = -dL_i/dPhi_i / (lam n) with lam = {lam}")
        return float(lam)

    def alphas(self, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha [n, C], f~ [n, in+1])`` of the training set at theta*."""
        _, f, out = final_features(ctx.fm, ctx.theta, ctx.x_train, self.name)
        alpha = -output_loss_grad(ctx.fm.loss, out, ctx.y_train) / (self._lam(ctx) * ctx.n_train)
        return alpha, f

    def decomposition(self, ctx, x: torch.Tensor) -> torch.Tensor:
        """``[m, n_train, C]``: the representer terms ``alpha_i (f~_i . f~(x_t))`` of each input row."""
        alpha, f = self.alphas(ctx)
        _, f_x, _ = final_features(ctx.fm, ctx.theta, x, self.name)
        return (f_x @ f.T)[:, :, None] * alpha[None, :, :]

    def influence(self, ctx):
        alpha, f = self.alphas(ctx)
        _, f_t, out_t = final_features(ctx.fm, ctx.theta, ctx.x_test, self.name)
        d_t = output_loss_grad(ctx.fm.loss, out_t, ctx.y_test)  # [n_test, C]
        K = f_t @ f.T  # [n_test, n]
        recon = K @ alpha  # sum_i alpha_i k(i, t): the representer theorem's output
        self.diagnostics.update({
            "lambda": self._lam(ctx),
            # |sum_i alpha_i k(i, t) - Phi(x_t)| relative to |Phi|: ~0 at a stationary point
            "representer_residual": float((recon - out_t).abs().max() / out_t.abs().max().clamp_min(1e-300)),
        })
        return -K * (d_t @ alpha.T)
