"""kronfluence 1.0.1 adapters (``kronfluence:ekfac``, ``kronfluence:kfac``) against our built-ins of the same
method and against ``exact``, and the library's defects as clear errors.

Measured (kronfluence 1.0.1, float64, ``fisher="exact"``): against our ``kfac``/``ekfac`` Pearson r = 1.000000
and slope = 1.000000 on iris-logreg-wd1e-3 and iris-mlp-d2-w16-wd1e-3 (the same curvature, damping and
conversion); against ``exact``: kfac r 0.929 / slope 1.153 and ekfac r 0.926 / slope 1.350 on the logistic
regression, kfac r 0.816 / slope 2.087 and ekfac r 0.714 / slope 1.667 on the MLP (the Kronecker
approximation, identical to our built-ins'). The sampled Fisher with 64 label draws: kfac r 0.9996 / slope
1.075 against our ``kfac`` on the logistic regression.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from peer_support import agreement, need, ours, run

from influence_bench.errors import EstimatorError, EstimatorUnsupported

SETTINGS = ["iris-logreg-wd1e-3", "iris-mlp-d2-w16-wd1e-3"]
METHODS = ["kfac", "ekfac"]

# (setting, method) -> (Pearson r floor, slope range) against ``exact``: the measured values above with margin
# (r at least 0.1 below, slope within about 25% of the measured one); a wrong sign makes r negative, a
# missing 1/n multiplies the slope by n_train (> 100).
AGAINST_EXACT = {
    ("iris-logreg-wd1e-3", "kfac"): (0.85, (0.9, 1.45)),
    ("iris-logreg-wd1e-3", "ekfac"): (0.85, (1.0, 1.7)),
    ("iris-mlp-d2-w16-wd1e-3", "kfac"): (0.7, (1.55, 2.6)),
    ("iris-mlp-d2-w16-wd1e-3", "ekfac"): (0.6, (1.25, 2.1)),
}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("method", METHODS)
def test_matches_our_builtin_and_exact(method, setting):
    need("kronfluence")
    theirs = run(f"kronfluence:{method}", setting)
    r, slope = agreement(theirs, ours(method, setting))
    assert r >= 0.9999 and abs(slope - 1) <= 0.01, (
        f"kronfluence:{method} vs our {method} on {setting}: r={r:.6f} slope={slope:.6f}")
    r_floor, (lo, hi) = AGAINST_EXACT[(setting, method)]
    r, slope = agreement(theirs, ours("exact", setting))
    assert r >= r_floor and lo <= slope <= hi, (
        f"kronfluence:{method} vs exact on {setting}: r={r:.4f} (floor {r_floor}) slope={slope:.4f} "
        f"(expected in [{lo}, {hi}])")


def test_damping_maps_to_our_damping():
    """``damping`` is added on top of the weight decay exactly as our ``ekfac``'s (a damping of 0.05 moves
    the scores far from the undamped ones; kronfluence's must follow)."""
    need("kronfluence")
    setting = "iris-logreg-wd1e-3"
    theirs = run("kronfluence:ekfac(damping=0.05)", setting)
    reference = ours("ekfac(damping=0.05)", setting)
    r, slope = agreement(theirs, reference)
    assert r >= 0.9999 and abs(slope - 1) <= 0.01, f"r={r:.6f} slope={slope:.6f}"
    r, slope = agreement(reference, ours("ekfac", setting))
    assert slope < 0.9, f"damping 0.05 should shrink the scores (slope {slope:.4f} against no damping)"


@pytest.mark.slow
def test_sampled_fisher_converges_to_our_kfac():
    """The library's own true Fisher (labels drawn from the model, seeded): 64 draws per point are within
    a few percent of the exact expectation our ``kfac`` takes."""
    need("kronfluence")
    setting = "iris-logreg-wd1e-3"
    theirs = run('kronfluence:kfac(fisher="sampled", fisher_samples=64)', setting)
    r, slope = agreement(theirs, ours("kfac", setting))
    assert r >= 0.998 and abs(slope - 1) <= 0.15, f"r={r:.5f} slope={slope:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_no_weight_decay_uses_our_relative_floor(method):
    """Weight decay 0, damping 0: the damping_factor is our built-ins' relative floor (1e-8 x the top
    eigenvalue); measured r = 1.000000, slope = 1.000000 against ours."""
    need("kronfluence")
    setting = "iris-mlp-d2-w16-wd0"
    r, slope = agreement(run(f"kronfluence:{method}", setting), ours(method, setting))
    assert r >= 0.9999 and abs(slope - 1) <= 0.01, f"r={r:.6f} slope={slope:.6f}"


def test_defect_subclass_of_linear_is_a_key_error():
    """kronfluence 1.0.1 ``prepare_model`` tests ``isinstance(module, (nn.Linear, nn.Conv2d))`` but looks the
    wrapper up by ``type(module)``: a subclass of ``nn.Linear`` (our ``LogisticRegression``) is a KeyError.
    ``plain_layers=False`` hands the model over as it is."""
    need("kronfluence")
    with pytest.raises(EstimatorError, match=r"kronfluence 1\.0\.1 failed in prepare_model: KeyError: "
                                             r".*LogisticRegression"):
        run("kronfluence:ekfac(plain_layers=False)", "iris-logreg-wd1e-3")


def test_defect_model_that_is_one_linear_layer_recurses():
    """kronfluence 1.0.1 wraps a model that *is* one ``nn.Linear`` by attaching the wrapper to the layer itself
    (``setattr(model, "", TrackedLinear(model))``, a cycle): ``Analyzer`` then fails with a RecursionError
    (``plain_layers`` puts such a model in an ``nn.Sequential``)."""
    need("kronfluence")
    from influence_bench_peers.common import upstream
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.task import Task

    class Sum(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return model(batch[0]).sum()

        def compute_measurement(self, batch, model):
            return model(batch[0]).sum()

    with tempfile.TemporaryDirectory() as out_dir:
        with pytest.raises(EstimatorError, match=r"kronfluence 1\.0\.1 failed in Analyzer.__init__: RecursionError"):
            with upstream("kronfluence", "Analyzer.__init__"):
                model = prepare_model(torch.nn.Linear(4, 3), Sum())
                Analyzer(analysis_name="a", model=model, task=Sum(), cpu=True, disable_tqdm=True, output_dir=out_dir)


def test_untracked_parameterised_layer_is_unsupported():
    need("kronfluence")
    from influence_bench_peers.kronfluence_adapters import _check_layers

    _check_layers(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Conv2d(1, 2, 3)), "k")
    with pytest.raises(EstimatorUnsupported, match="LayerNorm"):
        _check_layers(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8)), "kronfluence:kfac")


def test_registered_without_running():
    from influence_bench.api.registry import REGISTRY

    for method in METHODS:
        cls = REGISTRY.get(f"kronfluence:{method}")
        assert cls.method == method and cls.library == "kronfluence" and cls.opt_in
        assert cls.tags == REGISTRY.get(method).tags
