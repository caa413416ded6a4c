"""The pytest plugin: options, the (estimator x setting) parametrisation, the end-of-session
fidelity table and the results file.

A suite test asks for ``fidelity_case`` (one estimator on one setting) and ``influence_bench``
(the session object) and calls ``influence_bench.check(fidelity_case)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from influence_bench.api.registry import REGISTRY
from influence_bench.data.datasets import DataUnavailable
from influence_bench.spec import catalog
from influence_bench.spec.settings import TIERS, Setting
from influence_bench.spec.thresholds import Thresholds


@dataclass(frozen=True)
class FidelityCase:
    estimator: str
    setting: Setting

    @property
    def id(self) -> str:
        return f"{self.estimator}-{self.setting.id}"


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("influence-bench")
    g.addoption("--tier", default="smoke", choices=TIERS, help="settings tier to run (default: smoke)")
    g.addoption("--estimator", action="append", default=[], metavar="NAME",
                help="only this estimator (repeatable); default: every registered estimator")
    g.addoption("--device", default="cpu", help="torch device for training, estimators and ground truth")
    g.addoption("--results-dir", default=None, metavar="DIR",
                help="where run files go (default: <rootdir>/results); the run is results/runs/run-*.json")
    g.addoption("--require-data", action="store_true",
                help="fail, instead of skip, when a dataset is missing")
    g.addoption("--baseline", default=None, metavar="FILE",
                help="after the session, compare the run to this baseline run file; a regression fails the "
                     "session (make one with `influence-bench baseline update RUN.json`)")
    g.addoption("--bench-rounds", type=int, default=3, metavar="N",
                help="timed rounds per estimator benchmark (after one warm-up round; default 3)")
    g.addoption("--gate", action="append", default=[], metavar="SPEC",
                help="gate for --baseline, e.g. spearman:-0.05 (absolute drop) or time:+25%% (repeatable; "
                     "default spearman:-0.05). A case regresses only if its mean paired drop over the test points "
                     "exceeds the tolerance and a one-sided paired t-test finds it significant (p < 0.05)")


class BenchSession:
    """The pytest front-end of a ``ScoringSession``: turns its verdicts into passed / failed /
    skipped / xfailed tests, writes the run file, applies the regression gate and prints the table."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.thresholds = Thresholds.load()
        self.comparison = None
        self.gates, self.baseline = _gate_options(config)
        self._scoring = None
        from influence_bench import tally

        self.start = tally.snapshot()  # the session's work counts from its start, unit tests included

    @property
    def device(self) -> str:
        return self.config.getoption("--device")

    @property
    def scoring(self):
        if self._scoring is None:
            from influence_bench.scoring.session import ScoringSession

            self._scoring = ScoringSession(self.device, self.thresholds, start=self.start)
        return self._scoring

    @property
    def cases(self) -> list:
        return self._scoring.cases if self._scoring is not None else []

    def check(self, fc: FidelityCase) -> None:
        try:
            cases, violation = self.scoring.evaluate(fc.estimator, fc.setting)
        except DataUnavailable as exc:
            self.scoring.not_run(fc.estimator, fc.setting, f"data unavailable: {exc}")
            if self.config.getoption("--require-data"):
                pytest.fail(f"{fc.id}: {exc}", pytrace=False)
            pytest.skip(f"{fc.id}: {exc}")
        if violation:  # also fails the session (sessionfinish): an xfail mark on the case must not hide it
            pytest.fail(violation, pytrace=False)
        status = cases[0].status
        if status == "skipped":
            pytest.skip(cases[0].message)
        if status == "error":
            pytest.fail(cases[0].message, pytrace=False)
        known: list[str] = []
        _, failures = self.scoring.judge(cases, known)
        if failures:
            pytest.fail("\n".join(failures + known), pytrace=False)
        if known:
            pytest.xfail("\n".join(known))


def _gate_options(config: pytest.Config):
    """Parse --gate / load --baseline at configure time, so a typo fails before anything runs."""
    from influence_bench.reporting.gates import GateSpecError, parse_gate
    from influence_bench.reporting.schema import RunFileError, load_run

    try:
        gates = [parse_gate(g) for g in config.getoption("--gate")]
    except GateSpecError as exc:
        raise pytest.UsageError(str(exc)) from None
    path = config.getoption("--baseline")
    if path is not None and (config.getoption("dist", "no") != "no" or config.getoption("numprocesses", None)):
        raise pytest.UsageError("--baseline does not work under pytest-xdist yet (the cases are collected per "
                                "worker); run the gated session without -n")
    if path is None:
        if gates:
            raise pytest.UsageError("--gate needs --baseline FILE")
        return gates, None
    if not Path(path).exists():
        raise pytest.UsageError(f"--baseline {path}: no such file; write one with "
                                f"`influence-bench baseline update results/runs/run-....json --out {path}`")
    try:
        return gates, load_run(path)
    except RunFileError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_KEY] = BenchSession(config)
    config.addinivalue_line("markers", "fidelity: a generated (estimator x setting) fidelity case")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped where there is none")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Tests marked ``gpu`` skip, saying why, on a machine without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); this machine has none")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


