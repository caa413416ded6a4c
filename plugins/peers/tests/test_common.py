"""The adapters' shared helpers: a library's failures become clear errors, a missing library says how to
install it (and fails CI instead of skipping), θ* is handed to a library in a copy of the model."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from influence_bench_peers import common

from influence_bench.errors import EstimatorError, EstimatorUnsupported


@pytest.mark.parametrize("raised", [StopIteration(), ValueError("bad shape [3, 4]"), RuntimeError("dtype\nmismatch")])
def test_a_library_failure_is_an_estimator_error_naming_library_version_call_and_message(raised):
    with pytest.raises(EstimatorError) as info:
        with common.upstream("captum", "Thing.attribute"):
            raise raised
    text = str(info.value)
    assert text.startswith(f"captum {common.library_version('captum')} failed in Thing.attribute: "
                           f"{type(raised).__name__}")
    assert " ".join(str(raised).split()) in text and "\n" not in text
    assert info.value.__cause__ is raised


@pytest.mark.parametrize("raised", [EstimatorUnsupported("Conv2d"), EstimatorError("ours"), KeyboardInterrupt()])
def test_our_own_errors_and_interrupts_pass_through_unchanged(raised):
    with pytest.raises(type(raised)) as info:
        with common.upstream("dattri", "X.y"):
            raise raised
    assert info.value is raised


def test_a_missing_library_is_an_error_that_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(common.LIBRARIES, "nolib", ("no_such_module_xyz", "no-such-dist-xyz",
                                                    "pip install 'influence-bench-peers[nolib]'"))
    with pytest.raises(EstimatorError, match=r"nolib is not installed; install it with: pip install "
                                             r"'influence-bench-peers\[nolib\]'"):
        common.require("nolib")


def test_need_skips_a_missing_library_but_fails_it_under_require_peers(tmp_path):
    (tmp_path / "test_x.py").write_text(textwrap.dedent("""
        from influence_bench_peers import common
        from peer_support import need

        common.LIBRARIES["nolib"] = ("no_such_module_xyz", "no-such-dist-xyz", "pip install nothing")

        def test_it():
            need("nolib")
    """))
    import os

    support = str(common.__file__).rsplit("influence_bench_peers", 1)[0] + "tests"
    env = {**os.environ, "PYTHONPATH": support + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:influence_bench", str(tmp_path)]
    env.pop("INFLUENCE_BENCH_REQUIRE_PEERS", None)
    skipped = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout
    failed = subprocess.run(args, env={**env, "INFLUENCE_BENCH_REQUIRE_PEERS": "1"}, capture_output=True, text=True,
                            cwd=tmp_path)
    assert failed.returncode == 1 and "INFLUENCE_BENCH_REQUIRE_PEERS=1 requires" in failed.stdout, failed.stdout


def test_theta_is_handed_over_in_a_copy_of_the_model():
    from peer_support import context

    ctx = context("iris-mlp-d2-w16-wd1e-3")
    module = common.module_at_theta(ctx)
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    assert torch.equal(flat, ctx.theta) and flat.dtype == ctx.dtype
    own = {id(p) for p in ctx.model.parameters()}
    assert not own & {id(p) for p in module.parameters()}
    theta, own_values = ctx.theta.clone(), [p.detach().clone() for p in ctx.model.parameters()]
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)  # what a library may do to the model it is given
    assert torch.equal(ctx.theta, theta)
    assert all(torch.equal(a, b) for a, b in zip(ctx.model.parameters(), own_values))
    assert not module.training and all(p.requires_grad for p in module.parameters())


def test_as_protocol_signs_scales_and_transposes():
    from peer_support import context

    ctx = context("iris-logreg-wd1e-3")
    raw = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    out = common.as_protocol(raw, ctx, sign=-1.0, scale=0.5, transpose=True)
    assert out.dtype == torch.float64 and out.shape == (2, 3) and torch.equal(out, -0.5 * raw.T.double())


def test_a_librarys_progress_bars_are_quiet_inside_upstream_and_back_after():
    import io

    from tqdm import tqdm

    inside, after = io.StringIO(), io.StringIO()
    with common.upstream("dattri", "X.y"):
        list(tqdm(range(3), file=inside))
    list(tqdm(range(3), file=after))
    assert inside.getvalue() == "" and "3/3" in after.getvalue()
