"""``ekfac``: influence with the eigenvalue-corrected K-FAC Gauss-Newton matrix
(George et al. 2018; Grosse et al. 2023).

Same eigenbasis as ``kfac`` (``Q_S (x) Q_A`` per ``nn.Linear`` layer), but the eigenvalues
``lam_S (x) lam_A`` are replaced by the second moments of the per-sample GGN gradients projected
into that basis, ``Lam*[o, a] = E_i sum_c ((Q_S^T g_ic)_o)^2 ((Q_A^T a~_i)_a)^2`` (the expectation over
the model's output distribution taken exactly) -- the diagonal of the exact GGN block in that
basis, so EK-FAC is never further from the exact block (Frobenius norm) than K-FAC.

``I[j, i] = (1/n) g_j^T (G_EKFAC + (weight_decay + damping) I)^-1 g_i`` (docs/protocol.md sign convention).

Hyperparameters:
    damping: added to the weight decay on every corrected eigenvalue (default 0).
"""

from dataclasses import dataclass

from influence_bench import Estimator, register
from influence_bench.curvature.kfac import kfac_influence


@register
@dataclass
class EKFAC(Estimator):
    name = "ekfac"
    tags = frozenset({"curvature-approximation"})

    damping: float = 0.0

    def influence(self, ctx):
        return kfac_influence(ctx, corrected=True, damping=self.damping, diagnostics=self.diagnostics, who=self.name)
