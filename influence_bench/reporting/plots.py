"""The report's figures (matplotlib, Agg). Each function draws one PNG from report ``Point``s and
returns ``None``, or a short reason why the runs hold nothing to draw (then no file is kept).

Colours mean something: each estimator family has its own hue (``FAMILIES``: Hessian-based in
blues, K-FAC-style curvature approximations in magentas, gradient similarity in greens, representer /
TRAK in oranges, anything else in greys), the estimators of a family are shades of it and are told
apart by marker too. Every legend lists every estimator of the data, under its family. Figures over
many settings are a grid of panels, one per (setting, protocol), each with its setting's own noise
ceiling; at most ``MAX_PANELS`` panels (the figure says when settings were left out), and no PNG is
wider or taller than ``MAX_PX`` pixels."""

from __future__ import annotations

import colorsys
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from influence_bench.reporting.points import sort_key  # noqa: E402

CEILING = dict(color="0.35", linestyle="--", linewidth=1.2)
DPI = 110
MAX_PX = 3000  # no figure wider or taller than this
MAX_PANELS = 24  # faceted figures show at most this many panels
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<"]
FAMILIES = {  # family -> (hue, legend heading), in legend order; the "other" family is grey (no hue)
    "hessian": (0.60, "Hessian / inverse-HVP"),
    "kfac": (0.82, "K-FAC curvature approx."),
    "gradient": (0.36, "gradient similarity"),
    "representer-trak": (0.07, "representer / TRAK"),
    "other": (None, "other (plug-ins)"),
}
BUILTIN_FAMILY = {"exact": "hessian", "exact-ggn": "hessian", "cg": "hessian", "lissa": "hessian",
                  "arnoldi": "hessian", "last-layer": "hessian", "kfac": "kfac", "ekfac": "kfac",
                  "gradient-dot": "gradient", "gradient-cosine": "gradient", "tracin": "gradient",
                  "representer": "representer-trak", "trak": "representer-trak"}
TAG_FAMILY = ((frozenset({"curvature-approximation"}), "kfac"),  # a plug-in: the first of these its tags meet
              (frozenset({"hessian", "hvp", "second-order", "ggn"}), "hessian"),
              (frozenset({"gradient-only"}), "gradient"))


def family_of(estimator: str, tags=()) -> str:
    """The colour family of an estimator: a built-in's fixed one, else from its tags, else ``other``."""
    if estimator in BUILTIN_FAMILY:
        return BUILTIN_FAMILY[estimator]
    for tagset, family in TAG_FAMILY:
        if tagset & set(tags or ()):
            return family
    return "other"


def styles(points) -> dict[str, dict]:
    """``{estimator: {"color", "marker", "family"}}`` in legend order (family, then name): the family's hue
    from dark to light, and a different marker per estimator within a family."""
    tags: dict[str, set] = defaultdict(set)
    for p in points:
        tags[p.estimator].update(p.tags or ())
    by_family = defaultdict(list)
    for est in sorted(tags):
        by_family[family_of(est, tags[est])].append(est)
    out = {}
    for family, (hue, _) in FAMILIES.items():
        ests = by_family.get(family, [])
        for k, est in enumerate(ests):
            t = k / (len(ests) - 1) if len(ests) > 1 else 0.3  # 0: dark and saturated .. 1: light
            rgb = (0.25 + 0.45 * t,) * 3 if hue is None else colorsys.hsv_to_rgb(hue, 0.95 - 0.45 * t, 0.5 + 0.45 * t)
            out[est] = dict(color=(*rgb, 1.0), marker=MARKERS[k % len(MARKERS)], family=family)
    return out


def _kw(st: dict) -> dict:
    return dict(color=st["color"], marker=st["marker"])


def _legend(fig, style: dict, absent=(), extra=()) -> None:
    """One legend for the whole figure, right of the axes: every estimator of ``style`` under its family's
    heading (those in ``absent`` marked as not drawn in this figure), then ``extra`` (handle, label)s."""
    handles, labels, last = [], [], None
    for est, st in style.items():
        if st["family"] != last:
            handles.append(Line2D([], [], linestyle="none"))
            labels.append(FAMILIES[st["family"]][1] + ":")
            last = st["family"]
        handles.append(Line2D([], [], linestyle="-", markersize=5, **_kw(st)))
        labels.append(est + (" (no case here)" if est in absent else ""))
    for h, lab in extra:
        handles.append(h)
        labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)


CEILING_HANDLE = Line2D([], [], **CEILING)


def _ceiling(pts) -> float | None:
    """The noise ceiling of one setting's cases (the lowest, where loo-topk estimators removed different
    points); None where none is measured."""
    vals = [p.noise_ceiling for p in pts if p.noise_ceiling is not None and math.isfinite(p.noise_ceiling)]
    return min(vals) if vals else None


