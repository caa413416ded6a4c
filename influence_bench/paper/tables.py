"""The reproduction's tables: the paper's findings side by side with ours under both protocols, each
with a verdict, plus the per-setting detail and the horizon decomposition (Markdown)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from influence_bench import metrics
from influence_bench.paper import numbers
from influence_bench.paper.study import HORIZON_SETTINGS
from influence_bench.reporting.schema import Case
from influence_bench.spec.catalog_iris_paper import PAPER_SUFFIX

EST = "exact"  # the paper's estimator on Iris
PAPER_PROTOCOL = "loo-topk"  # the paper removes the 40 of largest |influence| per test point
FAMILIES = ("paper", "converged")
REPRODUCED, NOT_REPRODUCED, REVERSED, UNDEFINED = "reproduced", "not reproduced", "reversed", "undefined"


class Index:
    """Cases by (setting, estimator, protocol, mode, metric)."""

    def __init__(self, cases: list[Case]):
        self.by = {(c.setting, c.estimator, c.protocol, c.mode, c.metric): c for c in cases}

    def get(self, setting: str, estimator: str = EST, protocol: str = PAPER_PROTOCOL, metric: str = "spearman",
            mode: str = "warm") -> Case | None:
        c = self.by.get((setting, estimator, protocol, mode, metric))
        return c if c is not None and c.status == "ok" else None


def iris_id(depth: int, width: int, wd: str, family: str) -> str:
    return f"iris-mlp-d{depth}-w{width}-wd{wd}" + (PAPER_SUFFIX if family == "paper" else "")


def _ok(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def fmt(c: Case | None, attr: str = "value") -> str:
    v = getattr(c, attr, None) if c is not None else None
    return f"{v:.2f}" if _ok(v) else "n/a"


def fmt_ci(c: Case | None) -> str:
    if c is None or not _ok(c.value):
        return "n/a"
    if _ok(c.ci_low) and _ok(c.ci_high):
        return f"{c.value:.2f} [{c.ci_low:.2f}, {c.ci_high:.2f}]"
    return f"{c.value:.2f}"


def direction(first: Case | None, second: Case | None, falls: bool = True) -> str:
    """Whether the score moves from ``first`` to ``second`` the way the paper says (``falls``: down),
    judged by the 95% CIs: reproduced when they do not overlap in that direction, reversed when they
    do not overlap the other way, not reproduced when they overlap; undefined without both."""
    if first is None or second is None or not all(_ok(v) for v in (first.ci_low, first.ci_high,
                                                                    second.ci_low, second.ci_high)):
        return UNDEFINED
    down = second.ci_high < first.ci_low
    up = second.ci_low > first.ci_high
    if (down and falls) or (up and not falls):
        return REPRODUCED
    if up or down:
        return REVERSED
    return NOT_REPRODUCED


@dataclass
class Row:
    finding: numbers.Finding
    ours: dict  # family -> text
    verdict: dict  # family -> verdict (with its reason)


def _sweep(idx: Index, family: str, shapes: list[tuple[int, int]]) -> tuple[str, list[Case | None]]:
    cs = [idx.get(iris_id(d, w, "1e-3", family)) for d, w in shapes]
    return " / ".join(fmt(c) for c in cs), cs


def depth_row(idx: Index) -> Row:
    ours, verdict = {}, {}
    for fam in FAMILIES:
        text, cs = _sweep(idx, fam, [(d, 16) for d in (1, 2, 3, 4, 6, 8)])
        ours[fam] = f"d1..d8: {text}"
        verdict[fam] = f"{direction(cs[0], cs[-1])} (d1 {fmt_ci(cs[0])} vs d8 {fmt_ci(cs[-1])})"
    return Row(numbers.finding("depth"), ours, verdict)


def width_row(idx: Index) -> Row:
    ours, verdict = {}, {}
    for fam in FAMILIES:
        text, cs = _sweep(idx, fam, [(2, w) for w in (8, 16, 32, 50)])
        ours[fam] = f"w8..w50: {text}"
        last = next((c for c in reversed(cs[1:]) if c is not None and _ok(c.value)), None)
        wlast = [8, 16, 32, 50][cs.index(last)] if last is not None else 50
        verdict[fam] = f"{direction(cs[0], last)} (w8 {fmt_ci(cs[0])} vs w{wlast} {fmt_ci(last)})"
    return Row(numbers.finding("width"), ours, verdict)


def weight_decay_row(idx: Index) -> Row:
    ours, verdict = {}, {}
    for fam in FAMILIES:
        on, off = idx.get(iris_id(2, 16, "1e-3", fam)), idx.get(iris_id(2, 16, "0", fam))
        ours[fam] = f"{fmt(on)} vs {fmt(off)}"
        if fam == "converged":  # no minimiser without decay on separable Iris: no leave-one-out optimum
            verdict[fam] = f"{UNDEFINED} (no minimiser without weight decay: leave-one-out has no optimum)"
        else:
            verdict[fam] = f"{direction(on, off)} ({fmt_ci(on)} vs {fmt_ci(off)})"
    return Row(numbers.finding("weight-decay"), ours, verdict)


def test_point_row(idx: Index, cases: list[Case]) -> Row:
    ours, verdict = {}, {}
    for fam in FAMILIES:
        pairs = [(c.at_highest_loss, c.at_median_loss) for c in cases
                 if c.status == "ok" and c.estimator == EST and c.protocol == PAPER_PROTOCOL and c.mode == "warm"
                 and c.metric == "spearman" and c.setting.startswith("iris-mlp") and "wd1e-3" in c.setting
                 and c.setting.endswith(PAPER_SUFFIX) == (fam == "paper")
                 and _ok(c.at_highest_loss) and _ok(c.at_median_loss)]
        if len(pairs) < 2:
            ours[fam], verdict[fam] = "n/a", UNDEFINED
            continue
        h, m = np.array(pairs).T
        agg = metrics.aggregate(h - m)
        ours[fam] = (f"highest {h.mean():.2f} vs median {m.mean():.2f} (mean of {len(h)} settings; highest > median "
                     f"on {int((h > m).sum())})")
        sig = f"difference {agg.mean:+.2f} [{agg.ci_low:+.2f}, {agg.ci_high:+.2f}]"
        v = REPRODUCED if agg.ci_low > 0 else REVERSED if agg.ci_high < 0 else NOT_REPRODUCED
        verdict[fam] = f"{v} ({sig})"
    return Row(numbers.finding("test-points"), ours, verdict)


def _paired(diffs: list[float], what: str) -> tuple[str, str]:
    """(text, verdict) of paired differences whose positive sign is the paper's finding."""
    if len(diffs) < 2:
        return "n/a", UNDEFINED
    agg = metrics.aggregate(np.asarray(diffs))
    v = REPRODUCED if agg.ci_low > 0 else REVERSED if agg.ci_high < 0 else NOT_REPRODUCED
    return what, f"{v} (difference {agg.mean:+.2f} [{agg.ci_low:+.2f}, {agg.ci_high:+.2f}] over {len(diffs)} settings)"


