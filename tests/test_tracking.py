"""pipeline.tracking's run lifecycle on a real sqlite MLflow store in a temp dir."""

from __future__ import annotations

import pytest

from pipeline.tracking import RUN_NAME_TAG, client, new_run, start_or_resume_run, tracked_run


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def status(uri: str, run_id: str) -> str:
    return client(uri).get_run(run_id).info.status


def test_a_completed_block_finishes_the_run(uri):
    run_id = new_run(uri, "lifecycle", "ok")
    assert status(uri, run_id) == "RUNNING"
    with tracked_run(uri, run_id) as got:
        assert got == run_id
    assert status(uri, run_id) == "FINISHED"
    assert RUN_NAME_TAG not in client(uri).get_run(run_id).data.tags  # new_run adds no tags


def test_an_error_fails_the_run_and_propagates(uri):
    run_id = new_run(uri, "lifecycle", "broken")
    with pytest.raises(ValueError, match="boom"), tracked_run(uri, run_id):
        raise ValueError("boom")
    assert status(uri, run_id) == "FAILED"


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_a_stopped_block_kills_the_run_and_propagates(uri, stop):
    run_id = new_run(uri, "lifecycle", f"stopped-{stop.__name__}")
    with pytest.raises(stop), tracked_run(uri, run_id):
        raise stop()
    assert status(uri, run_id) == "KILLED"


def test_a_resumed_run_is_the_same_run_and_ends_again(uri):
    first, resumed = start_or_resume_run(uri, "lifecycle", "resumable", tags={"k": "v"})
    assert not resumed
    with pytest.raises(KeyboardInterrupt), tracked_run(uri, first):
        raise KeyboardInterrupt
    again, resumed = start_or_resume_run(uri, "lifecycle", "resumable")
    assert resumed and again == first and status(uri, again) == "RUNNING"
    with tracked_run(uri, again):
        pass
    run = client(uri).get_run(again)
    assert run.info.status == "FINISHED"
    assert run.data.tags[RUN_NAME_TAG] == "resumable" and run.data.tags["k"] == "v"


def test_tracked_run_survives_a_server_gone_at_the_end(capsys):
    """A tracking server that is down when the block ends neither fails finished work nor hides
    the block's own error; the attempt is bounded and reported."""
    import socket
    import time

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    t0 = time.perf_counter()
    with tracked_run(uri, "0123abcd") as got:
        assert got == "0123abcd"
    with pytest.raises(ValueError, match="own error"), tracked_run(uri, "0123abcd"):
        raise ValueError("own error")
    assert time.perf_counter() - t0 < 60
    err = capsys.readouterr().err
    assert "could not mark run 0123abcd FINISHED" in err and "FAILED" in err


def test_a_sqlite_store_keeps_artifacts_beside_it(tmp_path, monkeypatch):
    """Not ./mlruns of whatever directory the experiment was created from (MLflow's default)."""
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "out" / "mlflow.db"
    uri = f"sqlite:///{db}"
    run_id = new_run(uri, "exp/1", "r")
    art = client(uri).get_run(run_id).info.artifact_uri
    assert art.startswith(str(db.parent / "mlartifacts" / "exp_1")), art
    assert not (tmp_path / "mlruns").exists()
