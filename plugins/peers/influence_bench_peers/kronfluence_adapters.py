"""kronfluence (Bae, Grosse et al.; ``pip install kronfluence==1.0.1``) adapters: its two Kronecker-factored
influence strategies, ``kronfluence:ekfac`` and ``kronfluence:kfac`` (the library's ``FactorArguments.strategy``
``"ekfac"`` and ``"kfac"``; its other strategies, ``"identity"`` and ``"diagonal"``, are not registered: our
built-ins have no such methods to put them beside).

How the library is driven (every call, nothing kept between calls):

* the model is ``module_at_theta(ctx)`` (a copy at θ*, the context's dtype) wrapped by
  ``kronfluence.prepare_model``; every parameterised module must be an ``nn.Linear`` or ``nn.Conv2d`` (the
  layers kronfluence tracks), else ``EstimatorUnsupported``: an untracked parameter would silently drop out
  of the influence;
* a ``Task`` whose ``compute_train_loss`` is the protocol's per-sample loss *summed* over the batch (as the
  library's examples do) and ``compute_measurement`` the summed loss of the query (test) batch; so the
  per-sample gradients kronfluence forms are the gradients ``g_i`` of the protocol's per-sample losses;
* ``Analyzer.fit_all_factors`` then ``Analyzer.compute_pairwise_scores`` in a fresh temporary directory
  (the library writes factors and scores under its ``output_dir``), progress bars and logging off, every
  dtype argument set to the context's dtype (float64 on these settings).

The conversion to the protocol (docs/protocol.md): kronfluence normalises its covariance factors and the
EK-FAC eigenvalue corrections by the number of examples, so its curvature is the (Kronecker-factored)
Fisher of the *mean* per-sample loss; its ``damping_factor`` is added to every (corrected) eigenvalue; its
pairwise score is ``g_test^T (F + damping_factor I)^-1 g_train``, positive when the training point helps
(removing it raises the test loss). Hence ``damping_factor = mean_hessian_damping(ctx, damping)`` (weight
decay + our damping, as our built-ins ``kfac``/``ekfac`` add it) and ``I = +1 * (1/n_train) * scores``
(``[n_test, n_train]``, no transpose). With no weight decay and no damping the softmax's curvature is
singular: as our built-ins do, ``damping_factor`` is then 1e-8 times the largest eigenvalue of the fitted
curvature (``relative_floor_used`` in the diagnostics).

The Fisher (the curvature kronfluence factors; ``fisher``): kronfluence's true Fisher
(``use_empirical_fisher=False``) calls the task's ``compute_train_loss(sample=True)``, which the library
leaves to the user ("must be implemented to approximate the true Fisher"), over the dataset given to
``fit_all_factors``. ``"exact"`` (default) passes the training set ``n_out`` times, pass ``c`` with loss
``sqrt(n_out p_c) CE(out, c)`` (``p_c`` held constant; squared error: ``sqrt(n_out) 0.5||out - (out - e_c)||^2``),
so the output-gradient covariance kronfluence accumulates and divides by its example count is the GGN's
``E_i [diag(p_i) - p_i p_i^T]`` (``I``) exactly, the expectation our ``kfac``/``ekfac`` take (their matrices
agree to 1e-6); the activation factor, an average, is unchanged by the repetition. ``"sampled"``: labels
drawn from the model's predictive distribution with a generator seeded by ``seed`` (deterministic),
``fisher_samples`` passes (the library's usual Monte-Carlo Fisher; 1 draw per point is its examples' usage).
``"empirical"``: the training labels (``use_empirical_fisher=True``).

Upstream defects (kronfluence 1.0.1) and the documented usage chosen around them (``plain_layers=True``, the
default, recorded in the diagnostics; ``plain_layers=False`` hands the model over as it is and shows them):

* ``prepare_model`` tests ``isinstance(module, (nn.Linear, nn.Conv2d))`` but looks its wrapper up by
  ``type(module)``: a subclass (our ``LogisticRegression(nn.Linear)``) fails with ``KeyError: <class
  '...LogisticRegression'>``. A subclass that keeps the base class's ``forward`` is given the base class.
* a model that *is* one ``nn.Linear`` gets its wrapper attached to itself (a module cycle): ``Analyzer``
  fails with ``RecursionError: maximum recursion depth exceeded``. Such a model is put in an
  ``nn.Sequential`` (the library's documented models hold their layers as children).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from influence_bench import EstimatorError, EstimatorUnsupported, register

from .common import (
    PeerEstimator,
    as_protocol,
    mean_hessian_damping,
    module_at_theta,
    per_sample_loss,
    require,
    test_set,
    train_set,
    upstream,
)


def _check_layers(module: torch.nn.Module, who: str) -> None:
    tracked = (torch.nn.Linear, torch.nn.Conv2d)
    for name, sub in module.named_modules():
        if any(True for _ in sub.parameters(recurse=False)) and not isinstance(sub, tracked):
            raise EstimatorUnsupported(
                f"{who}: kronfluence tracks only nn.Linear and nn.Conv2d layers; {name or 'the model'} is a "
                f"{type(sub).__name__} with parameters, which kronfluence would leave out of the influence")


def _plain_layers(model: torch.nn.Module, diagnostics: dict) -> torch.nn.Module:
    """kronfluence 1.0.1's documented usage, a model *holding* plain ``nn.Linear``/``nn.Conv2d`` layers:
    a subclass of them that keeps their ``forward`` (our ``LogisticRegression``) becomes the plain class, a
    model that is itself one such layer is put in an ``nn.Sequential``. Without it the library fails (the
    defects in the module docstring, ``plain_layers=False`` shows them)."""
    changed = []
    for name, sub in model.named_modules():
        for base in (torch.nn.Linear, torch.nn.Conv2d):
            if isinstance(sub, base) and type(sub) is not base and type(sub).forward is base.forward:
                changed.append(f"{name or 'model'}: {type(sub).__name__} -> {base.__name__}")
                sub.__class__ = base
    if isinstance(model, (torch.nn.Linear, torch.nn.Conv2d)):
        changed.append(f"model: one {type(model).__name__} -> nn.Sequential({type(model).__name__})")
        model = torch.nn.Sequential(model)
    if changed:
        diagnostics["plain_layers"] = "; ".join(changed)
    return model


def _top_eigenvalue(factors: dict, strategy: str) -> float:
    """The largest eigenvalue of kronfluence's fitted curvature (EK-FAC: of the corrected Lambda matrices,
    K-FAC: products of the factors' eigenvalues), for the relative floor used without any damping."""
    if strategy == "ekfac":
        lam, count = factors["lambda_matrix"], factors["num_lambda_processed"]
        return max(float((lam[m].double() / count[m].double()).max()) for m in lam)
    a, g = factors["activation_eigenvalues"], factors["gradient_eigenvalues"]
    return max(float(a[m].double().max() * g[m].double().max()) for m in a)


