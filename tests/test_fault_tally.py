"""The fault suite's tally (tests/faults/tally.py) counts the same serially and under pytest-xdist,
where the controller runs no test and counts what its workers report, failures included."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CONFTEST = '''
import pytest
from faults.tally import pytest_runtest_logreport, pytest_runtest_makereport, pytest_terminal_summary  # noqa


def pytest_configure(config):
    config.addinivalue_line("markers", "fault(category, expect): one injected fault")
'''

SUITE = '''
import pytest
from faults.support import SilentWrong


@pytest.mark.fault("bad-input", "clear-error")
def test_handled():
    pass


@pytest.mark.fault("storage", "recovered")
def test_recovered():
    pass


@pytest.mark.fault("gate", "handled")
def test_silently_wrong():
    raise SilentWrong("pretend a result is wrong")


@pytest.mark.fault("process", "handled")
def test_skipped():
    pytest.skip("pretend")
'''


@pytest.mark.parametrize("extra", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_the_tally_counts_every_fault_and_its_ending(tmp_path, extra):
    if extra:
        pytest.importorskip("xdist")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_injected.py").write_text(SUITE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr  # the silent wrong result fails its test
    line = next(x for x in res.stdout.splitlines() if x.startswith("faults injected:"))
    counts = dict(re.findall(r"([a-z ]+): (\d+)", line.replace(";", ",").replace("(", ", ").replace(")", "")))
    counts = {k.strip(): int(v) for k, v in counts.items()}
    assert counts["faults injected"] == 4 and counts["silent wrong results"] == 1
    assert counts["handled with a clear error"] == 1 and counts["recovered"] == 1 and counts["skipped"] == 1
    assert counts["handled"] == 0 and counts["bare tracebacks"] == 0 and counts["other failures"] == 0
