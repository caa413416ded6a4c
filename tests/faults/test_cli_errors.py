"""One error path for the command line and the pytest plugin, and plug-in trust.

Every failure of ``influence-bench`` ends as one or two lines naming the thing (file, entry point,
distribution, option, estimator) with exit 2 for a usage error and 1 otherwise; ``--debug`` shows the
traceback instead. A plug-in that fails to load is named and the others still load. ``./estimators``
of the working directory is imported only on an explicit opt-in: the tests below prove that its code
did not run (it writes a marker file when imported) and that each of the opt-ins imports it.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from faults.support import BareTraceback, Result, SilentWrong, assert_clear_error, cli, cli_process
from influence_bench.api.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
SETTING = "iris-logreg-wd1e-3"
TRUST_ENV = "INFLUENCE_BENCH_TRUST_CWD"


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Each test discovers plug-ins anew (in its own working directory) and leaves the session's
    registry as it found it."""
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.delenv("INFLUENCE_BENCH_ESTIMATORS", raising=False)
    monkeypatch.delenv("INFLUENCE_BENCH_DEBUG", raising=False)
    saved = dict(REGISTRY.__dict__)
    REGISTRY.__init__()
    yield REGISTRY
    REGISTRY.__dict__.clear()
    REGISTRY.__dict__.update(saved)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (TRUST_ENV, "INFLUENCE_BENCH_ESTIMATORS")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _estimator_src(name: str, body: str = "", fields: str = "") -> str:
    return "\n".join([
        "from dataclasses import dataclass",
        "from influence_bench import Estimator, register",
        body,
        "",
        "@register",
        "@dataclass",
        "class Plugin(Estimator):",
        '    """A test plug-in. Hyperparameters: none."""',
        f"    name = {name!r}",
        f"    {fields}",
        "",
        "    def influence(self, ctx):",
        "        return ctx.test_grads() @ ctx.train_grads().T / ctx.n_train",
        "",
    ])


def _cwd_plugin(folder: Path, marker: Path, name: str = "cwd-est") -> Path:
    """``folder/estimators/mine.py``, which writes ``marker`` when imported."""
    (folder / "estimators").mkdir(parents=True)
    (folder / "estimators" / "mine.py").write_text(
        _estimator_src(name, body=f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')"))
    return folder


def _site(tmp_path: Path, entry_points: dict[str, str], modules: dict[str, str] | None = None,
          dist: str = "bad-plugin") -> Path:
    """A folder for sys.path holding an installed distribution ``dist`` (a dist-info with
    ``entry_points.txt``) and the modules its entry points name."""
    site = tmp_path / "site"
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[influence_bench.estimators]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for mod, src in (modules or {}).items():
        (site / f"{mod}.py").write_text(textwrap.dedent(src))
    return site


def _row(out: str, start: str) -> str | None:
    """The table row starting with ``start``, its wrapped continuation lines joined."""
    lines = out.splitlines()
    for i, ln in enumerate(lines):
        if ln.startswith(start):
            more = [x for x in lines[i + 1:]]
            cont = [x for x in (more[:next((k for k, x in enumerate(more) if not x.startswith(" ")), len(more))])]
            return " ".join(" ".join([ln] + cont).split())
    return None


def _assert_handled(res, *names: str) -> None:
    if "Traceback (most recent call last)" in res.text:
        raise BareTraceback(res.err[-3000:])
    if res.rc != 0:
        raise SilentWrong(f"exit {res.rc} where the run should go on:\n{res.err[-2000:]}")
    text = " ".join(res.text.split()).lower()  # tables wrap long cells onto continuation lines
    missing = [n for n in names if n.lower() not in text]
    assert not missing, f"the output does not name {missing}:\n{res.text[-3000:]}"


# ---- entry points ---------------------------------------------------------------------------------

@pytest.mark.fault("bad-plugin", "handled")
def test_entry_point_that_cannot_import_is_named_and_the_others_load(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_site(tmp_path, {"broken": "no_such_module_x1:Thing"})))
    res = cli("list", "estimators")
    _assert_handled(res, "exact", "gradient-dot")
    line = _row(res.out, "broken ")
    assert line is not None, res.out
    for name in ("no_such_module_x1:Thing", "bad-plugin 1.0", "ModuleNotFoundError", "NOT LOADED"):
        assert name in line, line


@pytest.mark.fault("bad-plugin", "clear-error")
def test_entry_point_that_raises_at_import_is_named_when_asked_for(tmp_path, monkeypatch):
    site = _site(tmp_path, {"boom": "ib_fault_boom:Boom"}, {"ib_fault_boom": "raise RuntimeError('boom at import')"})
    monkeypatch.syspath_prepend(str(site))
    res = cli("score", "boom", "--settings", SETTING)
    assert_clear_error(res, "entry point 'boom'", "ib_fault_boom:Boom", "bad-plugin", "boom at import", rc=2)


@pytest.mark.fault("bad-plugin", "handled")
def test_entry_point_to_a_non_estimator_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_site(tmp_path, {"not-an-estimator": "json:dumps"})))
    res = cli("list", "estimators")
    _assert_handled(res, "not-an-estimator", "json:dumps", "not an influence_bench.Estimator subclass")
    assert "exact" in REGISTRY.names() and "not-an-estimator" not in REGISTRY.names()


