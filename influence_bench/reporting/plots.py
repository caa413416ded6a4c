"""The report's figures (matplotlib, Agg). Each function draws one PNG from report ``Point``s and
returns ``None``, or a short reason why the runs hold nothing to draw (then no file is kept)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from influence_bench.reporting.points import sort_key  # noqa: E402

# 20 distinct colours (tab20's dark shades first, then its light ones): the 13 built-in estimators
# and a few plug-ins never share a colour, as they did with the 10-colour default cycle.
_TAB20 = plt.get_cmap("tab20").colors
COLORS = [_TAB20[i] for i in range(0, 20, 2)] + [_TAB20[i] for i in range(1, 20, 2)]
CEILING = dict(color="0.35", linestyle="--", linewidth=1.2)


def _ceiling(pts) -> float | None:
    """The noise ceiling of one setting's cases (the lowest, where loo-topk estimators removed different
    points); None where none is measured."""
    vals = [p.noise_ceiling for p in pts if p.noise_ceiling is not None and math.isfinite(p.noise_ceiling)]
    return min(vals) if vals else None


def _ceilings(ax, marks) -> None:
    """Draw each setting's own noise ceiling. ``marks`` holds ``(x_low, x_high, ceiling)`` spans (a
    dashed segment) or ``(x, None, ceiling)`` points (a dash marker, for log axes where the settings
    scatter); one dashed line across the axes when every setting has the same ceiling."""
    marks = [m for m in marks if m[2] is not None]
    if not marks:
        return
    if len({round(m[2], 6) for m in marks}) == 1:
        ax.axhline(marks[0][2], **CEILING, label="noise ceiling")
        return
    label = "noise ceiling (per setting)"
    for lo, hi, c in marks:
        if hi is None:
            ax.plot([lo], [c], marker="_", markersize=10, markeredgewidth=1.2, color=CEILING["color"], zorder=1,
                    linestyle="none", label=label)
        else:
            ax.hlines(c, lo, hi, colors=CEILING["color"], linestyles="--", linewidth=CEILING["linewidth"], label=label)
        label = None


def _colors(points) -> dict[str, str]:
    return {e: COLORS[i % len(COLORS)] for i, e in enumerate(sorted({p.estimator for p in points}))}


def _protocols(points) -> list[str]:
    return sorted({p.protocol for p in points})


def _errbar(ax, xs, pts, **kw):
    ys = [p.value for p in pts]
    lo = [p.value - p.ci_low if p.ci_low is not None else 0 for p in pts]
    hi = [p.ci_high - p.value if p.ci_high is not None else 0 for p in pts]
    ax.errorbar(xs, ys, yerr=[lo, hi], capsize=3, marker="o", markersize=4, **kw)


def _figure_legend(fig, ax) -> None:
    """One legend for the whole figure, right of the axes (never over the data)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _group_label(shape: dict, axis: str) -> str:
    fixed = {"depth": ("width", "w"), "width": ("depth", "d")}[axis]
    return f"{shape['dataset']} {shape['family']} {fixed[1]}{shape[fixed[0]]} wd={shape['weight_decay']:g}"


