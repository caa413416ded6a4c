"""``influence-bench report``: a Markdown page with tables and PNG figures from run files.

Figures (each drawn only when the runs hold the cases it needs; the page says which were left out):

* ``fidelity_vs_depth.png`` — mean Spearman/Pearson per MLP depth, one line per estimator;
* ``fidelity_vs_width.png`` — the same against width, where a width sweep exists;
* ``weight_decay.png`` — weight decay on (wd > 0) vs off (wd = 0) for otherwise equal settings;
* ``spread.png`` — per-test-point Spearman (box + points) per setting and estimator;
* ``curvature.png`` — top Hessian eigenvalue vs depth beside fidelity (when cases carry it);
* ``time_vs_fidelity.png`` — estimator wall time against mean Spearman.

Verdicts (pass / FAIL / xfail / error / skipped) come from the same judge as ``influence-bench score``
(``thresholds.toml``, ``judged``). ``influence_bench.reporting.html`` writes the same content as one
static HTML page. Scores are drawn with their 95% CIs as error bars, and each setting's own noise
ceiling as a dashed line. The shape
of a setting (depth, width, weight decay) comes from the case's ``setting_info`` (run files v2), else
from the catalog when the setting id and version still match, else the setting is left out of the
shape figures (it still appears in the tables, the spread and the time figures).
"""

from __future__ import annotations

import math
from pathlib import Path

from influence_bench.reporting import methods
from influence_bench.reporting.points import FIDELITY, Point, merge_cases, shape_of, sort_key  # noqa: F401
from influence_bench.reporting.schema import Run


