"""Everyday use of the command line: every command's default output fits 100 columns, the same rows
come out as markdown / csv / json, estimators take hyperparameters on the command line and in pytest,
progress reaches a terminal, and --help / --version / `python -m influence_bench` answer without torch."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from influence_bench.cli.main import main
from influence_bench.reporting.render import Column, Table, render

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "results" / "baseline.json"
SETTING = "iris-logreg-wd1e-3"


def _run(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # --help, --version
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _too_wide(text: str, width: int = 100) -> list[str]:
    """Lines past ``width``, but for a path the user chose (a tmp folder's), which is never cut."""
    return [ln for ln in text.splitlines() if len(ln) > width and not ln.startswith("results written to /")]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """One `score` of two estimators (one with hyperparameters) on a setting: its output and run file."""
    out = tmp_path_factory.mktemp("scored")
    buf_out, buf_err = io.StringIO(), io.StringIO()
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "stdout", buf_out)
    mp.setattr(sys, "stderr", buf_err)
    try:
        rc = main(["score", "gradient-dot", "lissa(depth=50)", "--settings", SETTING, "--results-dir", str(out),
                   "--test-points"])
    finally:
        mp.undo()
    return rc, buf_out.getvalue(), buf_err.getvalue(), next((out / "runs").glob("run-*.json"))


HELP = [("--help",), ("score", "--help"), ("list", "--help"), ("compare", "--help"), ("report", "--help"),
        ("ground-truth", "--help"), ("ground-truth", "build", "--help"), ("baseline", "update", "--help"),
        ("paper", "--help"), ("mutants", "--help"), ("bench", "--help"), ("data", "--help")]


@pytest.mark.parametrize("argv", [("list", "estimators"), ("list", "settings"), ("list", "settings", "--tier", "paper"),
                                  ("compare", str(BASELINE), "--baseline", str(BASELINE))] + HELP,
                         ids=lambda a: " ".join(a).replace(str(BASELINE), "BASELINE"))
def test_every_command_fits_100_columns(capsys, monkeypatch, argv):
    monkeypatch.setenv("COLUMNS", "100")  # what argparse's help wraps at (a terminal of 100 columns)
    rc, out, err = _run(capsys, *argv)
    assert rc == 0, err
    assert out.strip() and not _too_wide(out) and not _too_wide(err), _too_wide(out + err)


def test_score_output_fits_100_columns_and_wide_does_not(scored, capsys):
    rc, out, err, run = scored
    assert rc in (0, 1), err  # lissa at depth 50 may fail its floor: a verdict, not a crash
    assert not _too_wide(out) and not _too_wide(err), _too_wide(out + err)
    # the check can fail: --wide prints every column, past 100
    rc, wide, _ = _run(capsys, "compare", str(run), "--baseline", str(BASELINE), "--wide")
    from influence_bench.reporting.schema import load_run
    from influence_bench.reporting.table import fidelity_table

    assert _too_wide(fidelity_table(load_run(run).cases, width=1000))


def test_score_table_reads_verdict_first_with_the_label_and_ranks(scored):
    rc, out, err, run = scored
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("  ") and "loo-" in ln]
    assert {r[1] for r in rows if r[0] in ("pass", "FAIL", "xfail")} >= {"gradient-dot", "lissa(depth=50)"}, out
    assert all(r[0] in ("pass", "FAIL", "xfail") for r in rows if r[1] in ("gradient-dot", "lissa(depth=50)")), out
    text = " ".join(out.split())
    assert "gradient-dot ranks loo-fixed" in text and "Spearman mean [95% CI]" in text, out
    assert "[1/2] gradient-dot on" in err and "[2/2] lissa(depth=50) on" in err  # off a terminal: one line a job
    cases = json.loads(run.read_text())["cases"]
    lissa = [c for c in cases if c["estimator"] == "lissa(depth=50)"]
    assert lissa and all(c["hyperparameters"]["depth"] == 50 and c["hyperparameters"]["scale"] == "auto"
                         for c in lissa)  # every hyperparameter is recorded, the defaults too


def test_the_pytest_summary_table_of_the_whole_baseline_fits(capsys):
    """The table pytest prints at the end of a session, over every committed baseline case."""
    from influence_bench.reporting.schema import load_run
    from influence_bench.scoring.session import ScoringSession

    session = ScoringSession()
    session.cases = load_run(BASELINE).cases
    text = session.table(width=100)
    assert text.count("\n") > 200 and not _too_wide(text), _too_wide(text)[:3]
    assert "xfail" in text and "known failure" in text  # an xfail's reason, whole, under its row


