"""``gradient-dot``: influence with the Hessian replaced by the identity.

``I[j, i] = (1/n) g_j^T g_i`` -- the cheapest first-order proxy (no curvature at all), on the
same scale and sign as the influence function.
"""

from dataclasses import dataclass

from influence_bench import Estimator, register


@register
@dataclass
class GradientDot(Estimator):
    name = "gradient-dot"
    tags = frozenset({"gradient-only"})

    def influence(self, ctx):
        return ctx.test_grads() @ ctx.train_grads().T / ctx.n_train
