"""The paper's protocol (``-paper`` settings), the retraining horizon as an axis, the test-point split
and ``influence-bench paper``'s verdicts."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from influence_bench.paper import study, tables
from influence_bench.reporting.schema import Case
from influence_bench.spec import catalog
from influence_bench.spec.catalog_iris_paper import DEPTHS, WIDTHS, with_horizon


def test_paper_family_covers_the_sweeps_with_the_papers_recipe():
    for wd in ("1e-3", "0"):
        for d, w in [(d, 16) for d in DEPTHS] + [(2, w) for w in WIDTHS]:
            s = catalog.get_setting(f"iris-mlp-d{d}-w{w}-wd{wd}-paper")
            conv = catalog.get_setting(f"iris-mlp-d{d}-w{w}-wd{wd}")
            assert s.train.optimizer == "adam" and s.train.batch_size == 30 and s.train.epochs == 1000
            gt = s.ground_truth
            assert (gt.mode, gt.retrain, gt.steps, gt.replicates) == ("warm", "adam", 400, 3)
            assert s.protocol.topk == 40 and "loo-topk" in s.protocol.default
            assert s.training_hash != conv.training_hash  # its own theta*
            assert s.tier == "standard"


def test_horizon_settings_share_theta_star_and_change_only_the_question():
    base = catalog.get_setting("iris-mlp-d4-w16-wd1e-3")
    h = catalog.get_setting("iris-mlp-d4-w16-wd1e-3-h30")
    assert h == with_horizon(base, 30)
    assert h.training_hash == base.training_hash and h.spec_hash != base.spec_hash
    assert (h.ground_truth.retrain, h.ground_truth.steps) == ("adam", 120)
    assert [s.id for s in catalog.select(["iris-mlp-d4-w16-wd1e-3-h30"])] == [h.id]
    for bad in ("iris-mlp-d4-w16-wd1e-3-h0", "iris-mlp-d4-w16-wd1e-3-paper-h3", "mnist5k-cnn-wd1e-3-h3"):
        with pytest.raises(catalog.UnknownSetting):
            catalog.get_setting(bad)
    with pytest.raises(ValueError, match="horizon needs at least 1 epoch"):
        with_horizon(base, 0)


def test_horizon_ground_truth_converges_to_leave_one_out_on_a_convex_model():
    """On logistic regression a long enough Adam horizon reaches the leave-one-out optimum, and the
    estimator's score follows the question: exact is poor against 1 epoch, near perfect at convergence."""
    cases, ags = study.horizon("iris-logreg-wd1e-3", horizons=(1, 1000), estimators=(("exact", {}),))
    agree = {a.target: a.spearman for a in ags}
    assert agree["converged"] == pytest.approx(1.0)
    assert agree["1 ep"] < 0.7 < 0.95 < agree["1000 ep"]  # measured 0.57 and 0.97
    score = {(c.setting, c.mode): c.value for c in cases if c.metric == "spearman"}
    assert score[("iris-logreg-wd1e-3-h1", "warm")] < 0.7
    assert score[("iris-logreg-wd1e-3", "warm")] > 0.99 and score[("iris-logreg-wd1e-3", "pbrf")] > 0.99
    assert all(c.noise_ceiling > 0.9 for c in cases)  # 3 replicates of Adam agree


def test_cases_keep_the_highest_and_median_loss_test_points_apart():
    from influence_bench.scoring.runner import evaluate

    cases = evaluate("exact", catalog.get_setting("iris-logreg-wd1e-3"), protocols=("loo-fixed",))
    for c in cases:
        assert c.at_highest_loss == pytest.approx(c.per_test[0]) and c.at_median_loss == pytest.approx(c.per_test[1])
        assert c.test_idx[:2] == [c.diagnostics["setting_info"]["test_points"]["highest_loss"],
                                  c.diagnostics["setting_info"]["test_points"]["median_loss"]]
        assert Case(**{k: v for k, v in c.to_json().items()}).at_median_loss == c.at_median_loss


def _case(setting, value, half=0.05, estimator="exact", protocol="loo-topk", metric="spearman", mode="warm",
          highest=None, median=None):
    return Case(estimator=estimator, setting=setting, setting_version=1, spec_hash="x", protocol=protocol,
                mode=mode, metric=metric, value=value, ci_low=value - half, ci_high=value + half, n_test=10,
                per_test=[highest, median], at_highest_loss=highest, at_median_loss=median)


def test_direction_verdicts():
    a, b = _case("s", 0.9), _case("s", 0.5)
    assert tables.direction(a, b) == tables.REPRODUCED
    assert tables.direction(b, a) == tables.REVERSED
    assert tables.direction(a, _case("s", 0.88)) == tables.NOT_REPRODUCED
    assert tables.direction(a, None) == tables.UNDEFINED


@given(st.floats(-1, 1), st.floats(-1, 1), st.floats(0.001, 0.5), st.floats(0.001, 0.5))
def test_direction_is_antisymmetric(x, y, hx, hy):
    a, b = _case("a", x, hx), _case("b", y, hy)
    flip = {tables.REPRODUCED: tables.REVERSED, tables.REVERSED: tables.REPRODUCED,
            tables.NOT_REPRODUCED: tables.NOT_REPRODUCED}
    assert tables.direction(b, a) == flip[tables.direction(a, b)]
    assert tables.direction(a, b, falls=False) == flip[tables.direction(a, b)]


def _family(values_by_depth, fam, wd="1e-3"):
    return [_case(tables.iris_id(d, 16, wd, fam), v, highest=v + 0.2, median=v - 0.2)
            for d, v in values_by_depth.items()]


