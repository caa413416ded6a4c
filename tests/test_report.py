"""`influence-bench report`: Markdown + PNG figures from a committed run file and a synthetic one."""

from pathlib import Path

import numpy as np
import pytest

from influence_bench.cli.main import main
from influence_bench.reporting.report import shape_of, write_report
from influence_bench.reporting.schema import Case, Run, load_run

V1 = Path(__file__).parent / "data" / "run-v1-iris-smoke.json"
ALL = ["fidelity_vs_depth.png", "fidelity_vs_width.png", "weight_decay.png", "spread.png", "curvature.png",
       "time_vs_fidelity.png"]


def assert_real_png(path: Path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)  # decodes, raises on a broken file
    assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 400, img.shape
    assert float(img[..., :3].std()) > 0.01, f"{path.name} is blank"


def test_report_from_committed_run(tmp_path, capsys):
    assert main(["report", str(V1), "--out", str(tmp_path / "rep")]) == 0
    assert f"report written to {tmp_path / 'rep' / 'report.md'}" in capsys.readouterr().out
    page = (tmp_path / "rep" / "report.md").read_text()
    drawn = ["fidelity_vs_depth.png", "spread.png", "time_vs_fidelity.png"]
    for name in drawn:
        assert f"]({name})" in page
        assert_real_png(tmp_path / "rep" / name)
    assert sorted(p.name for p in (tmp_path / "rep").glob("*.png")) == sorted(drawn)
    assert "_Not drawn: no MLP settings that differ only in width._" in page
    assert "_Not drawn: no depth sweep whose cases carry a top Hessian eigenvalue" in page
    assert "| iris-mlp-d3-w16-wd1e-3 | exact | loo-fixed | 0.906 [0.877, 0.934] |" in page


def _synthetic_run() -> Run:
    rng = np.random.default_rng(0)
    cases = []
    shapes = [(d, 16, 1e-3) for d in (1, 2, 4)] + [(2, w, 1e-3) for w in (8, 32)] + [(2, 16, 0.0)]
    for depth, width, wd in shapes:
        sid = f"toy-mlp-d{depth}-w{width}-wd{wd:g}"
        info = {"dataset": "toy", "family": "mlp", "depth": depth, "width": width, "weight_decay": wd,
                "curvature": {"top_eigenvalue": 10.0 ** depth}}
        for est, base in (("a", 0.9), ("b", 0.5)):
            for metric in ("spearman", "pearson"):
                per = list(np.clip(base - 0.05 * depth + rng.normal(0, 0.1, 10), -1, 1))
                m = float(np.mean(per))
                cases.append(Case(est, sid, 1, "h", "loo-fixed", "warm", metric, value=m, ci_low=m - 0.05,
                                  ci_high=m + 0.05, n_test=10, per_test=per, noise_ceiling=0.95,
                                  wall_time_s=0.01 * depth * (10 if est == "a" else 1), setting_info=info))
    cases.append(Case("a", "unknown-setting", 1, "h", "loo-fixed", "warm", "spearman", value=0.3, ci_low=0.2,
                      ci_high=0.4, n_test=3, per_test=[0.2, 0.3, 0.4], wall_time_s=0.1))
    return Run(None, 2, "2026-01-01T00:00:00", "smoke", {"torch": "x", "cuda": None, "device_name": "cpu",
                                                         "cpu_count": 2}, {"sha": "abc", "dirty": True}, cases)


def test_every_figure_when_the_runs_hold_the_sweeps(tmp_path):
    page = write_report([_synthetic_run()], tmp_path).read_text()
    for name in ALL:
        assert f"]({name})" in page
        assert_real_png(tmp_path / name)
    assert "Not drawn" not in page
    assert "| unknown-setting | a | loo-fixed | 0.300 [0.200, 0.400] |" in page  # tabled, not shaped
    assert "abc (dirty)" in page


def test_shape_comes_from_case_then_catalog_else_none():
    run = _synthetic_run()
    assert shape_of(run.cases[0])["width"] == 16
    assert shape_of(run.cases[-1]) is None
    v1 = load_run(V1).cases
    d4 = next(c for c in v1 if c.setting == "iris-mlp-d4-w16-wd1e-3")
    assert shape_of(d4)["depth"] == 4  # v1 cases carry no setting_info: the catalog knows the id
    d3 = next(c for c in v1 if c.setting == "iris-mlp-d3-w16-wd1e-3")
    assert shape_of(d3) is None  # ... unless the setting's version moved on since (d3 is v2)