@pytest.mark.fault("bad-plugin", "handled")
def test_entry_point_duplicating_a_builtin_name_withdraws_the_name(tmp_path, monkeypatch):
    site = _site(tmp_path, {"exact": "ib_fault_dup:Plugin"}, {"ib_fault_dup": _estimator_src("exact")})
    monkeypatch.syspath_prepend(str(site))
    res = cli("list", "estimators")
    _assert_handled(res, "defined", "ib_fault_dup:Plugin", "bad-plugin")
    assert "exact" not in REGISTRY.names()  # neither class is used: asked for, the clash names both files
    with pytest.raises(LookupError, match=r"by .*exact\.py:\d+ and by .*ib_fault_dup\.py:\d+"):
        REGISTRY.get("exact")


def _pytest(*args: str, cwd: Path = ROOT, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", *args, "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=600)


@pytest.mark.fault("bad-plugin", "clear-error")
def test_pytest_collection_with_a_failing_entry_point_is_a_usage_error_naming_it(tmp_path):
    site = _site(tmp_path, {"broken": "no_such_module_x2:Thing"})
    proc = _pytest(str(ROOT / "suites" / "test_estimator_checks.py"), PYTHONPATH=str(site))
    text = proc.stdout + proc.stderr
    if "Traceback" in text or "ERROR collecting" in text:
        raise BareTraceback(text[-3000:])
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, text[-2000:]
    assert "entry point 'broken'" in text and "bad-plugin" in text and "--estimator NAME" in text, text[-2000:]


@pytest.mark.fault("bad-plugin", "handled")
def test_pytest_collection_of_chosen_estimators_goes_on_past_a_failing_entry_point(tmp_path):
    site = _site(tmp_path, {"broken": "no_such_module_x3:Thing"})
    proc = _pytest(str(ROOT / "suites" / "test_estimator_checks.py"), "--estimator", "gradient-dot",
                   PYTHONPATH=str(site))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "check-output-gradient-dot" in proc.stdout


@pytest.mark.fault("bad-input", "clear-error")
def test_pytest_unknown_estimator_is_a_usage_error_not_a_traceback():
    proc = _pytest(str(ROOT / "suites" / "test_estimator_checks.py"), "--estimator", "no-such-estimator")
    text = proc.stdout + proc.stderr
    if "Traceback" in text or "ERROR collecting" in text:
        raise BareTraceback(text[-3000:])
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR and "unknown estimator 'no-such-estimator'" in text, text


# ---- plug-in trust: ./estimators of the working directory ------------------------------------------

@pytest.mark.fault("hostile-input", "handled")
def test_cwd_estimators_are_not_imported_without_an_opt_in(tmp_path):
    marker = tmp_path / "MARKER"
    _cwd_plugin(tmp_path, marker)
    res = cli("list", "estimators", cwd=tmp_path)
    if marker.exists():
        raise SilentWrong("./estimators/mine.py was imported (its code ran) without an opt-in")
    _assert_handled(res, "exact", "mine.py", "not loaded", "--trust-cwd-estimators", TRUST_ENV)
    assert "cwd-est" not in res.out