@pytest.mark.parametrize("fmt", ["csv", "json", "markdown"])
def test_machine_formats_hold_the_same_rows_and_nothing_else(capsys, scored, fmt):
    from influence_bench.reporting.schema import load_run
    from influence_bench.reporting.table import FIDELITY_FIELDS, fidelity_rows

    _, _, _, run = scored
    rc, out, err = _run(capsys, "score", "gradient-dot", "--settings", SETTING, "--format", fmt, "--no-baseline",
                        "--resume", str(run), "--results-dir", str(run.parent.parent))
    assert rc == 0, err
    want = [r for r in fidelity_rows([c for c in load_run(run).cases]).rows]
    if fmt == "csv":
        got = list(csv.DictReader(io.StringIO(out)))
        assert list(got[0]) == FIDELITY_FIELDS + ["note"]
        assert [(r["setting"], r["estimator"], r["protocol"]) for r in got] == \
            [(r["setting"], r["estimator"], r["protocol"]) for r in want]
        assert float(got[0]["spearman"]) == pytest.approx(want[0]["spearman"], rel=1e-12)
    elif fmt == "json":
        got = json.loads(out)
        assert [r["estimator"] for r in got] == [r["estimator"] for r in want] and got[0]["verdict"] in ("pass", "FAIL")
    else:
        assert out.startswith("| setting | verdict | estimator |") and out.count("\n| ") == len(want)
    assert "results written" not in out and "results written" in err  # stdout holds the data alone


# ---- estimator arguments -----------------------------------------------------------------------

def test_specs_parse_check_and_label():
    from influence_bench.api.arguments import create, estimator_label, parse_spec

    assert parse_spec("lissa") == ("lissa", {})
    assert parse_spec(" lissa( scale=10, depth=500 , curvature=ggn) ") == \
        ("lissa", {"scale": 10, "depth": 500, "curvature": "ggn"})
    assert parse_spec("exact(damping=1e-3)") == ("exact", {"damping": 1e-3})
    est = create("lissa(scale=10,depth=500)")
    assert (est.scale, est.depth) == (10.0, 500) and isinstance(est.scale, float)  # an int for `float | str`
    assert estimator_label(est) == "lissa(scale=10.0,depth=500)"
    assert estimator_label(create(estimator_label(est))) == estimator_label(est)  # a label is a spec
    assert estimator_label(create("lissa(depth=2000)")) == "lissa"  # the default is the bare name
    assert create("lissa(scale='auto')").scale == "auto"


@pytest.mark.parametrize("spec, names", [
    ("lissa(dept=5)", ["dept", "did you mean depth"]),
    ("lissa(depth='many')", ["depth must be int", "'many'"]),
    ("lissa(depth=5.5)", ["depth must be int"]),
    ("lissa(batch_size=True)", ["batch_size"]),
    ("lissa(5)", ["must be named"]),
    ("lissa(depth=1, depth=2)", ["depth"]),
    ("lissa(depth=", ["NAME(field=value"]),
    ("lissa(depth=)", ["cannot read the arguments"]),
    ("../escape", ["unknown estimator"]),
    ("lisa(depth=5)", ["unknown estimator 'lisa'", "Did you mean: lissa"]),
])
def test_bad_specs_are_usage_errors_naming_the_field(capsys, spec, names):
    rc, out, err = _run(capsys, "score", spec, "--settings", SETTING)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    for n in names:
        assert n in err, err


def test_a_second_table_is_refused_where_stdout_holds_one_document(capsys):
    rc, out, err = _run(capsys, "score", "exact", "--settings", SETTING, "--format", "json", "--test-points")
    assert rc == 2 and out == "" and "per_test=True" in err


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(1, 10**6), damping=st.floats(0, 1e3, allow_nan=False), seed=st.integers(0, 2**31))
def test_any_valid_hyperparameters_round_trip_through_their_label(depth, damping, seed):
    from influence_bench.api.arguments import create, estimator_label

    est = create(f"lissa(depth={depth},damping={damping!r},seed={seed})")
    again = create(estimator_label(est))
    assert est.hyperparameters() == again.hyperparameters()