def test_report_refuses_a_broken_run_file(tmp_path, capsys):
    (tmp_path / "r.json").write_text('{"schema_version": 2, "cases": [')
    assert main(["report", str(tmp_path / "r.json"), "--out", str(tmp_path / "out")]) == 2
    assert "r.json: cannot be read as JSON" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _agg(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")


def _ceiling_ys(fig) -> set:
    """The heights of the dashed ceiling marks drawn in ``fig``: segments (hlines), dash markers, lines."""
    from matplotlib.collections import LineCollection

    from influence_bench.reporting.plots import CEILING

    ys = set()
    for ax in fig.axes:
        for col in ax.collections:
            if isinstance(col, LineCollection):
                ys |= {round(float(s[0][1]), 3) for s in col.get_segments() if s[0][1] == s[-1][1]}
        for line in ax.lines:
            y = np.asarray(line.get_ydata(), dtype=float)
            if line.get_color() == CEILING["color"] and y.size and np.all(y == y[0]):
                ys.add(round(float(y[0]), 3))
    return ys


def test_figures_draw_each_settings_own_ceiling(monkeypatch, tmp_path):
    from influence_bench.reporting import plots
    from influence_bench.reporting.points import Point

    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.__setitem__(Path(path).name, fig))
    cases = []
    for wd, ceiling in ((0.0, 0.9), (1e-3, 0.7)):  # a stochastic pair: its own ceiling each
        info = {"dataset": "toy", "family": "cnn", "depth": 2, "width": 16, "weight_decay": wd}
        for est in ("a", "b"):
            cases.append(Case(est, f"toy-cnn-wd{wd:g}", 1, "h", "loo-fixed", "warm", "spearman", value=0.5,
                              ci_low=0.4, ci_high=0.6, n_test=3, per_test=[0.4, 0.5, 0.6], noise_ceiling=ceiling,
                              noise_reliability=ceiling ** 2, wall_time_s=0.1, setting_info=info))
    points = [Point(c, c.setting_info) for c in cases]
    for name, fn in (("weight_decay.png", plots.weight_decay), ("spread.png", plots.spread),
                     ("time_vs_fidelity.png", plots.time_vs_fidelity)):
        assert fn(points, tmp_path / name) is None
        assert {0.9, 0.7} <= _ceiling_ys(drawn[name]), name  # not one line at the minimum, 0.7
    # settings that share a ceiling: one line across the axes
    same = [Point(c, c.setting_info) for c in cases if c.noise_ceiling == 0.9]
    plots.spread(same, tmp_path / "spread.png")
    assert _ceiling_ys(drawn["spread.png"]) == {0.9}


def _run(cases, created="2026-01-01T00:00:00") -> Run:
    return Run(None, 3, created, "smoke", {"torch": "x", "cuda": None, "device_name": "cpu", "cpu_count": 2},
               {"sha": "abc", "dirty": False}, cases)


def test_merging_runs_a_later_skip_or_error_never_replaces_an_earlier_score():
    from influence_bench.reporting.points import merge_cases

    def case(status, value=None, est="a"):
        return Case(est, "s", 1, "h", "loo-fixed", "warm", "spearman", status=status, value=value,
                    message="" if status == "ok" else f"{status} now")

    ok1, ok2 = case("ok", 0.5), case("ok", 0.7)
    for later in (case("skipped"), case("error")):
        assert merge_cases([_run([ok1]), _run([later])]) == [ok1]  # the score stays
        assert merge_cases([_run([later]), _run([ok1])]) == [ok1]  # a later score wins
    assert merge_cases([_run([ok1]), _run([ok2])]) == [ok2]  # a later score replaces an earlier one
    skip, err = case("skipped"), case("error")
    assert merge_cases([_run([skip]), _run([err])]) == [err]  # between non-scores: the latest word
    assert len(merge_cases([_run([ok1]), _run([case("skipped", est="b")])])) == 2


def _hue(rgba) -> float:
    import colorsys

    return colorsys.rgb_to_hsv(*rgba[:3])[0]


def test_estimators_of_one_family_share_a_colour_family_and_plugins_get_the_neutral_one():
    from influence_bench.reporting import plots
    from influence_bench.reporting.points import Point

    def pt(est, tags=()):
        return Point(Case(est, "s", 1, "h", "loo-fixed", "warm", "spearman", value=0.5, tags=list(tags)), None)

    names = ["exact", "cg", "lissa", "gradient-dot", "tracin", "kfac", "ekfac", "trak", "representer"]
    st = plots.styles([pt(n) for n in names] + [pt("my-hvp", ["hvp"]), pt("mystery", ["new-idea"])])
    fam = {e: s["family"] for e, s in st.items()}
    assert fam["exact"] == fam["cg"] == fam["lissa"] == fam["my-hvp"] == "hessian"  # a plug-in by its tags
    assert fam["gradient-dot"] == fam["tracin"] == "gradient" and fam["kfac"] == fam["ekfac"] == "kfac"
    assert fam["trak"] == fam["representer"] == "representer-trak" and fam["mystery"] == "other"
    hue = {e: _hue(s["color"]) for e, s in st.items()}
    by_family = {}
    for e, f in fam.items():
        by_family.setdefault(f, []).append(hue[e])
    del by_family["other"]  # greys have no hue to speak of
    for f, hs in by_family.items():
        assert max(hs) - min(hs) < 0.1, (f, hs)  # one family: one hue, different shades
        for g, gs in by_family.items():
            if g != f:
                assert min(abs(a - b) for a in hs for b in gs) > 0.15, (f, g)  # families: far apart
    assert len({s["color"] for s in st.values()}) == len(st)  # shades: no two estimators alike
    assert len({(s["color"], s["marker"]) for s in st.values()}) == len(st)
    r, g, b, _ = st["mystery"]["color"]
    assert max(r, g, b) - min(r, g, b) < 0.02  # grey