@pytest.mark.fault("hostile-input", "clear-error")
def test_scoring_an_untrusted_cwd_estimator_says_how_to_opt_in(tmp_path):
    marker = tmp_path / "MARKER"
    _cwd_plugin(tmp_path, marker)
    res = cli("score", "cwd-est", "--settings", SETTING, cwd=tmp_path)
    assert not marker.exists(), "./estimators was imported without an opt-in"
    assert_clear_error(res, "cwd-est", "--trust-cwd-estimators", rc=2)


@pytest.mark.fault("hostile-input", "clear-error")
def test_pytest_does_not_import_cwd_estimators_without_an_opt_in(tmp_path):
    marker = tmp_path / "MARKER"
    _cwd_plugin(tmp_path, marker)
    proc = _pytest(str(ROOT / "suites" / "test_estimator_checks.py"), "--rootdir", str(ROOT), cwd=tmp_path)
    assert not marker.exists(), "pytest imported ./estimators without an opt-in"
    assert proc.returncode == 0 and "check-output-cwd-est" not in proc.stdout, proc.stdout[-2000:] + proc.stderr
    assert "was not loaded" in proc.stdout and "--trust-cwd-estimators" in proc.stdout, proc.stdout[:2000]


@pytest.mark.fault("hostile-input", "handled")
@pytest.mark.parametrize("how", ["flag-before", "flag-after", "env", "pyproject"])
def test_each_opt_in_imports_cwd_estimators(tmp_path, how):
    marker = tmp_path / "MARKER"
    _cwd_plugin(tmp_path, marker)
    args, env = ["list", "estimators"], {}
    if how == "flag-before":
        args = ["--trust-cwd-estimators", *args]
    elif how == "flag-after":
        args = [*args, "--trust-cwd-estimators"]
    elif how == "env":
        env = {TRUST_ENV: "1"}
    else:
        (tmp_path / "pyproject.toml").write_text("[tool.influence-bench]\ntrust-cwd-estimators = true\n")
    res = cli(*args, cwd=tmp_path, env=env)
    _assert_handled(res, "cwd-est")
    assert marker.exists() and "not loaded" not in res.err, res.err


@pytest.mark.fault("hostile-input", "handled")
def test_pytest_option_imports_cwd_estimators(tmp_path):
    marker = tmp_path / "MARKER"
    _cwd_plugin(tmp_path, marker)
    proc = _pytest(str(ROOT / "suites" / "test_estimator_checks.py"), "--rootdir", str(ROOT),
                   "--trust-cwd-estimators", "--estimator", "cwd-est", cwd=tmp_path)
    assert proc.returncode == 0 and "check-output-cwd-est" in proc.stdout, proc.stdout[-2000:] + proc.stderr
    assert marker.exists()


@pytest.mark.fault("hostile-input", "handled")
def test_a_pyproject_that_does_not_opt_in_does_not_trust(tmp_path):
    marker = tmp_path / "MARKER"
    _cwd_plugin(tmp_path, marker)
    (tmp_path / "pyproject.toml").write_text('[tool.influence-bench]\ntrust-cwd-estimators = "yes please"\n'
                                             "[broken\n")
    res = cli("list", "estimators", cwd=tmp_path)
    assert not marker.exists()
    _assert_handled(res, "not loaded")


# ---- plug-in files ---------------------------------------------------------------------------------

@pytest.mark.fault("bad-plugin", "handled")
def test_plugin_file_with_a_syntax_error_is_listed_as_not_loaded(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "good.py").write_text(_estimator_src("good-plugin"))
    (plugins / "bad_syntax.py").write_text(_estimator_src("bad-syntax") + "\ndef oops(:\n")
    res = cli("list", "estimators", env={"INFLUENCE_BENCH_ESTIMATORS": str(plugins)})
    _assert_handled(res, "good-plugin", "bad_syntax.py", "SyntaxError", "line")
    assert "NOT LOADED" in res.out