def vs_shape(points, path: Path, axis: str):
    """Fidelity against MLP ``axis`` (depth or width), the other shape parameters fixed per line."""
    mlp = [p for p in points if p.shape and p.shape["family"] == "mlp" and p.value is not None]
    other = "width" if axis == "depth" else "depth"
    groups = defaultdict(list)  # (dataset, other, wd) -> points
    for p in mlp:
        groups[(p.shape["dataset"], p.shape[other], p.shape["weight_decay"])].append(p)
    groups = {k: v for k, v in groups.items() if len({p.shape[axis] for p in v}) >= 2}
    if not groups:
        return f"no MLP settings that differ only in {axis}"
    protos, colors = _protocols(mlp), _colors(mlp)
    fig, axes = plt.subplots(len(protos), 2, figsize=(10, 3.4 * len(protos)), squeeze=False)
    styles = ["-", ":", "-.", (0, (5, 1))]
    for r, proto in enumerate(protos):
        for c, metric in enumerate(("spearman", "pearson")):
            ax = axes[r][c]
            for g, (key, pts) in enumerate(sorted(groups.items())):
                pts = [p for p in pts if p.protocol == proto and p.metric == metric]
                label_g = f" ({_group_label(pts[0].shape, axis)})" if len(groups) > 1 and pts else ""
                for est in sorted({p.estimator for p in pts}):
                    ep = sorted((p for p in pts if p.estimator == est), key=lambda p: p.shape[axis])
                    _errbar(ax, [p.shape[axis] for p in ep], ep, color=colors[est],
                            linestyle=styles[g % len(styles)], label=est + label_g)
                xs = sorted({p.shape[axis] for p in pts})
                ceil = [_ceiling([p for p in pts if p.shape[axis] == x]) for x in xs]  # each setting's own
                if xs:
                    ax.plot(xs, [math.nan if c is None else c for c in ceil], **CEILING,
                            label="noise ceiling" if g == 0 else None)
            ax.set_xlabel(f"MLP {axis}" + (" (hidden layers)" if axis == "depth" else " (units per layer)"))
            ax.set_ylabel(f"mean {metric} (95% CI)")
            ax.set_title(f"{metric}, {proto}")
            if axis == "width":
                ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({p.shape[axis] for p in mlp}))
            ax.set_xticklabels([str(x) for x in sorted({p.shape[axis] for p in mlp})])
            ax.axhline(0, color="0.8", linewidth=0.8)
            ax.grid(alpha=0.3)
    only = f": {_group_label(next(iter(groups.values()))[0].shape, axis)}" if len(groups) == 1 else ""
    fig.suptitle(f"Fidelity vs {axis}{only} (leave-one-out ground truth)")
    fig.tight_layout()
    _figure_legend(fig, axes[0][0])
    _save(fig, path)
    return None


def weight_decay(points, path: Path):
    """Mean Spearman with wd > 0 (filled) against wd = 0 (hollow) for otherwise equal shapes."""
    sp = [p for p in points if p.shape and p.metric == "spearman" and p.value is not None]
    by_shape = defaultdict(list)
    for p in sp:
        s = p.shape
        by_shape[(s["dataset"], s["family"], s["depth"], s["width"])].append(p)
    pairs = {k: v for k, v in by_shape.items()
             if any(p.shape["weight_decay"] == 0 for p in v) and any(p.shape["weight_decay"] > 0 for p in v)}
    if not pairs:
        return "no pair of settings that differ only in weight decay (zero vs non-zero)"
    protos, colors = _protocols(sp), _colors(sp)
    ests = sorted(colors)
    fig, axes = plt.subplots(1, len(protos), figsize=(max(5.0, 1.2 + 1.8 * len(pairs)) * len(protos), 4), squeeze=False)
    for ax, proto in zip(axes[0], protos):
        labels = []
        for i, (key, pts) in enumerate(sorted(pairs.items())):
            labels.append(f"{key[0]}\n{key[1]}" + (f" d{key[2]} w{key[3]}" if key[1] == "mlp" else ""))
            for j, est in enumerate(ests):
                for on in (False, True):
                    ep = [p for p in pts if p.protocol == proto and p.estimator == est
                          and (p.shape["weight_decay"] > 0) == on]
                    if not ep:
                        continue
                    step = 0.8 / max(len(ests), 1)  # the estimators side by side within +-0.4 of the pair
                    x = i + (j - (len(ests) - 1) / 2) * step + (0.2 if on else -0.2) * step
                    _errbar(ax, [x], ep[:1], color=colors[est], linestyle="none",
                            markerfacecolor=colors[est] if on else "white",
                            label=est if i == 0 and on else None)
        marks = []
        for i, (key, pts) in enumerate(sorted(pairs.items())):
            for on in (False, True):
                setting_pts = [p for p in pts if p.protocol == proto and (p.shape["weight_decay"] > 0) == on]
                for s in sorted({p.setting for p in setting_pts}):
                    marks.append((i, i + 0.45, _ceiling([p for p in setting_pts if p.setting == s])) if on else
                                 (i - 0.45, i, _ceiling([p for p in setting_pts if p.setting == s])))
        _ceilings(ax, marks)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("mean spearman (95% CI)")
        ax.set_title(proto)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.grid(alpha=0.3)
    fig.suptitle("Weight decay on (filled, right of each pair) vs off (hollow, left)")
    fig.tight_layout()
    _figure_legend(fig, axes[0][0])
    _save(fig, path)
    return None


