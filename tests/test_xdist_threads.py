"""Under pytest-xdist each worker computes with its share of the cores (``share_cores_among_workers``)."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from influence_bench.pytest_plugin import share_cores_among_workers

ROOT = Path(__file__).parents[1]


def test_a_worker_gets_its_share_and_a_users_setting_or_a_plain_session_is_left_alone(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert share_cores_among_workers(SimpleNamespace(workerinput={"workercount": 3})) == 2
        assert os.environ["OMP_NUM_THREADS"] == "2" and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert share_cores_among_workers(SimpleNamespace(workerinput={"workercount": 16})) == 1  # at least 1
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        assert share_cores_among_workers(SimpleNamespace(workerinput={"workercount": 2})) is None  # user's OMP set
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert share_cores_among_workers(SimpleNamespace()) is None  # not a worker
        assert "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_pytest_n_2_workers_and_the_processes_they_start_use_their_share(tmp_path):
    (tmp_path / "test_probe.py").write_text(
        "import os, subprocess, sys, torch\n"
        "def test_probe_a():\n    _check()\n"
        "def test_probe_b():\n    _check()\n"
        "def _check():\n"
        "    share = str(max(1, (os.cpu_count() or 1) // 2))\n"
        "    child = subprocess.run([sys.executable, '-c', 'import torch; print(torch.get_num_threads())'],\n"
        "                           capture_output=True, text=True, check=True).stdout.strip()\n"
        "    assert (str(torch.get_num_threads()), os.environ.get('OMP_NUM_THREADS'), child) == (share,) * 3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "OMP_NUM_THREADS"))}
    res = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "2 passed" in res.stdout, res.stdout + res.stderr
