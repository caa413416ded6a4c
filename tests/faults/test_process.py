"""Process faults: SIGTERM and Ctrl-C in the middle of `score`, SIGKILL at random points of
training, ground-truth building and result writing, a crash in the final write, a harness failure on
one setting. Finished cases must survive (``ResultsLost`` otherwise), every file left behind must
load, and a resumed run must give bitwise the numbers of a run that was never interrupted.

The kill loop runs ``INFLUENCE_BENCH_KILL_SEEDS`` seeds (default 2, what CI runs; a longer tier sets
more, e.g. ``INFLUENCE_BENCH_KILL_SEEDS=20 pytest tests/faults -m kill_loop``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faults.support import ResultsLost, SilentWrong, assert_clear_error, cli
from influence_bench.reporting.runfiles import read_journal
from influence_bench.reporting.schema import load_run

FAST = "iris-logreg-wd1e-3"  # trains and builds its ground truth in seconds
SECOND = "iris-mlp-d1-w16-wd1e-3"  # shipped: theta* and ground truth load from results/ground-truth
N_SEEDS = int(os.environ.get("INFLUENCE_BENCH_KILL_SEEDS", "2"))

SLOW_PLUGIN = '''
import os, time
from influence_bench import Estimator, register


@register
class SlowOnSecond(Estimator):
    """gradient-dot, that sleeps on the setting named by $FAULT_SLOW_ON (so a signal lands mid-run)."""
    name = "fault-slow"

    def influence(self, ctx):
        if ctx.setting.id == os.environ.get("FAULT_SLOW_ON"):
            time.sleep(600)
        return ctx.test_grads() @ ctx.train_grads().T / ctx.n_train
'''


def _env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "INFLUENCE_BENCH_SHIPPED_GT"}  # shipped layer on
    return {**env, "INFLUENCE_BENCH_CACHE": str(tmp_path / "cache"), **extra}


def _default_sigint() -> None:
    # a shell that starts a job in the background has it ignore SIGINT, and children inherit that
    # (CI started with `&`): give the command a Ctrl-C as a terminal would
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "influence_bench.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def _values(cases) -> dict:
    return {(c.estimator, c.setting, c.protocol, c.metric): (c.status, c.value, tuple(c.per_test)) for c in cases}


@pytest.fixture
def slow_plugin(tmp_path):
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "fault_slow.py").write_text(SLOW_PLUGIN)
    return d


def _wait_for_cases(journal_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for j in journal_dir.glob("run-*.jsonl"):
            if len(j.read_text().splitlines()) >= 1 + n:
                return j
        if proc.poll() is not None:
            raise AssertionError(f"score ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no finished case reached the journal in time")


@pytest.mark.fault("process", "recovered")
@pytest.mark.parametrize("sig,rc,says", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_keeps_finished_cases_and_resume_completes_them(tmp_path, slow_plugin, sig, rc, says):
    results = tmp_path / "results"
    args = ["score", "fault-slow", "--settings", FAST, "--settings", SECOND, "--results-dir", str(results),
            "--no-baseline", "--protocol", "loo-fixed"]
    env = _env(tmp_path, INFLUENCE_BENCH_ESTIMATORS=str(slow_plugin), FAULT_SLOW_ON=SECOND)
    proc = _start(args, env)
    try:
        _wait_for_cases(results / "runs", 1, proc)
        time.sleep(0.5)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # never leave a sleeping scorer behind a failed test
    assert "Traceback" not in out + err, err[-3000:]
    if proc.returncode != rc:
        raise SilentWrong(f"exit {proc.returncode} after {sig.name}, expected {rc}: {err[-1500:]}")
    assert says in err and "--resume" in err, err
    runs = list((results / "runs").glob("run-*.json"))
    if len(runs) != 1:
        raise ResultsLost(f"no run file after {sig.name}: {sorted(p.name for p in (results / 'runs').iterdir())}")
    partial = load_run(runs[0])
    if {c.setting for c in partial.cases} != {FAST}:
        raise ResultsLost(f"the partial run holds {[c.setting for c in partial.cases]}")
    assert partial.extra.get("partial", "").startswith("stopped by")
    before = _values(partial.cases)

    res = subprocess.run([sys.executable, "-m", "influence_bench.cli", *args, "--resume", str(runs[0])],
                         env={**env, "FAULT_SLOW_ON": ""}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"already in {runs[0]}" in res.stderr
    done = load_run(runs[0])
    assert {c.setting for c in done.cases} == {FAST, SECOND} and "partial" not in done.extra
    after = _values(done.cases)
    if any(after[k] != v for k, v in before.items()):
        raise SilentWrong("resuming changed the cases the interrupted run had finished")
    assert not list((results / "runs").glob("*.jsonl"))


@pytest.fixture(scope="module")
def reference():
    """The cases of an uninterrupted run of gradient-dot on FAST (trained and built in this process)."""
    from influence_bench.scoring.runner import evaluate
    from influence_bench.spec import catalog

    mp = pytest.MonkeyPatch()
    mp.setenv("INFLUENCE_BENCH_SHIPPED_GT", "")
    try:
        return _values(evaluate("gradient-dot", catalog.get_setting(FAST)))
    finally:
        mp.undo()


@pytest.mark.kill_loop
@pytest.mark.fault("process", "recovered")
@pytest.mark.parametrize("seed", range(N_SEEDS))
def test_sigkill_at_a_random_point_loses_nothing_and_resumes_bitwise(tmp_path, reference, seed):
    """SIGKILL somewhere in start-up, training theta*, building ground truth or writing results."""
    results = tmp_path / "results"
    env = _env(tmp_path, INFLUENCE_BENCH_SHIPPED_GT="")
    args = ["score", "gradient-dot", "--settings", FAST, "--results-dir", str(results), "--no-baseline"]
    at = random.Random(seed).uniform(1.0, 9.0)
    proc = _start(args, env)
    try:
        proc.wait(timeout=at)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    runs_dir = results / "runs"
    journals = sorted(runs_dir.glob("run-*.jsonl")) if runs_dir.is_dir() else []
    finals = sorted(runs_dir.glob("run-*.json")) if runs_dir.is_dir() else []
    for j in journals:
        read_journal(j)  # a journal cut anywhere still loads
    for f in finals:
        load_run(f)  # a run file is complete or absent, never half-written
    resume = journals[0] if journals else None
    args2 = args + (["--resume", str(resume)] if resume is not None else [])
    res = subprocess.run([sys.executable, "-m", "influence_bench.cli", *args2], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "Traceback" not in res.stderr, f"killed at {at:.1f} s:\n{res.stderr[-2000:]}"
    final = load_run(sorted(runs_dir.glob("run-*.json"))[-1])
    got = _values(final.cases)
    if got != reference:
        raise SilentWrong(f"killed at {at:.1f} s, then resumed: the cases differ from an uninterrupted run")


@pytest.mark.fault("process", "recovered")
def test_a_journal_cut_mid_line_resumes_with_every_whole_case(tmp_path, reference):
    from influence_bench.scoring.session import ScoringSession
    from influence_bench.spec import catalog

    session = ScoringSession()
    run = session.begin(tmp_path, extra={"tier": "smoke"})
    mp = pytest.MonkeyPatch()
    mp.setenv("INFLUENCE_BENCH_SHIPPED_GT", "")
    try:
        session.evaluate("gradient-dot", catalog.get_setting(FAST))
    finally:
        mp.undo()
    journal = session.journal
    text = journal.read_text()
    journal.write_text(text + text.splitlines()[-1][: len(text.splitlines()[-1]) // 2])  # a kill mid-append
    head, cases = read_journal(journal)
    if _values(cases) != reference:
        raise ResultsLost(f"{len(cases)} cases read back from a cut journal, {len(reference)} written")
    assert head["tier"] == "smoke" and run.with_suffix(".jsonl") == journal


@pytest.mark.fault("process", "recovered")
def test_a_crash_in_the_final_write_leaves_the_journal(tmp_path, monkeypatch, reference):
    from influence_bench import paths
    from influence_bench.scoring.session import ScoringSession
    from influence_bench.spec import catalog

    session = ScoringSession()
    run = session.begin(tmp_path)
    monkeypatch.setenv("INFLUENCE_BENCH_SHIPPED_GT", "")
    session.evaluate("gradient-dot", catalog.get_setting(FAST))

    def crash(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(paths.os, "replace", crash)
    with pytest.raises(OSError):
        session.write_run(tmp_path)
    monkeypatch.undo()
    if run.exists():
        raise SilentWrong(f"a run file {run} appeared although its write failed")
    _, cases = read_journal(run.with_suffix(".jsonl"))
    if _values(cases) != reference:
        raise ResultsLost("the journal lost cases when the final write failed")


@pytest.mark.fault("process", "handled")
def test_a_harness_failure_on_one_setting_does_not_stop_the_others(tmp_path, monkeypatch):
    from influence_bench.scoring import runner

    real = runner.compare

    def broken(influence, ctx, *a, **k):  # the harness's side of a case: ground truth and comparison
        if ctx.setting.id == FAST:
            raise RuntimeError("simulated ground-truth failure")
        return real(influence, ctx, *a, **k)

    monkeypatch.setattr(runner, "compare", broken)
    res = cli("score", "gradient-dot", "--settings", FAST, "--settings", SECOND, "--results-dir", str(tmp_path),
              "--no-baseline", "--protocol", "loo-fixed", env={"INFLUENCE_BENCH_SHIPPED_GT": str(
                  Path(__file__).resolve().parents[2] / "results" / "ground-truth")})
    assert "Traceback" not in res.text
    if res.rc != 1:
        raise SilentWrong(f"exit {res.rc} with a setting whose ground truth failed")
    assert f"ERROR (harness, not the estimator) {FAST}: RuntimeError: simulated" in res.out, res.out
    run = load_run(next((tmp_path / "runs").glob("run-*.json")))
    if {c.setting for c in run.cases} != {SECOND}:
        raise ResultsLost(f"cases of {SECOND} missing: {[c.setting for c in run.cases]}")
    sel = {e["setting"]: e for e in run.extra["selected"]}
    assert "simulated" in sel[FAST]["not_run"]


@pytest.mark.fault("bad-input", "clear-error")
@pytest.mark.parametrize("where", ["a-file", "under-a-file", "proc"])
def test_an_unwritable_results_dir_fails_before_any_compute(tmp_path, where, monkeypatch):
    from influence_bench.scoring import session as session_mod

    target = {"a-file": tmp_path / "f", "under-a-file": tmp_path / "f" / "sub", "proc": Path("/proc/self/nope")}[where]
    (tmp_path / "f").write_text("x")
    computed = []
    monkeypatch.setattr(session_mod, "evaluate", lambda *a, **k: computed.append(a) or [])
    res = cli("score", "gradient-dot", "--settings", FAST, "--results-dir", str(target), "--no-baseline")
    assert_clear_error(res, "not writable", rc=2)
    if computed:
        raise SilentWrong("scoring ran before the results folder was found unwritable")


@pytest.mark.fault("bad-input", "clear-error")
@pytest.mark.parametrize("content", ["not json at all", "", json.dumps({"influence_bench_journal": 2})])
def test_resume_from_a_bad_file_is_a_clear_error(tmp_path, content):
    bad = tmp_path / "run-x.jsonl"
    bad.write_text(content)
    res = cli("score", "gradient-dot", "--settings", FAST, "--results-dir", str(tmp_path), "--resume", str(bad))
    assert_clear_error(res, str(bad), rc=2)
    if bad.read_text() != content:
        raise ResultsLost(f"--resume rewrote the file it could not read: {bad}")


@pytest.mark.fault("storage", "handled")
def test_files_written_atomically_keep_their_mode_or_get_the_umask_one(tmp_path):
    """mkstemp's 0600 used to reach every run file, cache entry and baseline written through it."""
    from influence_bench.paths import write_json

    umask = os.umask(0)
    os.umask(umask)
    new, kept = tmp_path / "new.json", tmp_path / "kept.json"
    write_json(new, {"a": 1})
    kept.write_text("{}")
    kept.chmod(0o640)
    write_json(kept, {"a": 2})
    modes = (new.stat().st_mode & 0o777, kept.stat().st_mode & 0o777)
    if modes != (0o666 & ~umask, 0o640):
        raise SilentWrong(f"modes {oct(modes[0])}, {oct(modes[1])}; expected {oct(0o666 & ~umask)}, 0o640")
