"""The pytest plugin: options, the (estimator x setting) parametrisation, the end-of-session
fidelity table and the results file.

A suite test asks for ``fidelity_case`` (one estimator on one setting) and ``influence_bench``
(the session object) and calls ``influence_bench.check(fidelity_case)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from influence_bench.api.registry import REGISTRY, TRUST_ENV, TRUST_FLAG, RegistryError
from influence_bench.data.datasets import DataUnavailable
from influence_bench.reporting.render import DEFAULT_WIDTH
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
                help="only this estimator (repeatable), a name or NAME(field=value,...) with hyperparameters, e.g. "
                     "'lissa(depth=500)'; default: every registered estimator")
    g.addoption("--device", default="cpu", help="torch device for training, estimators and ground truth")
    g.addoption("--results-dir", default=None, metavar="DIR",
                help="where run files go (default: <rootdir>/results); the run is results/runs/run-*.json")
    g.addoption(TRUST_FLAG, action="store_true",
                help=f"import the estimator plug-ins in ./estimators of the working directory (their code runs; also: "
                     f"{TRUST_ENV}=1, or trust-cwd-estimators = true under [tool.influence-bench] in ./pyproject.toml)")
    g.addoption("--require-data", action="store_true",
                help="fail, instead of skip, when a dataset is missing")
    g.addoption("--baseline", default=None, metavar="FILE",
                help="after the session, compare the run to this baseline run file; a regression fails the "
                     "session (make one with `influence-bench baseline update RUN.json`)")
    g.addoption("--time-limit", action="append", default=[], metavar="[NAME=]SECONDS",
                help="time limit of one estimator call (repeatable; NAME= for one estimator; default 3600 s or "
                     "the class's time_limit_s); a call past it is stopped and its case is an error")
    g.addoption("--memory-limit", action="append", default=[], metavar="[NAME=]MB",
                help="memory an estimator call may add (repeatable; NAME= for one estimator; default: the "
                     "machine's physical memory; Linux, CPU)")
    g.addoption("--isolation", choices=["inline", "process"], default=None,
                help="inline (default): guarded calls in this process; process: each call in a forked worker "
                     "(survives segfaults and hangs in C; one torch thread, so its times are not comparable)")
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
        self.gate_error = None  # why the gate could not compare (a run it cannot use)
        self.gates, self.baseline = _gate_options(config)
        self.limits = _limit_options(config)
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

            self._scoring = ScoringSession(self.device, self.thresholds, start=self.start, limits=self.limits)
            from influence_bench.scoring.session import ResultsDirError

            try:  # every finished case goes to the run's journal at once: a killed session keeps them
                self._scoring.begin(_results_dir(self.config), extra={"tier": self.config.getoption("--tier")})
            except ResultsDirError as exc:
                pytest.exit(f"influence-bench: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)
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


def _limit_options(config: pytest.Config):
    """--time-limit / --memory-limit / --isolation, parsed at configure time (a typo is a usage error)."""
    from influence_bench.scoring.isolation import Limits

    try:
        return Limits.parse(config.getoption("--time-limit"), config.getoption("--memory-limit"),
                            config.getoption("--isolation"))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def _gate_options(config: pytest.Config):
    """Parse --gate / load --baseline at configure time, so a typo fails before anything runs."""
    from influence_bench.reporting.gates import GateSpecError, load_gate_file, parse_gate
    from influence_bench.reporting.schema import RunFileError

    try:
        gates = [parse_gate(g) for g in config.getoption("--gate")]
    except GateSpecError as exc:
        raise pytest.UsageError(str(exc)) from None
    path = config.getoption("--baseline")
    if path is None:
        if gates:
            raise pytest.UsageError("--gate needs --baseline FILE")
        return gates, None
    if not Path(path).exists():
        raise pytest.UsageError(f"--baseline {path}: no such file; write one with "
                                f"`influence-bench baseline update results/runs/run-....json --out {path}`")
    try:  # unreadable, no cases, NaN or impossible values: a usage error before anything runs
        return gates, load_gate_file(path, "--baseline")
    except RunFileError as exc:
        raise pytest.UsageError(str(exc)) from None


def share_cores_among_workers(config: pytest.Config) -> int | None:
    """pytest-xdist: each of N workers on C cores computes with C // N threads (at least 1), not C.

    N workers that each start C intra-op threads put N x C busy threads on C cores: measured on 2
    cores, README's test command under ``-n 2`` took 24 min 49 s that way against 20 min serial,
    and 12 min 35 s with the share. The worker's torch and the processes it starts (their
    ``OMP_NUM_THREADS``) get the share. A user's own ``OMP_NUM_THREADS`` is left alone, and so is a
    session that is not an xdist worker. Returns the threads set, or None."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None or "OMP_NUM_THREADS" in os.environ:
        return None
    workers = int(workerinput.get("workercount") or os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    return threads


def pytest_configure(config: pytest.Config) -> None:
    share_cores_among_workers(config)
    if config.getoption(TRUST_FLAG):
        config.stash[_TRUST_BEFORE] = REGISTRY.trust_cwd
        REGISTRY.trust_cwd = True
    config.stash[_KEY] = BenchSession(config)
    config.addinivalue_line("markers", "fidelity: a generated (estimator x setting) fidelity case")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped where there is none")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _TRUST_BEFORE in config.stash:
        REGISTRY.trust_cwd = config.stash[_TRUST_BEFORE]


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """A registry failure met while generating the cases is a usage error (one line, no traceback).
    Tests marked ``gpu`` skip, saying why, on a machine without CUDA."""
    error = config.stash.get(_REGISTRY_ERROR, None)
    if error is not None:
        raise pytest.UsageError(f"influence-bench: {error}")
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); this machine has none")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


