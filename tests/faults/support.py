"""What the fault suite's tests share: running the command line in-process (fast) or in a
subprocess (signals, kills), and the three ways a fault can go wrong, each its own exception so the
tally (``conftest.py``) can count it.

Every test in ``tests/faults`` injects one fault and is marked
``@pytest.mark.fault(category, expect)``: ``category`` is one of ``CATEGORIES``, ``expect`` what
a correct harness does with it: ``"clear-error"`` (one or two lines naming the thing, nonzero exit),
``"handled"`` (the run goes on and records the fault where it belongs, e.g. an ``error`` case) or
``"recovered"`` (the fault is repaired: a cache recomputed, a run resumed).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CATEGORIES = ("bad-plugin", "bad-input", "process", "storage", "hostile-input", "concurrency", "gate")
EXPECT = ("clear-error", "handled", "recovered")


class BareTraceback(AssertionError):
    """A traceback reached the user where a sentence was due."""


class SilentWrong(AssertionError):
    """A wrong result or exit status with nothing said."""


class ResultsLost(AssertionError):
    """Finished work (cases, ground truth, a run file) did not survive the fault."""


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def cli(*argv: str, cwd: Path | None = None, env: dict | None = None) -> Result:
    """``influence-bench ARGV`` in this process (no interpreter start-up): stdout, stderr and the
    exit status. An exception escaping ``main`` is a bare traceback."""
    from influence_bench.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    try:
        if cwd is not None:
            os.chdir(cwd)
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(argv))
            except SystemExit as exc:  # argparse usage errors
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - exactly what must not happen
                raise BareTraceback(f"influence-bench {' '.join(argv)} raised {type(exc).__name__}: {exc}\n"
                                    f"stdout:\n{out.getvalue()[-2000:]}\nstderr:\n{err.getvalue()[-2000:]}") from exc
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    return Result(int(rc or 0), out.getvalue(), err.getvalue())


def cli_process(*argv: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
                **popen) -> Result:
    """``influence-bench ARGV`` in a new Python process (signals, kills, exit statuses)."""
    proc = subprocess.run([sys.executable, "-m", "influence_bench.cli", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, **popen)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_clear_error(res: Result, *names: str, rc: int | None = None, max_lines: int = 3) -> None:
    """Nonzero exit (``rc`` when given), no traceback, at most ``max_lines`` lines on stderr of which
    one names every string in ``names``."""
    if "Traceback (most recent call last)" in res.text:
        raise BareTraceback(f"traceback printed (exit {res.rc}):\n{res.err[-3000:]}")
    if res.rc == 0:
        raise SilentWrong(f"exit 0 where an error was due; stdout:\n{res.out[-1500:]}\nstderr:\n{res.err[-1500:]}")
    if rc is not None and res.rc != rc:
        raise SilentWrong(f"exit {res.rc}, expected {rc}; stderr:\n{res.err[-1500:]}")
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "rror" in ln or "influence-bench:" in ln] or lines
    if len(errors) > max_lines:
        raise BareTraceback(f"{len(errors)} lines of error where one or two were due:\n{res.err[-3000:]}")
    missing = [n for n in names if n.lower() not in res.err.lower()]
    if missing:
        raise AssertionError(f"the message does not name {missing}:\n{res.err[-2000:]}")
