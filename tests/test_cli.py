import json
import os
import subprocess
import sys

from influence_bench.cli.main import main


def test_list_estimators_and_settings(capsys):
    assert main(["list", "estimators"]) == 0
    out = capsys.readouterr().out
    assert "exact" in out and "gradient-dot" in out
    assert main(["list", "settings"]) == 0
    out = capsys.readouterr().out
    for sid in ["iris-logreg-wd1e-3", "mnist5k-logreg-wd1e-3"] + [f"iris-mlp-d{d}-w16-wd1e-3" for d in (1, 2, 3, 4, 6, 8)]:
        assert sid in out


def test_score_prints_table_and_writes_results(tmp_path, capsys):
    rc = main(["score", "exact", "--settings", "iris-logreg-*", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "iris-logreg-wd1e-3" in out and "loo-fixed" in out and "pass" in out
    runs = list((tmp_path / "runs").glob("run-*.json"))
    assert len(runs) == 1 and f"results written to {runs[0]}" in out
    cases = json.loads(runs[0].read_text())["cases"]
    assert {c["setting"] for c in cases} == {"iris-logreg-wd1e-3"}


def test_unknown_names_exit_2_with_suggestions(capsys):
    assert main(["score", "exakt"]) == 2
    assert "Did you mean: exact" in capsys.readouterr().err
    assert main(["score", "exact", "--settings", "iris-logreg-wd1e3"]) == 2
    assert "Did you mean: iris-logreg-wd1e-3" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "influence-bench")
    assert os.path.exists(exe), "install the package (pip install -e .) to get the console script"
    out = subprocess.run([exe, "list", "estimators"], capture_output=True, text=True, check=True).stdout
    assert "exact" in out


def test_option_values_are_checked_before_anything_runs(capsys):
    import pytest

    for argv, option in ((["score", "exact", "--device", "gpu0"], "--device"),
                         (["ground-truth", "build", "iris-logreg-wd1e-3", "--chunk", "0"], "--chunk"),
                         (["ground-truth", "verify", "iris-logreg-wd1e-3", "--sample", "-2"], "--sample"),
                         (["bench", "ground-truth", "iris-logreg-wd1e-3", "--rtol", "inf"], "--rtol")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {option}:" in err and len(err.strip().splitlines()) == 2, err


def test_device_check():
    import argparse

    import pytest
    import torch

    from influence_bench.cli.options import device

    assert device("cpu") == "cpu"
    for bad in ("gpu0", "cuda:99", "", "tpu"):
        with pytest.raises(argparse.ArgumentTypeError):
            device(bad)
    if torch.cuda.is_available():
        assert device("cuda") == "cuda" and device("cuda:0") == "cuda:0"
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="no usable CUDA device"):
            device("cuda")


def test_failures_are_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("INFLUENCE_BENCH_DEBUG", raising=False)
    assert main(["score", "no-such-estimator"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("influence-bench: unknown estimator 'no-such-estimator'") and "Traceback" not in err
    assert main(["--debug", "score", "no-such-estimator"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