def _short(p) -> str:
    s = p.shape
    if not s:
        return p.setting
    shape = f"d{s['depth']}-w{s['width']}" if s["family"] == "mlp" else s["family"]
    return f"{s['dataset']}\n{shape}\nwd={s['weight_decay']:g}"


def _tags(points) -> dict[str, str]:
    """Compact setting labels naming only what varies across ``points`` (e.g. ``d3`` or ``logreg``)."""
    shapes = {p.setting: p.shape for p in points}
    if any(s is None for s in shapes.values()):
        return {k: k for k in shapes}
    vary = {f for f in ("dataset", "weight_decay") if len({s[f] for s in shapes.values()}) > 1}
    if len({s["width"] for s in shapes.values() if s["family"] == "mlp"}) > 1:
        vary.add("width")
    out = {}
    for k, s in shapes.items():
        parts = [s["dataset"]] if "dataset" in vary else []
        parts.append(f"d{s['depth']}" + (f"w{s['width']}" if "width" in vary else "") if s["family"] == "mlp"
                     else s["family"])
        if "weight_decay" in vary:
            parts.append(f"wd{s['weight_decay']:g}")
        out[k] = " ".join(parts)
    return out


def spread(points, path: Path):
    """Per-test-point Spearman for each setting and estimator: box plot with the points on top."""
    sp = [p for p in points if p.metric == "spearman" and any(v is not None for v in p.per_test)]
    if not sp:
        return "no per-test-point Spearman values"

    protos, colors = _protocols(sp), _colors(sp)
    settings = list(dict.fromkeys(p.setting for p in sorted(sp, key=sort_key)))
    ests = sorted(colors)
    width = 0.8 / len(ests)
    fig, axes = plt.subplots(len(protos), 1, figsize=(max(6.0, 1.3 * len(settings) * max(1, len(ests) / 2)),
                                                      3.6 * len(protos)), squeeze=False)
    for ax, proto in zip(axes[:, 0], protos):
        for j, est in enumerate(ests):
            data, pos = [], []
            for i, s in enumerate(settings):
                ep = [p for p in sp if p.protocol == proto and p.estimator == est and p.setting == s]
                if ep:
                    data.append([v for v in ep[0].per_test if v is not None])
                    pos.append(i + (j - (len(ests) - 1) / 2) * width)
            if not data:
                continue
            bp = ax.boxplot(data, positions=pos, widths=width * 0.8, patch_artist=True, showfliers=False)
            for box in bp["boxes"]:
                box.set(facecolor=colors[est], alpha=0.35, edgecolor=colors[est])
            for x, vals in zip(pos, data):
                jitter = [x + width * 0.25 * ((k * 0.618) % 1 - 0.5) for k in range(len(vals))]
                ax.scatter(jitter, vals, s=9, color=colors[est], zorder=3, label=est if x == pos[0] else None)
        _ceilings(ax, [(i - 0.45, i + 0.45, _ceiling([p for p in sp if p.protocol == proto and p.setting == s]))
                       for i, s in enumerate(settings)])
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels([_short(next(p for p in sp if p.setting == s)) for s in settings], fontsize=7)
        ax.set_ylabel("Spearman per test point")
        ax.set_title(f"Spread across test points ({proto})")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save(fig, path)
    return None


