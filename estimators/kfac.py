"""``kfac``: influence with the Kronecker-factored Gauss-Newton matrix (Martens & Grosse 2015).

``I[j, i] = (1/n) g_j^T (G_KFAC + (weight_decay + damping) I)^-1 g_i`` (docs/protocol.md sign convention:
the predicted change in test loss j when training point i is removed; positive = helping).
``G_KFAC`` is block-diagonal over the model's ``nn.Linear`` layers, each block ``S (x) A`` with
``A = E[a~ a~^T]`` (layer inputs with a bias column) and ``S = E[g g^T]`` (pre-activation gradients,
the expectation over the model's own output distribution taken exactly, not sampled: this is the
GGN, label-free). Details and exactness conditions: ``influence_bench/kfac.py``.

Hyperparameters:
    damping: added to the weight decay on every eigenvalue of each block (default 0: the
        regulariser alone; with weight decay 0 a tiny relative floor keeps the inverse finite
        and is reported in the diagnostics).

Only ``nn.Linear`` layers (with parameter-free activations between them) are supported; any other
parameterised layer raises ``EstimatorUnsupported`` naming it.
"""

from dataclasses import dataclass

from influence_bench import Estimator, register
from influence_bench.curvature.kfac import kfac_influence


@register
@dataclass
class KFAC(Estimator):
    name = "kfac"
    tags = frozenset({"curvature-approximation"})

    damping: float = 0.0

    def influence(self, ctx):
        return kfac_influence(ctx, corrected=False, damping=self.damping, diagnostics=self.diagnostics, who=self.name)