def _ceilings(ax, marks) -> None:
    """Draw each setting's own noise ceiling. ``marks`` holds ``(x_low, x_high, ceiling)`` spans (a
    dashed segment) or ``(x, None, ceiling)`` points (a dash marker at that x, e.g. above a point of that
    setting); one dashed line across the axes when every mark has the same ceiling."""
    marks = [m for m in marks if m[2] is not None]
    if not marks:
        return
    if len({round(m[2], 6) for m in marks}) == 1:
        ax.axhline(marks[0][2], **CEILING)
        return
    for lo, hi, c in marks:
        if hi is None:
            ax.plot([lo], [c], marker="_", markersize=10, markeredgewidth=1.5, color=CEILING["color"], zorder=1,
                    linestyle="none")
        else:
            ax.hlines(c, lo, hi, colors=CEILING["color"], linestyles="--", linewidth=CEILING["linewidth"])


def _protocols(points) -> list[str]:
    return sorted({p.protocol for p in points})


def _errbar(ax, xs, pts, **kw):
    ys = [p.value for p in pts]
    lo = [p.value - p.ci_low if p.ci_low is not None else 0 for p in pts]
    hi = [p.ci_high - p.value if p.ci_high is not None else 0 for p in pts]
    ax.errorbar(xs, ys, yerr=[lo, hi], capsize=3, markersize=4, **kw)


def _save(fig, path: Path) -> None:
    """Save at ``DPI``, lowered where the figure (plus room for an outside legend) would pass ``MAX_PX``."""
    w, h = fig.get_size_inches()
    fig.savefig(path, dpi=min(DPI, MAX_PX / (w + 3.0), MAX_PX / (h + 1.0)), bbox_inches="tight")
    plt.close(fig)