def test_pytest_estimator_option_takes_specs(tmp_path):
    env = {**os.environ, "INFLUENCE_BENCH_CACHE": str(tmp_path)}
    args = [sys.executable, "-m", "pytest", str(ROOT / "suites"), "--collect-only", "-q", "-p", "no:cacheprovider",
            "-k", "fidelity and iris-logreg"]
    ok = subprocess.run(args + ["--estimator", "lissa(depth=300)"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0 and "lissa(depth=300)-iris-logreg-wd1e-3" in ok.stdout, ok.stdout[-2000:] + ok.stderr
    bad = subprocess.run(args + ["--estimator", "lissa(dept=300)"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    text = bad.stdout + bad.stderr
    assert bad.returncode == pytest.ExitCode.USAGE_ERROR and "dept" in text and "Traceback" not in text, text[-2000:]


# ---- progress ----------------------------------------------------------------------------------

def test_phases_reach_a_listener_in_order(tmp_path, monkeypatch):
    from influence_bench import progress
    from influence_bench.scoring.runner import evaluate
    from influence_bench.spec import catalog

    monkeypatch.setenv("INFLUENCE_BENCH_CACHE", str(tmp_path))  # nothing cached: theta* trained, truth retrained
    events = []
    with progress.listening(lambda *e: events.append(e)):
        evaluate("gradient-dot", catalog.get_setting(SETTING))
    phases = [e[0] for e in events]
    order = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert order[:3] == ["theta*", "estimator", "ground truth"], order
    built = [e for e in events if e[0] == "ground truth" and e[2]]
    assert built and built[-1][1] == built[-1][2] > 1  # the builder reported its models, to the last one


def test_the_bar_draws_on_a_terminal_and_stays_quiet_elsewhere():
    from influence_bench import progress
    from influence_bench.cli.bars import ScoreBar

    tty = io.StringIO()
    with ScoreBar(3, stream=tty, enabled=True) as bar:
        bar.start(2, "exact", SETTING, "warm")
        progress.advance("ground truth", 5, 10)
        bar._bar.refresh()
    assert "[2/3] exact on iris-logreg-wd1e-3" in tty.getvalue() and "ground truth" in tty.getvalue()
    log = io.StringIO()
    with ScoreBar(3, stream=log) as bar:  # a StringIO is no terminal
        bar.start(2, "exact", SETTING, "warm")
        progress.advance("ground truth", 5, 10)
    assert log.getvalue() == "[2/3] exact on iris-logreg-wd1e-3 (warm ground truth) ...\n"


def test_warm_up_runs_once_per_device():
    from influence_bench.scoring import warmup

    warmup.warm_up("cpu")
    assert warmup.warm_up("cpu") is False and "cpu" in warmup._DONE


# ---- the entry points ----------------------------------------------------------------------------

def test_help_version_and_module_entry_point_without_torch():
    code = ("import sys; from influence_bench.cli.main import build_parser; build_parser().format_help(); "
            "import influence_bench; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    from influence_bench.cli.main import _version

    out = subprocess.run([sys.executable, "-m", "influence_bench", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"influence-bench {_version()}", out
    listed = subprocess.run([sys.executable, "-m", "influence_bench", "list", "estimators", "--format", "json"],
                            capture_output=True, text=True, timeout=300)
    assert {"exact", "lissa", "trak"} <= {r["name"] for r in json.loads(listed.stdout)}


# ---- the renderer ----------------------------------------------------------------------------------

words = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)
cells = st.lists(words, min_size=1, max_size=6).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from(["a", "b"]), cells, cells, st.floats(-1, 1), cells), max_size=12),
       width=st.integers(60, 140))
def test_text_tables_never_exceed_their_width(rows, width):
    table = Table([Column("k", "key"), Column("name", "name", flex=True), Column("v", "value", "right"),
                   Column("about", "about", flex=True), Column("extra", "extra", wide=True)],
                  group_key="g", notes=["a note " * 30])
    table.rows = [{"g": g, "k": k[:8], "name": n, "v": v, "about": a, "extra": "x" * 30, "_note": a * 3}
                  for g, k, n, v, a in rows]
    text = render(table, "table", width)
    assert not _too_wide(text, width), (width, _too_wide(text, width))
    for r in table.rows:  # nothing is cut: every word of a flex cell is still there
        for w in r["name"].split():
            assert w in text
    got = list(csv.DictReader(io.StringIO(render(table, "csv"))))
    assert len(got) == len(rows) and len(json.loads(render(table, "json"))) == len(rows)