def _fmt(v, spec=".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def fidelity_table(points: list[Point], verdicts: dict | None = None) -> list[str]:
    """One row per (setting, estimator, protocol), with its verdict (``judged``) where given."""
    verdicts = verdicts or {}
    rows: dict[tuple, dict[str, Point]] = {}
    for p in sorted(points, key=sort_key):
        rows.setdefault((p.setting, p.estimator, p.protocol), {})[p.metric] = p
    lines = ["| setting | estimator | protocol | Spearman [95% CI] | min | Pearson [95% CI] | top-k overlap [95% CI] | "
             "n | ceiling (reliability) | Spearman / ceiling | time s | peak MiB | device | verdict |",
             "|" + "---|" * 14]
    for (setting, est, proto), ms in rows.items():
        p0 = next(iter(ms.values()))
        verdict = verdicts.get((setting, est, proto), "")
        note = p0.setting_info.get("lossy") if isinstance(p0.setting_info, dict) else None
        setting = f"{setting} (lossy: {note})" if note else setting
        if p0.status != "ok":
            first = p0.message.splitlines()[0][:80] if p0.message else ""
            lines.append(f"| {setting} | {est} | {proto} | {p0.status}: {first} |" + "  |" * 9 + f" {verdict} |")
            continue

        def cell(m):
            p = ms.get(m)
            if p is None or p.value is None:
                return "n/a"
            if p.ci_low is None or p.ci_high is None or not (math.isfinite(p.ci_low) and math.isfinite(p.ci_high)):
                return f"{p.value:.3f} (no CI)"
            return f"{p.value:.3f} [{_fmt(p.ci_low)}, {_fmt(p.ci_high)}]"

        def ceiling():
            c, r = p0.noise_ceiling, p0.noise_reliability
            if c is None or not math.isfinite(c):
                return "unmeasured"
            return f"{c:.2f} ({r:.2f})" if r is not None and math.isfinite(r) else f"{c:.2f}"

        sp = ms.get("spearman")
        frac = _fmt(sp.value / p0.noise_ceiling if sp and sp.value is not None and p0.noise_ceiling else None, ".2f")
        lines.append(f"| {setting} | {est} | {proto} | {cell('spearman')} | {_fmt(sp.min if sp else None)} | "
                     f"{cell('pearson')} | {cell('topk-overlap')} | {p0.n_test} | {ceiling()} | {frac} | "
                     f"{_fmt(p0.wall_time_s, '.2f')} | {_fmt(p0.peak_memory_mb, '.0f')} | {p0.device} | {verdict} |")
    return lines


def test_point_table(points: list[Point]) -> list[str]:
    """The paper's Table 1 view: Pearson / Spearman at the highest-loss and at the median-loss test
    point alone, per (setting, estimator, protocol)."""
    rows: dict[tuple, dict[str, Point]] = {}
    for p in sorted(points, key=sort_key):
        if p.status == "ok" and p.metric in FIDELITY:
            rows.setdefault((p.setting, p.estimator, p.protocol), {})[p.metric] = p
    lines = ["| setting | estimator | protocol | highest-loss Pearson / Spearman | median-loss Pearson / Spearman |",
             "|" + "---|" * 5]
    for (setting, est, proto), ms in rows.items():
        def pair(attr):
            return " / ".join(_fmt(getattr(ms.get(m), attr, None) if m in ms else None, ".2f")
                              for m in ("pearson", "spearman"))
        lines.append(f"| {setting} | {est} | {proto} | {pair('at_highest_loss')} | {pair('at_median_loss')} |")
    return lines


def run_table(runs: list[Run]) -> list[str]:
    lines = ["| run file | created | tier | commit | torch | CUDA | device | CPUs | cases |", "|" + "---|" * 9]
    for r in runs:
        sha = r.commit.get("sha")
        commit = (sha[:10] if sha else "unknown") + (" (dirty)" if r.commit.get("dirty") else "")
        lines.append(f"| {r.path.name if r.path else '-'} | {r.created[:19]} | {r.tier or '-'} | {commit} | "
                     f"{r.machine.get('torch')} | {r.machine.get('cuda') or '-'} | {r.machine.get('device_name')} | "
                     f"{r.machine.get('cpu_count')} | {len(r.cases)} |")
    return lines


def judged(cases) -> tuple[dict, dict]:
    """(verdict per (setting, estimator, protocol), its reason) of ``cases``, by the judge the CLI uses
    (``ScoringSession.judge``): the packaged thresholds, tags from the cases else the registry. The reason
    is the failure (or known-failure) lines of a FAIL / xfail, the message of an error / skip."""
    from influence_bench.api.registry import registered_tags
    from influence_bench.spec.thresholds import Thresholds, judge

    known: list[str] = []
    verdicts, failures = judge(cases, Thresholds.load(), known, tags_of=registered_tags)
    reasons = {}
    for c in cases:
        key = (c.setting, c.estimator, c.protocol)
        if c.status != "ok":
            reasons[key] = c.message
        else:
            head = f"{c.estimator} on {c.setting} ({c.protocol}):"
            reasons[key] = "\n".join(line for line in failures + known if line.startswith(head))
    return verdicts, reasons


FIGURES = [("Fidelity vs depth", "fidelity_vs_depth.png", "vs_shape", dict(axis="depth")),
           ("Fidelity vs width", "fidelity_vs_width.png", "vs_shape", dict(axis="width")),
           ("Weight decay on vs off", "weight_decay.png", "weight_decay", {}),
           ("Spread across test points", "spread.png", "spread", {}),
           ("Curvature: top Hessian eigenvalue vs depth", "curvature.png", "curvature", {}),
           ("Cost vs fidelity", "time_vs_fidelity.png", "time_vs_fidelity", {})]

SCORES_NOTE = ("Scores: mean over test points with a Student t 95% CI. The noise ceiling is the correlation an "
               "estimator can at best reach against noisy ground truth, sqrt of the replicates' split-half "
               "reliability (1 for deterministic ground truth); each figure draws each setting's own ceiling. "
               "Top-k overlap: the share of the k removals predicted to raise the test loss most that are among "
               "the k that actually did (k = min(10, m // 4)). Colours: one colour family per estimator family "
               "(Hessian-based blues, K-FAC magentas, gradient similarity greens, representer / TRAK oranges, "
               "plug-ins greys). Verdicts: the thresholds `influence-bench score` judges by. Definitions: "
               "docs/protocol.md.")


def draw_figures(points: list[Point], out: Path) -> list[tuple[str, str, str | None]]:
    """Draw every figure into ``out``: ``(title, file name, why it was not drawn or None)`` each."""
    from influence_bench.reporting import plots

    ok = [p for p in points if p.status == "ok" and p.metric in FIDELITY]
    drawn = []
    for title, name, fn, kw in FIGURES:
        why = getattr(plots, fn)(ok, out / name, **kw)
        if why:
            (out / name).unlink(missing_ok=True)
        drawn.append((title, name, why))
    return drawn


def write_report(runs: list[Run], out: Path) -> Path:
    """Write ``out/report.md`` and its PNGs; returns the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = merge_cases(runs)
    points = [Point(c, shape_of(c)) for c in cases]
    verdicts, _ = judged(cases)
    md = ["# influence-bench report", "", SCORES_NOTE.replace("(1 for", "(shown in brackets; 1 for"), "",
          "## Runs", "", *run_table(runs), ""]
    for title, name, why in draw_figures(points, out):
        md += [f"## {title}", ""]
        md += [f"_Not drawn: {why}._", ""] if why else [f"![{title}]({name})", ""]
    md += ["## Fidelity table", "", *fidelity_table(points, verdicts), ""]
    md += ["## By method: implementations side by side", "",
           "Each method implemented by more than one estimator in these runs (ours and the peer libraries' "
           "adapters), fastest first on each setting and protocol.", "", *methods.markdown(cases, verdicts), ""]
    md += ["## Highest- vs median-loss test point", "",
           "The paper's Table 1 view: each score at the highest-loss and at the median-loss test point alone "
           "(n/a: undefined there, or a run file written before these were recorded).", "",
           *test_point_table(points), ""]
    page = out / "report.md"
    page.write_text("\n".join(md))
    return page
