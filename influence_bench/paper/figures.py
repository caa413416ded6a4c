"""The reproduction's figures (matplotlib, Agg): fidelity vs depth and vs width under both
protocols, the horizon decomposition, and the highest- vs median-loss test point."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from influence_bench.paper.tables import EST, FAMILIES, PAPER_PROTOCOL, Index, _ok, _target_setting, iris_id  # noqa: E402

STYLE = {"paper": dict(color="tab:red", marker="o", label="paper protocol (Adam, 100-epoch warm retraining)"),
         "converged": dict(color="tab:blue", marker="s", label="converged protocol (Newton to convergence)")}
EST_COLORS = {"exact": "tab:blue", "exact-ggn": "tab:green", "lissa": "tab:orange"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _errorbars(ax, xs, cs, **style):
    pts = [(x, c) for x, c in zip(xs, cs) if c is not None and _ok(c.value)]
    if not pts:
        return
    x = [p[0] for p in pts]
    y = [p[1].value for p in pts]
    lo = [p[1].value - p[1].ci_low if _ok(p[1].ci_low) else 0 for p in pts]
    hi = [p[1].ci_high - p[1].value if _ok(p[1].ci_high) else 0 for p in pts]
    ax.errorbar(x, y, yerr=[lo, hi], capsize=3, linewidth=1.5, **style)


def sweep(cases, out: Path, axis: str, paper: dict | None = None) -> Path:
    """Mean Spearman (95% CI) of ``exact`` on loo-topk against depth (width 16) or width (depth 2),
    weight decay 1e-3, one line per protocol family; the paper's numbers as black crosses."""
    idx = Index(cases)
    xs = (1, 2, 3, 4, 6, 8) if axis == "depth" else (8, 16, 32, 50)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for fam in FAMILIES:
        ids = [iris_id(x, 16, "1e-3", fam) if axis == "depth" else iris_id(2, x, "1e-3", fam) for x in xs]
        _errorbars(ax, xs, [idx.get(i) for i in ids], **STYLE[fam])
    if paper:
        ax.plot(list(paper), list(paper.values()), "kx", markersize=9, mew=2, label="paper (Basu et al.)")
    ax.set_xlabel(f"hidden {'layers' if axis == 'depth' else 'units per layer'}")
    ax.set_ylabel(f"{EST}: mean Spearman, top-40 removals")
    ax.set_xticks(xs)
    ax.set_ylim(-0.3, 1.05)
    ax.axhline(0, color="0.7", linewidth=0.8)
    ax.set_title(f"Iris MLP, fidelity vs {axis} (weight decay 1e-3)")
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, out / f"paper_{axis}.png")


def horizon(cases, agreements, out: Path) -> Path | None:
    """Per horizon-study setting: each estimator's Spearman against leave-one-out retrained for h
    epochs (log axis), with the converged leave-one-out and the PBRF as dashed / dotted levels, and the
    targets' own agreement with the converged leave-one-out (grey)."""
    bases = sorted({a.setting for a in agreements})
    if not bases:
        return None
    idx = Index(cases)
    fig, axes = plt.subplots(1, len(bases), figsize=(5.6 * len(bases), 4.0), dpi=110, squeeze=False)
    for ax, base in zip(axes[0], bases):
        ags = [a for a in agreements if a.setting == base]
        hs = [a for a in ags if a.target.endswith(" ep")]
        x = [int(a.target.split()[0]) for a in hs]
        ax.plot(x, [a.spearman for a in hs], color="0.5", marker=".", linestyle=":",
                label="target vs converged LOO (no estimator)")
        for est, color in EST_COLORS.items():
            cs = [idx.get(*_target_args(base, a, est)) for a in hs]
            _errorbars(ax, x, cs, color=color, marker="o", label=est)
            for a, ls in ((next((a for a in ags if a.target == "converged"), None), "--"),
                          (next((a for a in ags if a.target == "PBRF"), None), ":")):
                c = idx.get(*_target_args(base, a, est)) if a is not None else None
                if c is not None and _ok(c.value):
                    ax.axhline(c.value, color=color, linestyle=ls, linewidth=1)
        ax.plot([], [], color="k", linestyle="--", label="vs converged LOO")
        ax.plot([], [], color="k", linestyle=":", label="vs PBRF")
        ax.set_xscale("log")
        ax.set_xlabel("retraining horizon (epochs of Adam from theta*)")
        ax.set_ylabel("mean Spearman, loo-fixed")
        ax.set_ylim(-0.3, 1.05)
        ax.set_title(base, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, out / "paper_horizon.png")


def _target_args(base, a, est):
    sid, mode = _target_setting(base, a)
    return sid, est, "loo-fixed", "spearman", mode


def test_points(cases, out: Path) -> Path | None:
    """Spearman at the highest-loss test point against the median-loss one, one marker per Iris
    setting, coloured by protocol family (above the diagonal: the highest-loss point is better)."""
    fig, ax = plt.subplots(figsize=(5.0, 5.0), dpi=110)
    drawn = False
    for fam in FAMILIES:
        pts = [(c.at_median_loss, c.at_highest_loss) for c in cases
               if c.status == "ok" and c.estimator == EST and c.protocol == PAPER_PROTOCOL and c.mode == "warm"
               and c.metric == "spearman" and c.setting.startswith("iris-mlp")
               and c.setting.endswith("-paper") == (fam == "paper")
               and _ok(c.at_highest_loss) and _ok(c.at_median_loss)]
        if pts:
            ax.scatter(*zip(*pts), color=STYLE[fam]["color"], marker=STYLE[fam]["marker"], label=STYLE[fam]["label"],
                       alpha=0.8)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([-1, 1], [-1, 1], color="0.6", linewidth=0.8)
    ax.plot([0.38], [0.92], "kx", markersize=9, mew=2, label="paper (one model)")
    ax.set_xlim(-1, 1)
    ax.set_ylim(-1, 1)
    ax.set_xlabel("Spearman at the median-loss test point")
    ax.set_ylabel("Spearman at the highest-loss test point")
    ax.set_title(f"{EST}, top-40 removals, every Iris setting", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, out / "paper_test_points.png")