@pytest.mark.fault("bad-plugin", "clear-error")
def test_scoring_the_estimator_of_a_broken_file_names_the_file(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "bad_syntax.py").write_text(_estimator_src("bad-syntax") + "\ndef oops(:\n")
    res = cli("score", "bad-syntax", "--settings", SETTING, env={"INFLUENCE_BENCH_ESTIMATORS": str(plugins)})
    assert_clear_error(res, "bad-syntax", "bad_syntax.py", "SyntaxError", rc=2)


@pytest.mark.fault("bad-plugin", "clear-error")
def test_estimator_field_without_default_is_refused_at_registration(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "nodefault.py").write_text(_estimator_src("no-default", fields="scale: float"))
    res = cli("score", "no-default", "--settings", SETTING, env={"INFLUENCE_BENCH_ESTIMATORS": str(plugins)})
    assert_clear_error(res, "no-default", "scale", "no default", rc=2)


# ---- option values ---------------------------------------------------------------------------------

_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.fault("bad-input", "clear-error")
@pytest.mark.parametrize("args", [
    pytest.param(("score", "exact", "--settings", SETTING, "--device", "gpu0"), id="score-gpu0"),
    pytest.param(("score", "exact", "--settings", SETTING, "--device", "cuda"), id="score-cuda", marks=_NO_CUDA),
    pytest.param(("score", "exact", "--settings", SETTING, "--device", "cuda:99"), id="score-cuda99"),
    pytest.param(("bench", "ground-truth", SETTING, "--device", "gpu0"), id="bench-gpu0"),
    pytest.param(("ground-truth", "build", SETTING, "--device", "cuda:99"), id="gt-build-cuda99"),
    pytest.param(("ground-truth", "ship", SETTING, "--device", "gpu0"), id="gt-ship-gpu0"),
    pytest.param(("mutants", "--device", "cuda:99"), id="mutants-cuda99"),
    pytest.param(("paper", "--device", "gpu0"), id="paper-gpu0"),
])
def test_bad_device_is_a_usage_error_naming_the_option(tmp_path, args):
    res = cli(*args, cwd=tmp_path, env={"INFLUENCE_BENCH_CACHE": str(tmp_path / "cache")})
    assert_clear_error(res, "--device", args[-1], rc=2)
    assert not any(tmp_path.iterdir()), "something ran before the option was checked"


@pytest.mark.fault("bad-input", "clear-error")
@pytest.mark.parametrize("args", [
    ("ground-truth", "build", SETTING, "--chunk", "0"),
    ("ground-truth", "build", SETTING, "--chunk", "-1"),
    ("ground-truth", "build", SETTING, "--workers", "0"),
    ("ground-truth", "verify", SETTING, "--sample", "0"),
    ("ground-truth", "verify", SETTING, "--seed", "-1"),
    ("ground-truth", "verify", SETTING, "--tol", "nan"),
    ("ground-truth", "ship", SETTING, "--chunk", "0"),
    ("ground-truth", "ship", SETTING, "--sample", "0"),
    ("bench", "ground-truth", SETTING, "--n", "0"),
    ("bench", "ground-truth", SETTING, "--rtol", "-1"),
], ids=lambda a: "-".join(a[:2] + a[-2:]).replace("--", ""))
def test_bad_number_is_a_usage_error_naming_the_option(tmp_path, args):
    extra = ("--root", str(tmp_path)) if args[0] == "ground-truth" and args[1] != "ship" else \
        ("--out", str(tmp_path)) if args[1] == "ship" else ("--json", str(tmp_path / "b.json"))
    res = cli(*args, *extra)
    assert_clear_error(res, args[-2], rc=2)
    assert not any(tmp_path.iterdir()), "something ran before the option was checked"


# ---- files -----------------------------------------------------------------------------------------

def _valid_npz_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "valid.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 255, (64, 28, 28), dtype=np.uint8), y_train=np.arange(64) % 10,
             x_test=rng.integers(0, 255, (16, 28, 28), dtype=np.uint8), y_test=np.arange(16) % 10)
    return path.read_bytes()


class _Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