def curvature(points, path: Path):
    """Top Hessian eigenvalue per depth beside mean Spearman per depth, for each depth sweep
    (settings equal in dataset, width and weight decay) whose cases carry the eigenvalue."""
    mlp = [p for p in points if p.shape and p.shape["family"] == "mlp"]
    groups = defaultdict(dict)  # (dataset, width, wd) -> depth -> eigenvalue
    for p in mlp:
        if p.top_eigenvalue is not None:
            groups[(p.shape["dataset"], p.shape["width"], p.shape["weight_decay"])][p.shape["depth"]] = p.top_eigenvalue
    groups = {k: v for k, v in groups.items() if len(v) >= 2}
    if not groups:
        return "no depth sweep whose cases carry a top Hessian eigenvalue (diagnostics/setting_info 'curvature')"
    proto = _protocols(mlp)[0]
    sp = [p for p in mlp if p.metric == "spearman" and p.value is not None and p.protocol == proto]
    colors, styles = _colors(sp or mlp), ["-", ":", "-.", "--"]
    fig, (ax_f, ax_e) = plt.subplots(1, 2, figsize=(11, 3.8))
    for g, (key, eig) in enumerate(sorted(groups.items())):
        label = f"{key[0]} w{key[1]} wd={key[2]:g}" if len(groups) > 1 else ""
        gp = [p for p in sp if (p.shape["dataset"], p.shape["width"], p.shape["weight_decay"]) == key]
        for est in sorted({p.estimator for p in gp}):
            ep = sorted((p for p in gp if p.estimator == est), key=lambda p: p.shape["depth"])
            _errbar(ax_f, [p.shape["depth"] for p in ep], ep, color=colors[est], linestyle=styles[g % 4],
                    label=f"{est} {label}".strip())
        depths = sorted(eig)
        ax_e.plot(depths, [eig[d] for d in depths], marker="s", color="0.2", linestyle=styles[g % 4],
                  label=label or "top eigenvalue")
        ceil = [_ceiling([p for p in gp if p.shape["depth"] == d]) for d in depths]
        ax_f.plot(depths, [math.nan if c is None else c for c in ceil], **CEILING,
                  label="noise ceiling" if g == 0 else None)
    ax_f.set(xlabel="MLP depth", ylabel="mean spearman (95% CI)", title=f"Fidelity ({proto})")
    ax_e.set_yscale("log")
    ax_e.set(xlabel="MLP depth", ylabel="top Hessian eigenvalue (log)", title="Curvature at θ*")
    for ax in (ax_f, ax_e):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _save(fig, path)
    return None


def time_vs_fidelity(points, path: Path):
    """Estimator wall time (log) against mean Spearman, one colour per estimator."""
    sp = [p for p in points if p.metric == "spearman" and p.value is not None and p.wall_time_s]
    if not sp:
        return "no Spearman case with a wall time"
    protos, colors, tags = _protocols(sp), _colors(sp), _tags(sp)
    fig, axes = plt.subplots(1, len(protos), figsize=(6.5 * len(protos), 4.5), squeeze=False)
    for ax, proto in zip(axes[0], protos):
        pts = [p for p in sp if p.protocol == proto]
        for est in sorted(colors):
            ep = [p for p in pts if p.estimator == est]
            if ep:
                _errbar(ax, [p.wall_time_s for p in ep], ep, color=colors[est], linestyle="none", label=est)
            for p in ep:
                ax.annotate(tags[p.setting], (p.wall_time_s, p.value), fontsize=7,
                            xytext=(3, 3), textcoords="offset points", color=colors[est])
        _ceilings(ax, [(p.wall_time_s, None, _ceiling([p])) for p in pts])
        ax.set_xscale("log")
        ax.set(xlabel="estimator wall time per setting (s, log)", ylabel="mean spearman (95% CI)",
               title=f"Cost vs fidelity ({proto})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save(fig, path)
    return None
