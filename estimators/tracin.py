"""``tracin``: TracInCP (Pruthi et al. 2020) over checkpoints of the training run.

``I[j, i] = sum_k lr_k * g_j(theta_k) . g_i(theta_k) / n``: the first-order effect of training
point i on test loss j, summed along the optimisation path. The ``1/n`` is this project's: the
objective is the *mean* loss, so a full-batch step moves theta by ``-(lr/n) g_i`` on account of point
i, and deleting that contribution changes test loss j by ``+(lr/n) g_j . g_i`` to first order
(docs/protocol.md sign convention: positive = point i was helping). Pruthi et al.'s per-example SGD
TracIn is ``n`` times this. With a single checkpoint at theta* and ``lr = 1`` it is exactly
``gradient-dot``.

Checkpoints and their ``lr_k`` come from ``ctx.checkpoints()``: evenly spaced iterates of the
full-batch L-BFGS run plus theta*. L-BFGS has no learning rate; ``lr_k`` is the sum over the
iterations the checkpoint stands for of the gradient-descent-equivalent step size
``eta_s = -<theta_{s+1} - theta_s, grad_s> / ||grad_s||^2`` (see ``training.Checkpoints``).

Hyperparameters:
    last: use only the last ``last`` checkpoints (theta* is the last one); default all.
    lr: use this weight for every checkpoint instead of the recorded ``lr_k`` (default: recorded).
"""

from dataclasses import dataclass

import torch

from influence_bench import Estimator, register
from influence_bench.curvature.products import per_sample_grads


@register
@dataclass
class TracIn(Estimator):
    name = "tracin"
    tags = frozenset({"gradient-only", "checkpoints"})

    last: int | None = None
    lr: float | None = None

    def influence(self, ctx):
        ckpts = ctx.checkpoints()
        if self.last is not None:
            if self.last < 1:
                raise ValueError(f"last must be >= 1, got {self.last}")
            ckpts = ckpts[-self.last:]
        total = torch.zeros(ctx.n_test, ctx.n_train, dtype=ctx.dtype, device=ctx.device)
        weights = []
        for k, (theta, lr_k) in enumerate(ckpts):
            w = float(lr_k if self.lr is None else self.lr)
            weights.append(w)
            if w == 0.0:
                continue
            if k == len(ckpts) - 1 and torch.equal(theta, ctx.theta):  # theta*: shared gradients
                g_test, g_train = ctx.test_grads(), ctx.train_grads()
            else:
                g_test = per_sample_grads(ctx.fm, theta, ctx.x_test, ctx.y_test)
                g_train = per_sample_grads(ctx.fm, theta, ctx.x_train, ctx.y_train)
            total += w * (g_test @ g_train.T)
        self.diagnostics.update({"n_checkpoints": len(ckpts), "lr_weights": weights,
                                 "lr_source": "recorded (GD-equivalent L-BFGS step sizes)" if self.lr is None
                                 else f"constant {self.lr}"})
        return total / ctx.n_train
