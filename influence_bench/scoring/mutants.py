"""Mutation testing of the harness: broken estimators derived from ``exact``, which the floors must
reject (``influence-bench mutants``, ``suites/test_mutants.py``).

Each mutant is ``exact`` with one thing broken, under another name and with ``exact``'s tags, so it
makes the same claims (``second-order``) and meets the floors of what it claims to be, never the
floors of ``exact``'s name. They are registered nowhere: the fidelity suites never list them.

A mutant is **killed** when at least ``KILLS_NEEDED`` of its cases (one per setting and protocol)
FAIL; a case that is skipped (the budget refuses ``exact`` on the CNNs on CPU) or only hits a known
failure does not count. The six are examples of how an estimator breaks, not the list the floors
are tuned to: the floors come from what the built-ins measure (``thresholds.toml``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from influence_bench.api.context import Context
from influence_bench.api.estimator import Estimator
from influence_bench.api.loading import get_context
from influence_bench.api.registry import REGISTRY
from influence_bench.groundtruth.common import initial_theta
from influence_bench.reporting.schema import Case
from influence_bench.scoring.runner import evaluate_context
from influence_bench.spec.settings import Setting
from influence_bench.spec.thresholds import Thresholds, judge

KILLS_NEEDED = 2
PARENT = "exact"
SEED = 0


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def _random(est, ctx: Context, parent) -> torch.Tensor:
    return torch.randn(ctx.n_test, ctx.n_train, generator=_generator(), dtype=torch.float64)


def _permuted(est, ctx: Context, parent) -> torch.Tensor:
    return parent(est, ctx)[:, torch.randperm(ctx.n_train, generator=_generator())]


def _no_hessian(est, ctx: Context, parent) -> torch.Tensor:
    return ctx.test_grads() @ ctx.train_grads().T / ctx.n_train


def _sign_flipped(est, ctx: Context, parent) -> torch.Tensor:
    return -parent(est, ctx)


def _at_initialisation(est, ctx: Context, parent) -> torch.Tensor:
    return parent(est, dataclasses.replace(ctx, theta=initial_theta(ctx), _cache={}))


def _heavy_damping(est, ctx: Context, parent) -> torch.Tensor:
    if not ctx.is_cached("hessian"):  # the parent's own budget, before forming the Hessian
        ctx.check_hvp_budget(ctx.n_params, est.name, est.max_seconds, "the explicit Hessian")
    bound = float(ctx.hessian().abs().sum(1).max())  # Gershgorin: >= the top |eigenvalue|, no eigensolver
    return parent(dataclasses.replace(est, damping=1e3 * bound), ctx)


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    transform: Callable  # (estimator, ctx, parent influence) -> [n_test, n_train]


MUTATIONS = (
    Mutation("random", "random scores (seeded normal draws)", _random),
    Mutation("permuted", "exact's influence with its training columns permuted", _permuted),
    Mutation("no-hessian", "the Hessian dropped: gradient-dot under exact's claims", _no_hessian),
    Mutation("sign-flipped", "exact's influence with the sign flipped", _sign_flipped),
    Mutation("at-init", "exact at the parameters of initialisation, not theta*", _at_initialisation),
    Mutation("heavy-damping", "exact damped by 1000x its top eigenvalue: curvature washed out",
             _heavy_damping),
)


def names() -> list[str]:
    return [m.name for m in MUTATIONS]


def create(name: str) -> Estimator:
    """The mutant ``name`` (``mutant-<name>``), a subclass of the registered ``exact``."""
    by_name = {m.name: m for m in MUTATIONS}
    if name not in by_name:
        raise KeyError(f"unknown mutant {name!r}; known: {', '.join(by_name)}")
    m = by_name[name]
    parent = REGISTRY.get(PARENT)

    def influence(self, ctx):
        return m.transform(self, ctx, parent.influence)

    cls = type(f"Mutant_{name.replace('-', '_')}", (parent,),
               {"name": f"mutant-{name}", "influence": influence, "__doc__": f"mutant of {PARENT}: {m.what}"})
    return cls()


@dataclass
class Outcome:
    mutant: str
    what: str
    cases: list[Case]
    verdicts: dict

    @property
    def run(self) -> int:
        return sum(v not in ("skipped", "error") for v in self.verdicts.values())

    @property
    def failed(self) -> list[tuple]:
        return sorted(k for k, v in self.verdicts.items() if v == "FAIL")

    @property
    def killed(self) -> bool:
        return len(self.failed) >= KILLS_NEEDED


def run_mutants(names_: list[str], settings: list[Setting], device: str = "cpu",
                thresholds: Thresholds | None = None, progress=None,
                contexts: dict[str, Context] | None = None) -> list[Outcome]:
    """Score each mutant on ``settings`` and judge it as any estimator is judged. The mutants of
    one setting share one context, so exact's Hessian and gradients are formed once per setting.
    ``contexts`` (setting id -> context) carries those shared contexts from one call to the next:
    a caller that runs the mutants one call at a time (a test per mutant) still forms them once."""
    thresholds = thresholds or Thresholds.load()
    contexts = {} if contexts is None else contexts
    ests = [create(n) for n in names_]
    cases: dict[str, list[Case]] = {e.name: [] for e in ests}
    for s in settings:
        if s.id not in contexts:
            contexts[s.id] = get_context(s, device).fresh()
        shared = contexts[s.id]
        for e in ests:
            cases[e.name] += evaluate_context(e, shared, fresh=False)
            if progress:
                progress(f"{e.name} on {s.id}: {cases[e.name][-1].status}")
    what = {f"mutant-{m.name}": m.what for m in MUTATIONS}
    return [Outcome(e.name, what[e.name], cases[e.name], judge(cases[e.name], thresholds)[0]) for e in ests]


def table(outcomes: list[Outcome]) -> str:
    """mutant | cases run | cases failed | killed, and which cases killed it (fits 100 columns)."""
    lines = [f"{'mutant':<22} {'run':>4} {'failed':>6}  killed  (by at least {KILLS_NEEDED} failing cases)"]
    for o in outcomes:
        lines.append(f"{o.mutant:<22} {o.run:>4} {len(o.failed):>6}  {'yes' if o.killed else 'NO':<6}  {o.what}"[:100])
    killed = sum(o.killed for o in outcomes)
    lines.append(f"mutation score: {killed}/{len(outcomes)} mutants killed")
    return "\n".join(lines)