@pytest.mark.fault("hostile-input", "clear-error")
@pytest.mark.parametrize("kind", ["truncated", "pickled-objects", "pickle-not-npz", "keys-missing"])
def test_corrupt_dataset_file_is_named_and_nothing_unpickled(tmp_path, kind):
    data, marker = tmp_path / "data", tmp_path / "MARKER"
    data.mkdir()
    npz = data / "mnist.npz"
    if kind == "truncated":
        npz.write_bytes(_valid_npz_bytes(tmp_path)[:3000])
    elif kind == "pickled-objects":
        obj = np.array([_Payload(marker)] * 2, dtype=object)
        np.savez(npz, x_train=obj, y_train=np.zeros(2), x_test=obj, y_test=np.zeros(2))
    elif kind == "pickle-not-npz":
        import pickle

        npz.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        np.savez(npz, x=np.zeros(3))
    res = cli("ground-truth", "info", "mnist5k-logreg-wd1e-3", "--root", str(tmp_path / "gt"),
              env={"INFLUENCE_BENCH_DATA": str(data), "INFLUENCE_BENCH_CACHE": str(tmp_path / "cache")})
    assert not marker.exists(), "a pickle in the dataset file was unpickled (its code ran)"
    assert_clear_error(res, str(npz), "data prepare mnist", rc=1)


@pytest.mark.fault("hostile-input", "clear-error")
def test_weights_file_with_code_is_refused_in_one_line_and_not_run(tmp_path):
    marker, weights = tmp_path / "MARKER", tmp_path / "evil.pt"
    torch.save({"w": _Payload(marker)}, weights)
    res = cli("ground-truth", "info", SETTING, "--root", str(tmp_path / "gt"),
              env={"INFLUENCE_BENCH_INIT_WEIGHTS_IRIS_LOGREG_WD1E_3": str(weights),
                   "INFLUENCE_BENCH_CACHE": str(tmp_path / "cache")})
    assert not marker.exists(), "the weights file's pickle ran"
    assert_clear_error(res, str(weights), "refused", "exec", rc=1)
    assert len([ln for ln in res.err.splitlines() if ln.strip()]) <= 2, res.err


def _small_run(tmp_path: Path) -> Path:
    doc = json.loads((ROOT / "results" / "baseline.json").read_text())
    doc["cases"] = doc["cases"][:4]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.fault("storage", "clear-error")
def test_disk_full_names_the_file_being_written(tmp_path, monkeypatch):
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the kernel says it: no file name

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    out = tmp_path / "floors.toml"
    res = cli("baseline", "floors", str(ROOT / "results" / "baseline.json"), "--out", str(out))
    assert_clear_error(res, str(out), "no space left", rc=1)


@pytest.mark.fault("hostile-input", "clear-error")
def test_out_path_through_a_file_is_named(tmp_path):
    run = _small_run(tmp_path)
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / ".." / "base.json"
    res = cli("baseline", "update", str(run), "--out", str(out))
    assert_clear_error(res, "afile")
    assert not (tmp_path / "base.json").exists()


@pytest.mark.fault("hostile-input", "clear-error")
@pytest.mark.parametrize("args", [
    ("score", "exact", "--settings", "../../../tmp/escape"),
    ("score", "../../../tmp/escape", "--settings", SETTING),
    ("ground-truth", "build", "iris-logreg-wd1e-3/../../../escape-h5"),
    ("ground-truth", "verify", "../escape"),
], ids=["score-setting", "score-estimator", "gt-build-horizon", "gt-verify"])
def test_path_escaping_names_are_unknown_names(tmp_path, args):
    res = cli(*args, cwd=tmp_path, env={"INFLUENCE_BENCH_CACHE": str(tmp_path / "cache")})
    assert_clear_error(res, "unknown", rc=2)
    assert not (tmp_path / "cache").exists() and not list(tmp_path.parent.glob("escape*"))


# ---- the process: pipes, Ctrl-C, --debug, the unexpected -------------------------------------------

