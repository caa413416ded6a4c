"""What ``influence-bench paper`` runs by default (torch-free, so ``--help`` can show it)."""

from __future__ import annotations

IRIS_ESTIMATORS = ("exact", "lissa")  # the paper: the exact Hessian on Iris, compared with LiSSA
HORIZONS = (1, 3, 10, 30, 100, 300, 1000)  # epochs of the paper's Adam from theta* (4 steps each)
HORIZON_SETTINGS = ("iris-mlp-d4-w16-wd1e-3", "iris-mlp-d2-w32-wd1e-3")  # one depth, one width point
# the PBRF's proximity is the Iris settings' damping (1e-3); exact-ggn at that damping is the
# influence whose response the PBRF is (Bae et al. 2022), so its gap to the PBRF is linearisation alone
HORIZON_ESTIMATORS = (("exact", {}), ("exact-ggn", {"damping": 1e-3}), ("lissa", {}))
MNIST_SETTINGS = (("mnist5k-logreg-wd1e-3", ("exact", "lissa")), ("mnist5k-cnn-wd1e-3", ("exact-ggn", "lissa")))