def _baseline_points():
    from influence_bench.reporting.points import FIDELITY, Point, merge_cases

    run = load_run(Path(__file__).parents[1] / "results" / "baseline.json")
    return [Point(c, shape_of(c)) for c in merge_cases([run]) if c.status == "ok" and c.metric in FIDELITY]


def test_weight_decay_labels_every_estimator_of_the_data(monkeypatch, tmp_path):
    """The baseline's weight-decay pairs are CNNs where 6 of the 13 estimators are skipped: the legend
    still lists all 13 (those 6 marked), and every estimator drawn is named on the x axis."""
    from influence_bench.reporting import plots

    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.__setitem__(Path(path).name, fig))
    points = _baseline_points()
    assert plots.weight_decay(points, tmp_path / "weight_decay.png") is None
    fig = drawn["weight_decay.png"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    ests = sorted({p.estimator for p in points if p.metric == "spearman"})
    assert len(ests) == 13
    for est in ests:
        assert est in legend or f"{est} (no case here)" in legend, est
    ticks = {t.get_text() for ax in fig.axes if ax.get_visible() for t in ax.get_xticklabels()}
    assert {e for e in ests if e in legend} <= ticks  # drawn ones are also labelled directly
    assert "exact (no case here)" in legend  # skipped on every CNN pair
    # the pairs are equal in everything but weight decay: cifar10-5k (no wd=0 twin) is not in the cifar10-2k pair
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "n2000" in titles and "n5000" not in titles


def test_baseline_figures_stay_a_sane_size(tmp_path):
    """spread.png was 13,956 x 780 px: every figure of the committed baseline stays within MAX_PX."""
    import matplotlib.image as mpimg

    from influence_bench.reporting import plots

    points = _baseline_points()
    for name, fn, kw in (("spread.png", plots.spread, {}), ("time_vs_fidelity.png", plots.time_vs_fidelity, {}),
                         ("weight_decay.png", plots.weight_decay, {}), ("depth.png", plots.vs_shape,
                                                                       {"axis": "depth"})):
        assert fn(points, tmp_path / name, **kw) is None
        h, w = mpimg.imread(tmp_path / name).shape[:2]
        assert w <= plots.MAX_PX and h <= plots.MAX_PX and w >= 800, (name, w, h)


def test_many_settings_are_capped_and_the_figure_says_so(monkeypatch, tmp_path):
    from influence_bench.reporting import plots
    from influence_bench.reporting.points import Point

    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.__setitem__(Path(path).name, fig))
    points = [Point(Case("a", f"s{i:02d}", 1, "h", "loo-fixed", "warm", "spearman", value=0.5, per_test=[0.4, 0.6],
                         wall_time_s=1.0), None) for i in range(plots.MAX_PANELS + 6)]
    assert plots.spread(points, tmp_path / "spread.png") is None
    fig = drawn["spread.png"]
    assert sum(ax.get_visible() for ax in fig.axes) == plots.MAX_PANELS
    assert f"first {plots.MAX_PANELS} of {plots.MAX_PANELS + 6}" in fig._suptitle.get_text()


def test_markdown_report_has_the_verdict_column(tmp_path):
    """Each row's verdict is the CLI judge's (thresholds.toml + measured floors), a broken score a FAIL."""
    import dataclasses

    from influence_bench.scoring.session import registered_tags
    from influence_bench.spec.thresholds import Thresholds, judge

    run = load_run(V1)
    broken = [dataclasses.replace(c, setting="iris-mlp-d3-w16-wd1e-3", value=-0.9, ci_low=-0.95, ci_high=-0.85,
                                  per_test=[-0.9] * len(c.per_test))
              for c in run.cases if (c.estimator, c.setting, c.protocol) == ("exact", "iris-mlp-d3-w16-wd1e-3",
                                                                             "loo-fixed")]
    assert broken
    late = _run(broken, created="2026-02-01T00:00:00")
    page = write_report([run, late], tmp_path).read_text()
    table = page.split("## Fidelity table")[1].split("\n## ")[0]
    assert "| device | verdict |" in table
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| iris")]
    assert rows and all(len(r) == 14 for r in rows)
    from influence_bench.reporting.points import merge_cases

    want, _ = judge(merge_cases([run, late]), Thresholds.load(), tags_of=registered_tags)
    got = {(r[0].strip(), r[1].strip(), r[2].strip()): r[-1].strip() for r in rows}
    assert got == want
    assert got[("iris-mlp-d3-w16-wd1e-3", "exact", "loo-fixed")] == "FAIL"  # the broken score
    assert "pass" in got.values()


def test_report_needs_out_or_html(tmp_path, capsys):
    assert main(["report", str(V1)]) == 2
    assert "give --out DIR (Markdown report), --html DIR (HTML page), or both" in capsys.readouterr().err