def _top_eigenvalue(c: Case | None) -> float | None:
    info = c.diagnostics.get("setting_info") if c is not None and isinstance(c.diagnostics, dict) else None
    top = (info or {}).get("hessian_eigenvalues", {}).get("top") if isinstance(info, dict) else None
    return float(top[0]) if isinstance(top, list) and top and _ok(top[0]) else None


def curvature_row(idx: Index) -> Row:
    """Deterministic numbers (no CI): reproduced when the top eigenvalue rises with depth (rank
    correlation with depth >= 0.8) and the deepest is at least twice the shallowest."""
    ours, verdict = {}, {}
    for fam in FAMILIES:
        depths = (1, 2, 3, 4, 6, 8)
        tops = [(d, _top_eigenvalue(idx.get(iris_id(d, 16, "1e-3", fam)) or idx.get(iris_id(d, 16, "1e-3", fam),
                                                                                     protocol="loo-fixed")))
                for d in depths]
        tops = [(d, t) for d, t in tops if t is not None]
        ours[fam] = " / ".join(f"d{d} {t:.3g}" for d, t in tops) if tops else "n/a"
        if len(tops) < 3:
            verdict[fam] = UNDEFINED
            continue
        rho = float(metrics.spearman(np.array([[d for d, _ in tops]], float), np.array([[t for _, t in tops]]))[0])
        ratio = tops[-1][1] / tops[0][1]
        v = REPRODUCED if rho >= 0.8 and ratio >= 2 else REVERSED if rho <= -0.8 else NOT_REPRODUCED
        verdict[fam] = f"{v} (rank correlation with depth {rho:.2f}, d{tops[-1][0]} / d{tops[0][0]} = {ratio:.1f}x)"
    return Row(numbers.finding("curvature"), ours, verdict)


