"""The run journal of a scoring session: started before any compute, gone once the run file is
written, and never left behind as a header-only file when nothing finished."""

from influence_bench.scoring.session import ScoringSession


def test_a_session_that_finished_nothing_leaves_no_file(tmp_path):
    s = ScoringSession()
    run = s.begin(tmp_path, extra={"tier": "smoke"})
    assert run.with_suffix(".jsonl").is_file()  # the journal exists before any compute
    assert s.write_run(tmp_path) is None
    assert list((tmp_path / "runs").iterdir()) == []