def _grid(n: int, ncols: int, panel_w: float, panel_h: float, sharey=False):
    """A figure of ``n`` panels wrapped into rows of ``ncols``; returns (figure, the n axes)."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols, panel_h * nrows + 0.6), squeeze=False,
                             sharey=sharey)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _panels(points, what: str) -> tuple[list[tuple], str]:
    """The (setting, protocol) panels of ``points`` in the report's order, at most ``MAX_PANELS``, and a
    note saying which were left out (empty when none)."""
    keys = list(dict.fromkeys((p.setting, p.protocol) for p in sorted(points, key=sort_key)))
    if len(keys) <= MAX_PANELS:
        return keys, ""
    return keys[:MAX_PANELS], (f" (first {MAX_PANELS} of {len(keys)} {what} in table order; "
                               "the fidelity table lists all)")


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
    protos, style = _protocols(mlp), styles(mlp)
    fig, axes = plt.subplots(len(protos), 2, figsize=(10, 3.4 * len(protos)), squeeze=False)
    lines = ["-", ":", "-.", (0, (5, 1))]
    for r, proto in enumerate(protos):
        for c, metric in enumerate(("spearman", "pearson")):
            ax = axes[r][c]
            for g, (key, pts) in enumerate(sorted(groups.items())):
                pts = [p for p in pts if p.protocol == proto and p.metric == metric]
                for est in sorted({p.estimator for p in pts}):
                    ep = sorted((p for p in pts if p.estimator == est), key=lambda p: p.shape[axis])
                    _errbar(ax, [p.shape[axis] for p in ep], ep, linestyle=lines[g % len(lines)], **_kw(style[est]))
                xs = sorted({p.shape[axis] for p in pts})
                ceil = [_ceiling([p for p in pts if p.shape[axis] == x]) for x in xs]  # each setting's own
                if xs:
                    ax.plot(xs, [math.nan if c is None else c for c in ceil], **CEILING)
            ax.set_xlabel(f"MLP {axis}" + (" (hidden layers)" if axis == "depth" else " (units per layer)"))
            ax.set_ylabel(f"mean {metric} (95% CI)")
            ax.set_title(f"{metric}, {proto}")
            if axis == "width":
                ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({p.shape[axis] for p in mlp}))
            ax.set_xticklabels([str(x) for x in sorted({p.shape[axis] for p in mlp})])
            ax.axhline(0, color="0.8", linewidth=0.8)
            ax.grid(alpha=0.3)
    shown = {p.estimator for pts in groups.values() for p in pts}
    extra = [(CEILING_HANDLE, "noise ceiling (per setting)")]
    if len(groups) > 1:
        extra += [(Line2D([], [], color="0.3", linestyle=lines[g % len(lines)]), _group_label(v[0].shape, axis))
                  for g, (k, v) in enumerate(sorted(groups.items()))]
    only = f": {_group_label(next(iter(groups.values()))[0].shape, axis)}" if len(groups) == 1 else ""
    fig.suptitle(f"Fidelity vs {axis}{only} (leave-one-out ground truth)")
    fig.tight_layout()
    _legend(fig, style, absent=set(style) - shown, extra=extra)
    _save(fig, path)
    return None


def _pair_key(shape: dict) -> tuple:
    return (shape["dataset"], shape["family"], shape["depth"], shape["width"], shape.get("n_train"))


def weight_decay(points, path: Path):
    """Mean Spearman per estimator for settings that differ only in weight decay: one panel per such
    group and protocol, each estimator's weight decays left to right (wd = 0 hollow, > 0 filled, joined
    by a line), each point with its own setting's noise ceiling."""
    sp = [p for p in points if p.shape and p.metric == "spearman" and p.value is not None]
    if not sp:
        return "no Spearman case of a setting with a known shape"
    by_shape = defaultdict(list)
    for p in sp:
        by_shape[_pair_key(p.shape)].append(p)
    pairs = {k: v for k, v in by_shape.items()
             if any(p.shape["weight_decay"] == 0 for p in v) and any(p.shape["weight_decay"] > 0 for p in v)}
    if not pairs:
        return "no pair of settings that differ only in weight decay (zero vs non-zero)"
    style = styles(sp)
    panels = [(key, proto) for key in sorted(pairs, key=lambda k: sort_key(pairs[k][0])) for proto in _protocols(sp)
              if any(p.protocol == proto for p in pairs[key])]
    note = ""
    if len(panels) > MAX_PANELS:
        panels, note = panels[:MAX_PANELS], f" (first {MAX_PANELS} of {len(panels)} panels)"
    n_est = max(len({p.estimator for p in pairs[k] if p.protocol == pr}) for k, pr in panels)
    fig, axes = _grid(len(panels), 3, max(3.2, 0.45 * n_est + 1.0), 3.6, sharey=True)
    shown = set()
    for ax, (key, proto) in zip(axes, panels):
        pts = [p for p in pairs[key] if p.protocol == proto]
        wds = sorted({p.shape["weight_decay"] for p in pts})
        ests = [e for e in style if any(p.estimator == e for p in pts)]
        offsets = [0.0] if len(wds) == 1 else [-0.25 + 0.5 * k / (len(wds) - 1) for k in range(len(wds))]
        marks = []
        for j, est in enumerate(ests):
            xs, ys = [], []
            for wd, dx in zip(wds, offsets):
                ep = [p for p in pts if p.estimator == est and p.shape["weight_decay"] == wd]
                for p in ep:  # one setting per (shape, wd) in a catalog; all of them otherwise
                    _errbar(ax, [j + dx], [p], linestyle="none", markerfacecolor="white" if wd == 0 else None,
                            **_kw(style[est]))
                    marks.append((j + dx, None, _ceiling([q for q in pts if q.setting == p.setting])))
                    xs.append(j + dx)
                    ys.append(p.value)
            ax.plot(xs, ys, color=style[est]["color"], linewidth=0.8, alpha=0.6)
            shown.add(est)
        _ceilings(ax, marks)
        ax.set_xticks(range(len(ests)))
        ax.set_xticklabels(ests, rotation=60, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(ests) - 0.4)
        n = f" n{key[4]}" if key[4] else ""
        shape = f" d{key[2]} w{key[3]}" if key[1] == "mlp" else ""
        ax.set_title(f"{key[0]}{n} {key[1]}{shape}, {proto}\nwd = {', '.join(f'{w:g}' for w in wds)} "
                     "(left to right)", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("mean spearman (95% CI)")
    fig.suptitle(f"Weight decay: off (hollow) vs on (filled), per estimator{note}")
    fig.tight_layout()
    _legend(fig, style, absent=set(style) - shown, extra=[(CEILING_HANDLE, "noise ceiling of the point's setting")])
    _save(fig, path)
    return None


def _panel_title(ax, setting: str, proto: str, ceiling: float | None) -> None:
    ceil = "unmeasured" if ceiling is None else f"{ceiling:.2f}"
    ax.set_title(f"{setting}\n{proto}, noise ceiling {ceil}", fontsize=8)


def spread(points, path: Path):
    """Per-test-point Spearman: one panel per (setting, protocol), a box plot with the points on top
    for each estimator, and that setting's noise ceiling."""
    sp = [p for p in points if p.metric == "spearman" and any(v is not None for v in p.per_test)]
    if not sp:
        return "no per-test-point Spearman values"
    style = styles(sp)
    panels, note = _panels(sp, "(setting, protocol) panels")
    n_est = max(len({p.estimator for p in sp if (p.setting, p.protocol) == k}) for k in panels)
    fig, axes = _grid(len(panels), 4, max(3.0, 0.32 * n_est + 1.0), 3.0, sharey=True)
    for ax, (setting, proto) in zip(axes, panels):
        pts = [p for p in sp if p.setting == setting and p.protocol == proto]
        ests = [e for e in style if any(p.estimator == e for p in pts)]
        for i, est in enumerate(ests):
            vals = [v for v in next(p for p in pts if p.estimator == est).per_test if v is not None]
            bp = ax.boxplot([vals], positions=[i], widths=0.6, patch_artist=True, showfliers=False,
                            medianprops=dict(color="0.15"))
            for box in bp["boxes"]:
                box.set(facecolor=style[est]["color"], alpha=0.35, edgecolor=style[est]["color"])
            jitter = [i + 0.3 * ((k * 0.618) % 1 - 0.5) for k in range(len(vals))]
            ax.scatter(jitter, vals, s=7, zorder=3, **_kw(style[est]))
        ceiling = _ceiling(pts)
        _ceilings(ax, [(-0.5, len(ests) - 0.5, ceiling)])
        ax.set_xticks(range(len(ests)))
        ax.set_xticklabels(ests, rotation=60, ha="right", fontsize=7)
        _panel_title(ax, setting, proto, ceiling)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[::4]:
        ax.set_ylabel("Spearman per test point")
    fig.suptitle(f"Spread across test points{note}")
    fig.tight_layout()
    _legend(fig, style, extra=[(CEILING_HANDLE, "noise ceiling (the panel's setting)")])
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
    style, lines = styles(sp or mlp), ["-", ":", "-.", "--"]
    fig, (ax_f, ax_e) = plt.subplots(1, 2, figsize=(11, 3.8))
    shown = set()
    for g, (key, eig) in enumerate(sorted(groups.items())):
        label = f"{key[0]} w{key[1]} wd={key[2]:g}" if len(groups) > 1 else ""
        gp = [p for p in sp if (p.shape["dataset"], p.shape["width"], p.shape["weight_decay"]) == key]
        for est in sorted({p.estimator for p in gp}):
            ep = sorted((p for p in gp if p.estimator == est), key=lambda p: p.shape["depth"])
            _errbar(ax_f, [p.shape["depth"] for p in ep], ep, linestyle=lines[g % 4], **_kw(style[est]))
            shown.add(est)
        depths = sorted(eig)
        ax_e.plot(depths, [eig[d] for d in depths], marker="s", color="0.2", linestyle=lines[g % 4],
                  label=label or "top eigenvalue")
        ceil = [_ceiling([p for p in gp if p.shape["depth"] == d]) for d in depths]
        ax_f.plot(depths, [math.nan if c is None else c for c in ceil], **CEILING)
    ax_f.set(xlabel="MLP depth", ylabel="mean spearman (95% CI)", title=f"Fidelity ({proto})")
    ax_e.set_yscale("log")
    ax_e.set(xlabel="MLP depth", ylabel="top Hessian eigenvalue (log)", title="Curvature at θ*")
    ax_e.legend(fontsize=8, loc="upper left")
    for ax in (ax_f, ax_e):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _legend(fig, style, absent=set(style) - shown, extra=[(CEILING_HANDLE, "noise ceiling (per setting)")])
    _save(fig, path)
    return None


def time_vs_fidelity(points, path: Path):
    """Estimator wall time (log) against mean Spearman: one panel per (setting, protocol), so that
    times are compared on the same data and each panel has its setting's own noise ceiling."""
    sp = [p for p in points if p.metric == "spearman" and p.value is not None and p.wall_time_s]
    if not sp:
        return "no Spearman case with a wall time"
    style = styles(sp)
    panels, note = _panels(sp, "(setting, protocol) panels")
    fig, axes = _grid(len(panels), 4, 3.4, 2.9, sharey=True)
    for ax, (setting, proto) in zip(axes, panels):
        pts = [p for p in sp if p.setting == setting and p.protocol == proto]
        for est in style:
            ep = [p for p in pts if p.estimator == est]
            if ep:
                _errbar(ax, [p.wall_time_s for p in ep], ep, linestyle="none", **_kw(style[est]))
        ceiling = _ceiling(pts)
        _ceilings(ax, [(None, None, ceiling)] if ceiling is not None else [])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # narrow ranges label minor ticks on top of each other
        _panel_title(ax, setting, proto, ceiling)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[::4]:
        ax.set_ylabel("mean spearman (95% CI)", fontsize=8)
    for ax in axes[-4:]:
        ax.set_xlabel("estimator wall time (s, log)", fontsize=8)
    fig.suptitle(f"Cost vs fidelity{note}")
    fig.tight_layout()
    _legend(fig, style, extra=[(CEILING_HANDLE, "noise ceiling (the panel's setting)")])
    _save(fig, path)
    return None