def test_side_by_side_tells_reproduced_from_reversed():
    """The failure path: a sweep that rises with depth must read `reversed`, never `reproduced`."""
    falling = _family({1: 0.9, 2: 0.8, 4: 0.6, 8: 0.3}, "paper") + _family({1: 0.9, 8: 0.88}, "converged")
    rows = {r.finding.key: r for r in tables.side_by_side(falling)}
    assert rows["depth"].verdict["paper"].startswith(tables.REPRODUCED)
    assert rows["depth"].verdict["converged"].startswith(tables.NOT_REPRODUCED)
    assert rows["test-points"].verdict["paper"].startswith(tables.REPRODUCED)
    rising = _family({1: 0.3, 8: 0.9}, "paper")
    rows = {r.finding.key: r for r in tables.side_by_side(rising)}
    assert rows["depth"].verdict["paper"].startswith(tables.REVERSED)
    assert rows["width"].verdict["paper"].startswith(tables.UNDEFINED)  # nothing measured is never a verdict
    assert rows["weight-decay"].verdict["converged"].startswith(tables.UNDEFINED)


def test_test_point_table_fits_and_shows_both_points():
    from influence_bench.reporting.table import test_point_table

    cases = [_case("iris-mlp-d8-w16-wd1e-3-paper", 0.3, highest=0.81, median=-0.12),
             _case("iris-mlp-d8-w16-wd1e-3-paper", 0.2, metric="pearson", highest=0.7, median=0.1)]
    text = test_point_table(cases)
    assert "0.70 / 0.81" in text and "0.10 / -0.12" in text and "-0.12 .. 0.81" in text
    assert max(len(line) for line in text.splitlines()) <= 100


@pytest.fixture(scope="module")
def paper_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    cmd = [sys.executable, "-m", "influence_bench.cli", "paper", "--out", str(out), "--parts", "iris,horizon",
           "--depths", "1", "--widths", "", "--weight-decays", "1e-3", "--estimators", "exact",
           "--horizons", "1", "--horizon-settings", "iris-mlp-d1-w16-wd1e-3", "--horizon-estimators", "exact"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_paper_command_end_to_end(paper_out):
    out, proc = paper_out
    assert "Iris depth sweep" in proc.stdout and "paper protocol" in proc.stdout
    md = (out / "paper.md").read_text()
    assert "| finding | paper |" in md and "iris-mlp-d1-w16-wd1e-3-paper" in md and "## The retraining horizon" in md
    verdicts = json.loads((out / "paper-verdicts.json").read_text())
    assert {v["finding"] for v in verdicts} == {"depth", "width", "weight-decay", "test-points", "curvature", "lissa",
                                                "mnist-cnn"}
    from PIL import Image

    for name in ("paper_depth.png", "paper_width.png", "paper_horizon.png", "paper_test_points.png"):
        img = np.asarray(Image.open(out / name).convert("L"))
        assert img.std() > 5, f"{name} is blank"
        assert max(img.shape) < 2000
    # the tables are a function of the run file: redrawn from it, identical
    before = md
    proc = subprocess.run([sys.executable, "-m", "influence_bench.cli", "paper", "--out", str(out), "--tables-only"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "paper.md").read_text() == before


def test_paper_command_usage_errors(tmp_path):
    for args in (["--parts", "iris,cifar"], ["--tables-only"]):
        proc = subprocess.run([sys.executable, "-m", "influence_bench.cli", "paper", "--out", str(tmp_path), *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "influence-bench paper:" in proc.stderr


def test_report_shows_the_test_point_split(tmp_path):
    from influence_bench.reporting.report import write_report
    from influence_bench.reporting.runfiles import write_run
    from influence_bench.reporting.schema import load_run

    cases = [_case("iris-mlp-d8-w16-wd1e-3-paper", 0.3, highest=0.81, median=-0.12),
             _case("iris-mlp-d8-w16-wd1e-3-paper", 0.2, metric="pearson", highest=0.7, median=0.1)]
    run = load_run(write_run(tmp_path / "run.json", cases))
    assert run.cases[0].at_highest_loss == 0.81  # through JSON and back
    page = write_report([run], tmp_path / "report").read_text()
    assert "| iris-mlp-d8-w16-wd1e-3-paper | exact | loo-topk | 0.70 / 0.81 | 0.10 / -0.12 |" in page


def test_converged_family_settings_without_a_leave_one_out_optimum_are_not_scored():
    """No weight decay on separable Iris, or a theta* above the warm-Newton stationarity bar: listed
    with the reason, no case (a defined setting, or a minibatch one, is scored)."""
    from types import SimpleNamespace

    wd0 = catalog.get_setting("iris-mlp-d2-w16-wd0")
    assert "no minimiser" in study.undefined_leave_one_out(wd0)
    d6 = catalog.get_setting("iris-mlp-d6-w16-wd1e-3")
    assert study.undefined_leave_one_out(d6) is None  # known only once theta* is trained
    assert "no minimiser" in study.undefined_leave_one_out(d6, SimpleNamespace(train_grad_norm=1.1e-6))
    assert study.undefined_leave_one_out(d6, SimpleNamespace(train_grad_norm=1e-9)) is None
    assert study.undefined_leave_one_out(catalog.get_setting("iris-mlp-d2-w16-wd0-paper")) is None
    not_run = []
    assert study.score([wd0], ["exact"], not_run=not_run) == [] and not_run[0].setting == wd0.id