def lissa_row(idx: Index) -> Row:
    ours, verdict = {}, {}
    for fam in FAMILIES:
        pairs = [(idx.get(iris_id(d, 16, "1e-3", fam)), idx.get(iris_id(d, 16, "1e-3", fam), "lissa"))
                 for d in (1, 2, 3, 4, 6, 8)]
        pairs = [(e.value, li.value) for e, li in pairs if e is not None and li is not None
                 and _ok(e.value) and _ok(li.value)]
        text = (f"exact {np.mean([e for e, _ in pairs]):.2f} vs lissa {np.mean([li for _, li in pairs]):.2f} "
                f"(mean over depths)") if pairs else "n/a"
        ours[fam], verdict[fam] = _paired([e - li for e, li in pairs], text)
    return Row(numbers.finding("lissa"), ours, verdict)


def mnist_cnn_row(idx: Index) -> Row:
    ours, verdict = {}, {}
    sid = "mnist5k-cnn-wd1e-3"
    for est in ("exact-ggn", "lissa"):
        p, s = idx.get(sid, est, "loo-fixed", "pearson"), idx.get(sid, est, "loo-fixed", "spearman")
        if s is not None:
            break
    ours["paper"] = f"{est}: {fmt(p, 'at_highest_loss')}/{fmt(s, 'at_highest_loss')}" if s else "n/a"
    if s is None or not _ok(s.at_highest_loss):
        verdict["paper"] = UNDEFINED
    else:
        gap = s.at_highest_loss - numbers.PAPER_MNIST_CNN["spearman"]
        v = REPRODUCED if abs(gap) <= 0.15 else f"{NOT_REPRODUCED} ({'lower' if gap < 0 else 'higher'})"
        verdict["paper"] = f"{v} (Spearman {gap:+.2f} from the paper's; one test point, no CI)"
    ours["converged"] = "n/a"
    verdict["converged"] = f"{UNDEFINED} (no converged leave-one-out for a CNN on CPU)"
    return Row(numbers.finding("mnist-cnn"), ours, verdict)


def side_by_side(cases: list[Case]) -> list[Row]:
    idx = Index(cases)
    return [depth_row(idx), width_row(idx), weight_decay_row(idx), test_point_row(idx, cases), curvature_row(idx),
            lissa_row(idx), mnist_cnn_row(idx)]


def side_by_side_markdown(rows: list[Row]) -> list[str]:
    out = ["| finding | paper | ours, paper protocol | verdict | ours, converged protocol | verdict |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        f = r.finding
        out.append(f"| {f.what} | {f.paper} {f.source} | {r.ours['paper']} | {r.verdict['paper']} | "
                   f"{r.ours['converged']} | {r.verdict['converged']} |")
    return out


def detail_markdown(cases: list[Case]) -> list[str]:
    """Per Iris setting and estimator: Spearman mean [95% CI] on each protocol, the noise ceiling,
    Pearson/Spearman at the highest- and median-loss test points, removals left out as unconverged."""
    idx = Index(cases)
    out = ["| setting | estimator | loo-topk Spearman | loo-fixed Spearman | ceiling | highest P/S | median P/S "
           "| unconverged |", "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(c.setting, c.estimator) for c in cases if c.mode == "warm" and c.setting.startswith("iris-")
                   and not re.search(r"-h[0-9]+$", c.setting)})  # the horizon study has its own table
    for sid, est in keys:
        top, fixed = idx.get(sid, est, "loo-topk"), idx.get(sid, est, "loo-fixed")
        ptop = idx.get(sid, est, "loo-topk", "pearson")
        main = top or fixed
        out.append(f"| {sid} | {est} | {fmt_ci(top)} | {fmt_ci(fixed)} | {fmt(main, 'noise_ceiling')} | "
                   f"{fmt(ptop, 'at_highest_loss')}/{fmt(top, 'at_highest_loss')} | "
                   f"{fmt(ptop, 'at_median_loss')}/{fmt(top, 'at_median_loss')} | "
                   f"{main.n_unconverged_excluded if main else 'n/a'} |")
    return out