_KEY = pytest.StashKey[BenchSession]()
_REGISTRY_ERROR = pytest.StashKey[str]()
_TRUST_BEFORE = pytest.StashKey["bool | None"]()


@pytest.fixture(scope="session")
def influence_bench(request: pytest.FixtureRequest) -> BenchSession:
    return request.config.stash[_KEY]


def _selected_estimators(cfg: pytest.Config) -> list[str]:
    """``--estimator`` names, else every registered estimator. A registry error (an unknown name, or a
    plug-in that failed to load when all are asked for) is stashed, and the collection ends with it as a
    usage error (``pytest_collection_modifyitems``): raised here, pytest would show a traceback."""
    from influence_bench.api.arguments import create, estimator_label, expand_specs

    try:
        # a spec with hyperparameters ('lissa(depth=500)') is checked and run under its label
        names = [estimator_label(create(n)) for n in expand_specs(cfg.getoption("--estimator"))] \
            or REGISTRY.default_names()
        if not cfg.getoption("--estimator") and REGISTRY.failures:
            more = f" (and {len(REGISTRY.failures) - 1} more)" if len(REGISTRY.failures) > 1 else ""
            raise RegistryError(f"{REGISTRY.failures[0]}{more}; fix or uninstall it, or choose the estimators to run "
                                "with --estimator NAME")
    except RegistryError as exc:
        cfg.stash.setdefault(_REGISTRY_ERROR, str(exc))
        return []
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
        from influence_bench.api.arguments import base_name

        # the contract checks are of a class (at its defaults): lissa(depth=500) is checked as lissa
        chosen = list(dict.fromkeys(base_name(n) for n in _selected_estimators(cfg)))
        for name, check in cases(chosen):
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
    fail a baseline case that was selected but produced no result. Under pytest-xdist every worker
    collects every test (and runs a share): the controller merges their selections (``pytest_testnodedown``)."""
    bench = session.config.stash.get(_KEY, None)
    if bench is None:
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


def _results_dir(config: pytest.Config) -> Path:
    out = config.getoption("--results-dir")
    return Path(out) if out else Path(config.rootpath) / "results"


_WORKER_OUTPUT = "influence_bench"  # config.workeroutput key of a pytest-xdist worker's part


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """pytest-xdist: a worker hands its fidelity cases, selection, violations and work to the controller
    (``config.workeroutput``, sent as it shuts down; ``pytest_sessionfinish``), which merges them into
    its own session; the controller alone writes the run file and applies the gate, as one serial
    session would. A worker that crashed hands nothing: its cases are missing, which the gate fails."""
    from influence_bench.reporting.schema import RunFileError

    exported = getattr(node, "workeroutput", {}).get(_WORKER_OUTPUT)
    bench = node.config.stash.get(_KEY, None)
    if bench is None or exported is None:
        return
    try:
        bench.scoring.merge(exported, f"pytest-xdist worker {node.gateway.id}")
    except RunFileError as exc:
        bench.gate_error = str(exc)


def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    """Write the run file and apply the regression gate (runs before the terminal summary). An
    xdist worker hands its part to the controller instead (``pytest_testnodedown``)."""
    bench = session.config.stash.get(_KEY, None)
    if bench is not None and hasattr(session.config, "workeroutput"):
        if bench._scoring is not None:
            session.config.workeroutput[_WORKER_OUTPUT] = bench.scoring.export()
            if bench.scoring.journal is not None:  # the controller journals the cases it merges
                bench.scoring.journal.unlink(missing_ok=True)
                bench.scoring.journal = None
        return
    if bench is not None and not bench.cases and bench.baseline is not None:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED  # a gate that compared nothing must not pass
        return
    if bench is None or not bench.cases:
        return
    scoring = bench.scoring
    if scoring.shipped_violations or bench.gate_error:  # gate_error here: a worker's part did not load
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    config = session.config
    stopped = exitstatus == pytest.ExitCode.INTERRUPTED
    scoring.write_run(_results_dir(config), extra={"tier": config.getoption("--tier")},
                      partial="interrupted (pytest)" if stopped else None)
    if bench.baseline is not None:
        from influence_bench.reporting.gates import compare_runs, load_gate_file
        from influence_bench.reporting.schema import RunFileError

        try:
            bench.comparison = compare_runs(load_gate_file(scoring.run_path), bench.baseline, bench.gates)
        except RunFileError as exc:  # the run holds a value no metric can take: the gate cannot pass
            bench.gate_error = str(exc)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
            return
        if bench.comparison.failed:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    for line in REGISTRY.notes + [str(f) for f in REGISTRY.failures]:  # ./estimators not trusted; plug-ins that
        terminalreporter.write_line(f"influence-bench: {line}", yellow=True)  # failed (--estimator chose others)
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
    width = min(DEFAULT_WIDTH, max(60, getattr(terminalreporter, "_tw", None) and terminalreporter._tw.fullwidth
                                   or DEFAULT_WIDTH))
    terminalreporter.write_line(scoring.table(width=width))
    if scoring.run_path is not None:
        terminalreporter.write_line(f"results written to {scoring.run_path}")
    terminalreporter.write_line(scoring.work_summary())
    if scoring.shipped_violations:
        terminalreporter.section("influence-bench shipped settings retrained", red=True)
        for v in scoring.shipped_violations:
            terminalreporter.write_line(v, red=True)
    if bench.gate_error:
        terminalreporter.section("influence-bench regression gate", red=True)
        terminalreporter.write_line(f"GATE FAILED: {bench.gate_error}", red=True, bold=True)
    if bench.comparison is not None:
        from influence_bench.reporting.gates import format_comparison

        failed = bench.comparison.failed
        terminalreporter.section("influence-bench regression gate", red=failed, green=not failed)
        text = format_comparison(bench.comparison, str(scoring.run_path), config.getoption("--baseline"),
                                 max_listed=None if config.getoption("verbose") > 0 else 5)
        for line in text.splitlines():
            terminalreporter.write_line(line, red=failed and line.startswith("GATE FAILED"), bold=failed)
