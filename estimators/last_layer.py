"""``last-layer``: exact influence restricted to the final layer's parameters.

``I[j, i] = (1/n) g_j^T (H_last + damping I)^-1 g_i``, with ``g`` the loss gradients with respect
to the final ``nn.Linear``'s weight and bias only and ``H_last`` the Hessian of the training
objective with respect to those parameters (every other parameter held at theta*), weight decay
included. Because the model output is linear in the final layer's parameters, that Hessian block
is exactly ``(1/n) sum_i Lam_i (x) h~_i h~_i^T + weight_decay I`` (``h~ = [features; 1]``, ``Lam_i`` the
output Hessian of the loss: ``diag(p) - p p^T`` for cross-entropy, ``I`` for squared error), which
is what is built here. For a one-layer model (logistic regression) this is the full ``exact``.
docs/protocol.md sign convention: positive = removing training point i raises test loss j.

Hyperparameters:
    damping: added to the diagonal (default 0; the weight decay is always included).
    max_params: refuse a final layer with more parameters (the block is max_params^2 floats).
"""

from dataclasses import dataclass

import torch

from influence_bench import Estimator, EstimatorUnsupported, register
from influence_bench.curvature.kfac import factored_dot, final_features, output_hessian, output_loss_grad
from influence_bench.curvature.products import solve_rows


@register
@dataclass
class LastLayer(Estimator):
    name = "last-layer"
    tags = frozenset({"hessian"})

    damping: float = 0.0
    max_params: int = 12_000

    def influence(self, ctx):
        layer, h, out = final_features(ctx.fm, ctx.theta, ctx.x_train, self.name)
        if layer.n_params > self.max_params:
            raise EstimatorUnsupported(
                f"the final layer has {layer.n_params} parameters > max_params={self.max_params}; its "
                "Hessian block would not fit. Raise max_params or use `cg`.")
        _, h_test, out_test = final_features(ctx.fm, ctx.theta, ctx.x_test, self.name)
        n, (C, A) = ctx.n_train, (layer.n_out, layer.n_in)
        lam = output_hessian(ctx.fm.loss, out)  # [n, C, C]
        blocks = torch.empty(C, C, A, A, dtype=h.dtype, device=h.device)
        for c in range(C):
            for d in range(c, C):
                blocks[c, d] = h.T @ (lam[:, c, d, None] * h) / n
                blocks[d, c] = blocks[c, d]
        H = blocks.permute(0, 2, 1, 3).reshape(C * A, C * A)  # row-major [W | b] layout
        H = 0.5 * (H + H.T)
        H.diagonal().add_(ctx.weight_decay + self.damping)
        # per-sample gradients w.r.t. [W | b]: delta_i h~_i^T (never materialised for the train set)
        d_train = output_loss_grad(ctx.fm.loss, out, ctx.y_train)  # [n, C]
        d_test = output_loss_grad(ctx.fm.loss, out_test, ctx.y_test)
        g_test = (d_test[:, :, None] * h_test[:, None, :]).reshape(ctx.n_test, -1)
        solved, self.diagnostics["solver"] = solve_rows(H, g_test)
        self.diagnostics.update({"layer": layer.name or "<model>", "layer_params": layer.n_params,
                                 "fraction_of_params": layer.n_params / ctx.n_params})
        solved = solved.reshape(ctx.n_test, C, A)
        return factored_dot(solved, d_train, h) / n
