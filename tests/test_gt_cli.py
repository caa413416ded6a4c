"""``influence-bench ground-truth build | verify | info`` on iris-logreg-wd1e-3."""

import re

import numpy as np

from influence_bench.api.loading import get_context
from influence_bench.cli.main import main
from influence_bench.groundtruth import Entries, GroundTruthStore, store_key
from influence_bench.spec import catalog

SID = "iris-logreg-wd1e-3"


def test_build_info_verify_and_a_tampered_entry_fails_verify(tmp_path, capsys):
    root = ["--root", str(tmp_path)]
    assert main(["ground-truth", "build", SID, "--chunk", "40", *root]) == 0
    err = capsys.readouterr().err
    assert "40/120 models" in err and re.search(r"models/s, ETA", err) and "120 computed in" in err
    assert main(["ground-truth", "build", SID, "--protocol", "lds", *root]) == 0
    assert main(["ground-truth", "build", SID, "--protocol", "loo-topk", "--estimator", "gradient-dot", *root]) == 0
    assert "0 computed" in capsys.readouterr().err  # loo-fixed already removed every point
    assert main(["ground-truth", "info", SID, *root]) == 0
    out = capsys.readouterr().out
    assert re.search(r"loo .*120 entries in 1 shard\(s\), \d+ bytes, noise ceiling 1.00", out)
    assert re.search(r"lds .*100 entries", out) and str(tmp_path) in out
    assert main(["ground-truth", "verify", SID, "--sample", "4", *root]) == 0
    assert "OK" in capsys.readouterr().out

    # a wrong number with a valid checksum (e.g. written by a buggy engine): verify must catch it
    store, ctx = GroundTruthStore(tmp_path), get_context(catalog.get_setting(SID))
    key = store_key(ctx)
    e = store.load(key)
    ids = np.arange(120)
    bad = e.select(ids)
    bad = Entries(bad.ids, bad.delta * 1.01, bad.grad_norm, bad.steps)
    store.save_chunk(key, bad)
    assert main(["ground-truth", "verify", SID, "--sample", "3", *root]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    root = ["--root", str(tmp_path)]
    assert main(["ground-truth", "build", "iris-lgreg", *root]) == 2
    assert "Did you mean: iris-logreg-wd1e-3" in capsys.readouterr().err
    assert main(["ground-truth", "build", SID, "--protocol", "loo-topk", *root]) == 2
    assert "give --estimator NAME" in capsys.readouterr().err
    assert main(["ground-truth", "verify", SID, *root]) == 2
    assert "no loo ground truth stored" in capsys.readouterr().err


def test_score_with_the_lds_protocol(tmp_path, capsys):
    rc = main(["score", "exact", "--settings", SID, "--protocol", "lds", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    title = next(line for line in out.splitlines() if line.startswith(SID))
    row = next(line.split() for line in out.splitlines() if line.startswith("  ") and " lds " in line)
    assert row[:3] == ["pass", "exact", "lds"] and "loo-fixed" not in out
    assert "noise ceiling 1.00" in title  # the setting's title line carries it
