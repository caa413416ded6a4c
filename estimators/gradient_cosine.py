"""``gradient-cosine``: cosine similarity of test and training loss gradients at theta*.

``I[j, i] = s * cos(g_j, g_i)`` with one global scale ``s = (1/n) * mean_j ||g_j|| * mean_i ||g_i||``
(the magnitude gradient-dot would give to typical points), recorded in the diagnostics.
``s > 0``, so the sign is gradient-dot's and the docs/protocol.md convention holds (aligned gradients:
a step on point i also lowers test loss j, so removing i is predicted to raise it). Unlike
gradient-dot, ``I / s`` does not depend on the length of any single gradient: rescaling one test or
training gradient by ``c > 0`` leaves every ``I / s`` unchanged (the outlier-heavy norms of
high-loss points no longer dominate the ranking); rescaling them all by ``c`` scales ``s`` by ``c^2``.

Hyperparameters:
    eps: gradients shorter than ``eps`` times the longest one count as zero (cosine 0).
"""

from dataclasses import dataclass

import torch

from influence_bench import Estimator, register


@register
@dataclass
class GradientCosine(Estimator):
    name = "gradient-cosine"
    tags = frozenset({"gradient-only"})

    eps: float = 1e-12

    def influence(self, ctx):
        g_test, g_train = ctx.test_grads(), ctx.train_grads()
        nt, ni = g_test.norm(dim=1), g_train.norm(dim=1)
        floor = self.eps * float(torch.cat([nt, ni]).max().clamp_min(1e-300))
        unit_t = torch.where(nt[:, None] > floor, g_test / nt.clamp_min(floor)[:, None], torch.zeros_like(g_test))
        unit_i = torch.where(ni[:, None] > floor, g_train / ni.clamp_min(floor)[:, None], torch.zeros_like(g_train))
        scale = float(nt.mean() * ni.mean()) / ctx.n_train
        self.diagnostics.update({"scale": scale, "mean_test_grad_norm": float(nt.mean()),
                                 "mean_train_grad_norm": float(ni.mean())})
        return scale * (unit_t @ unit_i.T)