_KEY = pytest.StashKey[BenchSession]()


@pytest.fixture(scope="session")
def influence_bench(request: pytest.FixtureRequest) -> BenchSession:
    return request.config.stash[_KEY]


def _selected_estimators(cfg: pytest.Config) -> list[str]:
    names = cfg.getoption("--estimator") or REGISTRY.names()
    for n in names:
        REGISTRY.get(n)  # unknown name: error with suggestions at collection
    return names


@pytest.fixture(scope="session")
def check_contexts():
    """The small trained models the generated estimator checks run on (``scoring/checks.py``)."""
    from influence_bench.scoring.checks import default_contexts

    return default_contexts()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cfg = metafunc.config
    if "estimator_check" in metafunc.fixturenames:
        from influence_bench.scoring.checks import EXCEPTIONS, cases

        params = []
        for name, check in cases(_selected_estimators(cfg)):
            reason = EXCEPTIONS.get((check.name, name))
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
            params.append(pytest.param((name, check), id=f"check-{check.name}-{name}", marks=marks))
        metafunc.parametrize("estimator_check", params)
    if "fidelity_case" not in metafunc.fixturenames:
        return
    names = _selected_estimators(cfg)
    settings = catalog.select(tier=cfg.getoption("--tier"))
    params = [pytest.param(FidelityCase(n, s), id=f"{n}-{s.id}", marks=[pytest.mark.fidelity])
              for n in names for s in settings]
    metafunc.parametrize("fidelity_case", params)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The run file records the fidelity cases selected after ``-k``/``-m`` deselection, so the gate can
    fail a baseline case that was selected but produced no result (not on an xdist worker, which
    collects everything but runs a share)."""
    bench = session.config.stash.get(_KEY, None)
    if bench is None or hasattr(session.config, "workerinput"):
        return
    for item in session.items:
        fc = getattr(item, "callspec", None) and item.callspec.params.get("fidelity_case")
        if isinstance(fc, FidelityCase):
            bench.scoring.select(fc.estimator, fc.setting)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info) -> None:
    """pytest-benchmark JSON: torch/CUDA versions and device names beside its CPU info."""
    from influence_bench.scoring.benchmarking import update_machine_info

    update_machine_info(machine_info)


def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    """Write the run file and apply the regression gate (runs before the terminal summary)."""
    bench = session.config.stash.get(_KEY, None)
    if bench is not None and not bench.cases and bench.baseline is not None:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED  # a gate that compared nothing must not pass
        return
    if bench is None or not bench.cases:
        return
    scoring = bench.scoring
    if scoring.shipped_violations:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    config = session.config
    out = config.getoption("--results-dir")
    results_dir = Path(out) if out else Path(config.rootpath) / "results"
    scoring.write_run(results_dir, extra={"tier": config.getoption("--tier")})
    if bench.baseline is not None:
        from influence_bench.reporting.gates import compare_runs
        from influence_bench.reporting.schema import load_run

        bench.comparison = compare_runs(load_run(scoring.run_path), bench.baseline, bench.gates)
        if bench.comparison.failed:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    bench = config.stash.get(_KEY, None)
    if bench is not None and not bench.cases and bench.baseline is not None:
        terminalreporter.section("influence-bench regression gate", red=True)
        terminalreporter.write_line(f"GATE FAILED: no fidelity case produced a result, so nothing was compared with "
                                    f"{config.getoption('--baseline')} (were the cases deselected, or their data "
                                    "missing?)", red=True, bold=True)
        return
    if bench is None or not bench.cases:
        return
    scoring = bench.scoring
    terminalreporter.section("influence-bench fidelity")
    terminalreporter.write_line(scoring.table())
    if scoring.run_path is not None:
        terminalreporter.write_line(f"results written to {scoring.run_path}")
    terminalreporter.write_line(scoring.work_summary())
    if scoring.shipped_violations:
        terminalreporter.section("influence-bench shipped settings retrained", red=True)
        for v in scoring.shipped_violations:
            terminalreporter.write_line(v, red=True)
    if bench.comparison is not None:
        from influence_bench.reporting.gates import format_comparison

        failed = bench.comparison.failed
        terminalreporter.section("influence-bench regression gate", red=failed, green=not failed)
        text = format_comparison(bench.comparison, str(scoring.run_path), config.getoption("--baseline"),
                                 max_listed=None if config.getoption("verbose") > 0 else 5)
        for line in text.splitlines():
            terminalreporter.write_line(line, red=failed and line.startswith("GATE FAILED"), bold=failed)