class _RepeatedDataset(torch.utils.data.Dataset):
    """The training set ``times`` times over; item ``k`` is ``(x, y, k // n)``: the pass it belongs to (a
    fresh label draw of the sampled Fisher, or output direction ``k // n`` of the exact one)."""

    def __init__(self, base, times: int) -> None:
        self.base, self.times = base, int(times)

    def __len__(self) -> int:
        return len(self.base) * self.times

    def __getitem__(self, k):
        x, y = self.base[k % len(self.base)]
        return x, y, torch.tensor(k // len(self.base))


def _make_task(ctx, fisher: str, n_out: int, generator: torch.Generator):
    from kronfluence.task import Task

    cross_entropy = ctx.fm.loss == "cross_entropy"

    class ProtocolTask(Task):
        """The protocol's per-sample loss summed over the batch; ``sample=True`` (the Fisher's factors):
        ``"exact"``: pass ``c`` of the training set gives the output gradient ``sqrt(n_out p_c) (p - e_c)``
        (cross-entropy) or ``sqrt(n_out) e_c`` (squared error), whose outer products summed over the
        ``n_out`` passes, divided by them (kronfluence's normalisation by the example count), are the GGN's
        ``diag(p) - p p^T`` or ``I`` exactly; ``"sampled"``: labels drawn from the model's predictive
        distribution with a seeded generator."""

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            x, y = batch[0], batch[1]
            out = model(x)
            if not sample:
                return per_sample_loss(ctx, out, y).sum()
            weight = None
            with torch.no_grad():
                if fisher == "exact":
                    c = batch[2].to(out.device)
                    if cross_entropy:
                        p = torch.softmax(out.detach(), dim=-1).gather(1, c[:, None]).reshape(-1)
                        weight, y = (n_out * p).sqrt(), c
                    else:
                        weight = torch.full(c.shape, float(n_out), dtype=out.dtype, device=out.device).sqrt()
                        y = out.detach() - torch.nn.functional.one_hot(c, n_out).to(out.dtype)
                elif cross_entropy:
                    probs = torch.softmax(out.detach().to(torch.float64), dim=-1).cpu()
                    y = torch.multinomial(probs, 1, generator=generator).reshape(-1).to(out.device)
                else:  # 0.5 ||out - y||^2: the Gaussian of unit variance around the output
                    noise = torch.randn(out.shape, generator=generator, dtype=torch.float64)
                    y = out.detach() + noise.to(device=out.device, dtype=out.dtype)
            losses = per_sample_loss(ctx, out, y)
            return (losses if weight is None else weight * losses).sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return per_sample_loss(ctx, model(batch[0]), batch[1]).sum()

    return ProtocolTask()


@dataclass
class _KronfluenceFactored(PeerEstimator):
    library: ClassVar[str] = "kronfluence"
    tags: ClassVar[frozenset] = frozenset({"curvature-approximation"})
    strategy: ClassVar[str] = ""

    damping: float = 0.0
    fisher: str = "exact"
    fisher_samples: int = 1
    seed: int = 0
    batch_size: int = 1024
    plain_layers: bool = True

    def influence(self, ctx):
        require("kronfluence")
        kronfluence = require("kronfluence", "kronfluence.analyzer")
        arguments = require("kronfluence", "kronfluence.arguments")
        self.record_library()
        if self.fisher not in ("exact", "sampled", "empirical"):
            raise EstimatorError(f"{self.name}: fisher must be 'exact', 'sampled' or 'empirical', "
                                 f"got {self.fisher!r}")
        if self.fisher_samples < 1:
            raise EstimatorError(f"{self.name}: fisher_samples must be >= 1, got {self.fisher_samples}")

        model = module_at_theta(ctx)
        _check_layers(model, self.name)
        if self.plain_layers:
            model = _plain_layers(model, self.diagnostics)
        dtype = ctx.dtype
        damping_factor = mean_hessian_damping(ctx, self.damping)
        train = train_set(ctx)
        with torch.no_grad():
            n_out = int(model(train[0:1][0]).shape[-1])
        passes = {"exact": n_out, "sampled": self.fisher_samples, "empirical": 1}[self.fisher]
        self.diagnostics.update(strategy=self.strategy, damping_factor=damping_factor, fisher=self.fisher,
                                factor_passes=passes, conversion="I = +1 * (1/n_train) * scores")

        generator = torch.Generator().manual_seed(int(self.seed))
        task = _make_task(ctx, self.fisher, n_out, generator)
        factor_data = train if self.fisher == "empirical" else _RepeatedDataset(train, passes)
        batch = max(1, min(int(self.batch_size), len(train)))
        factor_args = arguments.FactorArguments(
            strategy=self.strategy, use_empirical_fisher=self.fisher == "empirical",
            covariance_max_examples=None, lambda_max_examples=None,
            activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype,
            eigendecomposition_dtype=torch.float64, per_sample_gradient_dtype=dtype, lambda_dtype=dtype)

        kron_logger = logging.getLogger("kronfluence")
        old_level = kron_logger.level
        kron_logger.setLevel(logging.WARNING)
        try:
            with tempfile.TemporaryDirectory(prefix="kronfluence-") as out_dir, warnings.catch_warnings():
                # kronfluence 1.0.1 builds a torch.cuda.amp.GradScaler, deprecated in torch 2.x
                warnings.simplefilter("ignore", FutureWarning)
                with upstream("kronfluence", "prepare_model"):
                    model = kronfluence.prepare_model(model, task)
                with upstream("kronfluence", "Analyzer.__init__"):
                    analyzer = kronfluence.Analyzer(
                        analysis_name="influence_bench", model=model, task=task, cpu=ctx.device.type == "cpu",
                        log_level=logging.WARNING, disable_tqdm=True, output_dir=out_dir)
                with upstream("kronfluence", "Analyzer.fit_all_factors"):
                    analyzer.fit_all_factors(factors_name=self.strategy, dataset=factor_data,
                                             per_device_batch_size=batch, factor_args=factor_args,
                                             overwrite_output_dir=True)
                if damping_factor <= 0.0:  # no weight decay, no damping: our kfac/ekfac's relative floor
                    with upstream("kronfluence", "Analyzer.load_all_factors"):
                        top = _top_eigenvalue(analyzer.load_all_factors(factors_name=self.strategy), self.strategy)
                    damping_factor = 1e-8 * max(top, 1e-30)
                    self.diagnostics.update(damping_factor=damping_factor, relative_floor_used=True,
                                            top_eigenvalue=top)
                score_args = arguments.ScoreArguments(
                    damping_factor=damping_factor, per_sample_gradient_dtype=dtype, precondition_dtype=dtype,
                    score_dtype=dtype, query_gradient_svd_dtype=dtype)
                with upstream("kronfluence", "Analyzer.compute_pairwise_scores"):
                    analyzer.compute_pairwise_scores(
                        scores_name="pairwise", factors_name=self.strategy, query_dataset=test_set(ctx),
                        train_dataset=train, per_device_query_batch_size=max(1, min(batch, ctx.n_test)),
                        per_device_train_batch_size=batch, score_args=score_args, overwrite_output_dir=True)
                    scores = analyzer.load_pairwise_scores(scores_name="pairwise")["all_modules"].clone()
        finally:
            kron_logger.setLevel(old_level)

        if tuple(scores.shape) != (ctx.n_test, ctx.n_train):
            raise EstimatorError(f"{self.name}: kronfluence returned scores of shape {tuple(scores.shape)}, "
                                 f"expected [n_test, n_train] = ({ctx.n_test}, {ctx.n_train})")
        return as_protocol(scores, ctx, sign=+1.0, scale=1.0 / ctx.n_train)


@register
@dataclass
class KronfluenceEKFAC(_KronfluenceFactored):
    """kronfluence's EK-FAC (``FactorArguments(strategy="ekfac")``): the K-FAC eigenbasis of every
    ``nn.Linear``/``nn.Conv2d`` layer with the eigenvalues replaced by the second moments of the per-sample
    Fisher gradients projected into it (the Lambda matrices), as our built-in ``ekfac``.

    ``I[j, i] = (1/n) g_j^T (F_EKFAC + (weight_decay + damping) I)^-1 g_i``: kronfluence's pairwise scores
    times ``+1/n_train`` (module docstring: its curvature is of the mean loss, its score positive for a
    helping training point).

    Hyperparameters:
        damping: added to the weight decay to form kronfluence's ``damping_factor`` (the amount added to
            every corrected eigenvalue), as our ``ekfac``'s damping (default 0: the weight decay alone).
        fisher: ``"exact"`` (default: the GGN expectation taken exactly, as our ``ekfac``; module
            docstring), ``"sampled"`` (kronfluence's Monte-Carlo true Fisher) or ``"empirical"`` (the
            training labels, kronfluence's ``use_empirical_fisher=True``).
        fisher_samples: label draws per training point for ``fisher="sampled"`` (default 1, the library's
            single pass over the data).
        seed: seed of the sampled labels (the adapter is deterministic for a given seed).
        batch_size: kronfluence's ``per_device_batch_size`` for factors and training gradients.
        plain_layers: give kronfluence plain ``nn.Linear``/``nn.Conv2d`` layers inside a container
            (default ``True``; ``False`` shows the two upstream defects of the module docstring).
    """

    name = "kronfluence:ekfac"
    method = "ekfac"
    strategy = "ekfac"


@register
@dataclass
class KronfluenceKFAC(_KronfluenceFactored):
    """kronfluence's K-FAC (``FactorArguments(strategy="kfac")``): per ``nn.Linear``/``nn.Conv2d`` layer
    ``A (x) S`` (input-activation and output-gradient covariances, normalised by the number of examples),
    inverted through their eigendecompositions with ``damping_factor`` added to every product of
    eigenvalues, as our built-in ``kfac``.

    ``I[j, i] = (1/n) g_j^T (F_KFAC + (weight_decay + damping) I)^-1 g_i``: kronfluence's pairwise scores
    times ``+1/n_train`` (module docstring).

    Hyperparameters: as ``kronfluence:ekfac`` (damping on top of the weight decay, as our ``kfac``'s;
    fisher, fisher_samples, seed, batch_size, plain_layers).
    """

    name = "kronfluence:kfac"
    method = "kfac"
    strategy = "kfac"