@pytest.mark.fault("process", "handled")
def test_stdout_closed_by_the_reader_ends_quietly():
    r, w = os.pipe()
    os.close(r)  # `... | head` that has already gone
    try:
        proc = subprocess.run([sys.executable, "-m", "influence_bench.cli", "compare", "results/baseline.json",
                               "--baseline", "results/baseline.json"], cwd=ROOT, stdout=w, stderr=subprocess.PIPE,
                              text=True, env=_env(), timeout=300)
    finally:
        os.close(w)
    if "Traceback" in proc.stderr or "BrokenPipeError" in proc.stderr:
        raise BareTraceback(proc.stderr[-3000:])
    assert proc.returncode == 141 and proc.stderr.strip() == "", (proc.returncode, proc.stderr)


@pytest.mark.fault("process", "clear-error")
def test_keyboard_interrupt_is_one_line_and_exit_130(monkeypatch):
    from influence_bench.spec import catalog

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(catalog, "select", interrupted)
    try:
        res = cli("list", "settings")
    except KeyboardInterrupt:
        raise BareTraceback("KeyboardInterrupt escaped main()") from None
    assert_clear_error(res, "interrupted", rc=130, max_lines=1)


@pytest.mark.fault("process", "clear-error")
def test_ctrl_c_inside_an_exec_of_a_string_still_exits_130_under_python_m(tmp_path):
    """The deterministic form of a Ctrl-C that lands while torch imports (inside a dataclass's
    exec): CPython marks it unhandled although main() caught it, and `python -m` then killed
    itself with SIGINT (exit -2) after printing the one line."""
    import signal

    (tmp_path / "ctrl_c_in_exec.py").write_text(textwrap.dedent("""
        import importlib
        import sys
        m = importlib.import_module("influence_bench.cli.main")
        m.check_parsed = lambda args: exec("raise KeyboardInterrupt", {})
        sys.exit(m.main(["list", "settings"]))
    """))
    proc = subprocess.run([sys.executable, "-m", "ctrl_c_in_exec"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert_clear_error(Result(proc.returncode, proc.stdout, proc.stderr), "interrupted", rc=130, max_lines=1)


@pytest.mark.fault("process", "clear-error")
@pytest.mark.parametrize("after", [2.5, 8.0], ids=["while-importing", "while-training"])
def test_sigint_to_a_running_command_is_one_line_and_exit_130(tmp_path, after):
    import signal
    import time

    env = _env(INFLUENCE_BENCH_CACHE=str(tmp_path / "cache"), INFLUENCE_BENCH_SHIPPED_GT="")
    proc = subprocess.Popen([sys.executable, "-m", "influence_bench.cli", "ground-truth", "build",
                             "iris-mlp-d8-w16-wd1e-3", "--root", str(tmp_path / "gt")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert_clear_error(Result(proc.returncode, out, err), "interrupted", rc=130)


@pytest.mark.fault("bad-input", "handled")
@pytest.mark.parametrize("how", ["flag", "flag-after", "env"])
def test_debug_shows_the_traceback(how):
    args = ["score", "no-such-estimator"]
    args = ["--debug", *args] if how == "flag" else [*args, "--debug"] if how == "flag-after" else args
    res = cli(*args, env={"INFLUENCE_BENCH_DEBUG": "1"} if how == "env" else {})
    assert res.rc == 2 and "Traceback (most recent call last)" in res.err and "RegistryError" in res.err, res.err


@pytest.mark.fault("bad-input", "clear-error")
def test_an_unexpected_failure_is_two_lines_pointing_to_debug(monkeypatch):
    from influence_bench.spec import catalog

    def broken(*a, **k):
        raise RuntimeError("Found no NVIDIA driver on your system.\nPlease check that you have an NVIDIA GPU\n...")

    monkeypatch.setattr(catalog, "select", broken)
    res = cli("list", "settings")
    assert_clear_error(res, "RuntimeError", "no NVIDIA driver", "--debug", rc=1, max_lines=2)
    assert len([ln for ln in res.err.splitlines() if ln.strip()]) == 2, res.err


@pytest.mark.fault("bad-input", "clear-error")
def test_usage_error_is_short_not_the_whole_usage():
    res = cli_process("score", "exact", "--protocol", "loo-sideways")
    assert_clear_error(res, "--protocol", "loo-sideways", rc=2)
    assert len([ln for ln in res.err.splitlines() if ln.strip()]) <= 2, res.err