def horizon_markdown(cases: list[Case], agreements: list) -> list[str]:
    """Per horizon-study setting: each target's agreement with the converged leave-one-out and each
    estimator's loo-fixed Spearman against it, then the gap split into terms (Bae et al. 2022)."""
    idx = Index(cases)
    out = []
    for base in sorted({a.setting for a in agreements}, key=lambda b: HORIZON_SETTINGS.index(b)
                       if b in HORIZON_SETTINGS else 99):
        ags = [a for a in agreements if a.setting == base]
        ests = sorted({c.estimator for c in cases if c.setting.startswith(base)},
                      key=lambda e: ("exact", "exact-ggn", "lissa").index(e) if e in ("exact", "exact-ggn", "lissa")
                      else 9)
        out += [f"**{base}** (loo-fixed, mean Spearman over test points [95% CI])", "",
                "| target | agreement with converged LOO | " + " | ".join(ests) + " | ceiling |",
                "|---|---|" + "---|" * len(ests) + "---|"]
        got = {}
        for a in ags:
            sid, mode = _target_setting(base, a)
            row = [idx.get(sid, e, "loo-fixed", mode=mode) for e in ests]
            got[a.target] = dict(zip(ests, row))
            agree = f"{a.spearman:.2f} [{a.ci_low:.2f}, {a.ci_high:.2f}]" if _ok(a.spearman) and _ok(a.ci_low) \
                else (f"{a.spearman:.2f}" if _ok(a.spearman) else "n/a")
            ceil = next((c.noise_ceiling for c in row if c is not None), None)
            out.append(f"| {a.target} | {agree} | " + " | ".join(fmt_ci(c) for c in row)
                       + (f" | {ceil:.2f} |" if _ok(ceil) else " | n/a |"))
        out += ["", *terms_markdown(got), ""]
    return out


def _target_setting(base: str, a) -> tuple[str, str]:
    if a.target.endswith(" ep"):
        return f"{base}-h{a.target.split()[0]}", "warm"
    return base, a.mode


def _v(got: dict, target: str, est: str) -> float | None:
    c = got.get(target, {}).get(est)
    return c.value if c is not None and _ok(c.value) else None


def terms_markdown(got: dict) -> list[str]:
    """The loss of fidelity split into terms, in Spearman units (a term is n/a when a number is missing)."""
    def d(a, b):
        return f"{a - b:+.2f}" if a is not None and b is not None else "n/a"

    conv, paper_h = _v(got, "converged", "exact"), _v(got, "100 ep", "exact")
    short = _v(got, "1 ep", "exact")
    ggn_pbrf, ggn_conv = _v(got, "PBRF", "exact-ggn"), _v(got, "converged", "exact-ggn")
    lissa_conv = _v(got, "converged", "lissa")
    return [
        "| term (Spearman of the estimator named) | size |", "|---|---|",
        f"| horizon: converged LOO minus the paper's 100 epochs (exact) | {d(conv, paper_h)} |",
        f"| horizon: converged LOO minus 1 epoch (exact) | {d(conv, short)} |",
        f"| proximity + non-convergence (Bregman): PBRF minus converged LOO (exact-ggn) | {d(ggn_pbrf, ggn_conv)} |",
        f"| linearisation: 1 minus exact-ggn against its PBRF | {d(1.0, ggn_pbrf)} |",
        f"| solver: exact minus lissa (converged LOO) | {d(conv, lissa_conv)} |",
    ]
