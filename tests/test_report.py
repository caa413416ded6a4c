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
