"""Which tracking store a job uses (run.tracking_uri > MLFLOW_TRACKING_URI > sqlite under the
output root) and the start-up check that asks a server a real API question: a real `mlflow
server` that does not list the job's host name (403), and a loopback stand-in for an
authenticating proxy (401), each stop the job in one line naming the fix, exit 2, before Ray."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.runtime import resolve_paths
from pipeline.tracking import TrackingUnavailableError
from pipeline.tracking.server import (
    ENV_URI,
    SOURCE_CONFIG,
    SOURCE_DEFAULT,
    check_tracking_uri,
    redact,
    resolve_tracking_uri,
    run_url,
)
from servers import free_port, stop_group, wait_http

REPO = Path(__file__).resolve().parents[1]


# ---- precedence: unit tier ------------------------------------------------------------------


def test_config_beats_environment_beats_default(tmp_path):
    env = {ENV_URI: "http://mlflow.default.svc.cluster.local:5000"}
    explicit = RunConfig(tracking_uri="http://other:5000", output_root=str(tmp_path))
    assert resolve_tracking_uri(explicit, env) == ("http://other:5000", SOURCE_CONFIG)
    unset = RunConfig(output_root=str(tmp_path))
    assert resolve_tracking_uri(unset, env) == (env[ENV_URI], ENV_URI)
    assert resolve_tracking_uri(unset, {ENV_URI: "  "}) == (
        f"sqlite:///{tmp_path}/mlflow.db",
        SOURCE_DEFAULT,
    )


def test_relative_sqlite_from_the_environment_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri, _ = resolve_tracking_uri(RunConfig(), {ENV_URI: "sqlite:///runs/m.db"})
    assert uri == f"sqlite:///{tmp_path}/runs/m.db"  # Ray workers run in other directories


def test_resolved_once_into_the_config_the_workers_get(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_URI, "http://127.0.0.1:5999")
    cfg = load_config(None, ["data.train_shards=x.tar", f"run.output_root={tmp_path}"])
    assert cfg.run.tracking_uri == ""  # the loaded config: what the user wrote
    assert resolve_paths(cfg).run.tracking_uri == "http://127.0.0.1:5999"
    cfg = load_config(None, ["data.train_shards=x.tar", "run.tracking_uri=sqlite:////t/a.db"])
    assert resolve_paths(cfg).run.tracking_uri == "sqlite:////t/a.db"  # the override wins


def test_object_storage_root_needs_a_uri_from_config_or_environment(monkeypatch):
    args = ["data.train_shards=s3://b/x.tar", "run.output_root=s3://b/out"]
    monkeypatch.delenv(ENV_URI, raising=False)
    with pytest.raises(ConfigError, match=r"tracking_uri must be set \(or MLFLOW_TRACKING_URI\)"):
        load_config(None, args)
    monkeypatch.setenv(ENV_URI, "http://mlflow:5000")
    assert resolve_paths(load_config(None, args)).run.tracking_uri == "http://mlflow:5000"


def test_run_url_and_redaction():
    assert (
        run_url("http://mlflow:5000/", "3", "abc") == "http://mlflow:5000/#/experiments/3/runs/abc"
    )
    assert run_url("sqlite:////o/mlflow.db", "3", "abc").startswith(
        "mlflow ui --backend-store-uri sqlite:////o/mlflow.db"
    )
    assert redact("https://u:s3cret@host:443/x") == "https://u:***@host:443/x"
    with pytest.raises(TrackingUnavailableError, match="MLFLOW_TRACKING_PASSWORD") as err:
        check_tracking_uri("https://u:s3cret@host:443")
    assert "s3cret" not in str(err.value)


# ---- a real server that does not know the job's host name: 403 ------------------------------


@pytest.fixture(scope="module")
def server_without_the_host(tmp_path_factory):
    """`mlflow server` with its default allowed hosts (localhost, private IPs), listening on
    127.0.0.2: a loopback address outside that list, as a Kubernetes service name is."""
    folder = tmp_path_factory.mktemp("mlflow-403")
    port = free_port()
    cmd = ["mlflow", "server", "--host", "127.0.0.2", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]  # fmt: skip
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, cwd=folder, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.2:{port}/health", 240, proc)
        yield f"http://127.0.0.2:{port}"
    finally:
        stop_group(proc)


@pytest.mark.integration
def test_host_check_refusal_stops_the_job_in_one_line_before_ray(server_without_the_host, tmp_path):
    uri = server_without_the_host
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"")  # named, never read: the job must stop before any data is opened
    # The URI comes from the environment, as a pod's would; the health endpoint answers 200.
    env = os.environ | {ENV_URI: uri, "RAY_ADDRESS": ""}
    done = subprocess.run(
        [sys.executable, "-m", "jobs.pretrain", f"data.train_shards={shard}",
         f"run.output_root={tmp_path / 'out'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"MLflow server {uri} answered 403" in lines[0]
    assert "--allowed-hosts" in lines[0] and uri.removeprefix("http://") in lines[0]
    assert "Ray" not in done.stdout and not (tmp_path / "out").exists()


# ---- an authenticating proxy's answer: 401 ----------------------------------------------------


class _Unauthorized(BaseHTTPRequestHandler):
    """Answers every request 401 as an auth proxy (or MLflow's basic-auth app) does, and keeps
    the Authorization header it was sent."""

    seen: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).seen.append(self.headers.get("Authorization"))
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture()
def auth_proxy():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    _Unauthorized.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Unauthorized.seen
    server.shutdown()
    server.server_close()


@pytest.mark.integration  # a server, if a tiny one in a thread
def test_unauthorized_names_the_credential_variables(auth_proxy, monkeypatch):
    uri, seen = auth_proxy
    for k in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(TrackingUnavailableError) as err:
        check_tracking_uri(uri, "exp")
    msg = str(err.value)
    assert f"MLflow server {uri} answered 401" in msg and "sent no credentials" in msg
    assert "MLFLOW_TRACKING_TOKEN" in msg and "MLFLOW_TRACKING_USERNAME" in msg
    assert seen == [None]  # one request, no retries

    # The check sends what MLflow's client sends: basic auth from the two variables ...
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(TrackingUnavailableError, match="sent MLFLOW_TRACKING_USERNAME"):
        check_tracking_uri(uri, "exp")
    assert seen[-1] == "Basic " + base64.b64encode(b"alice:wrong").decode()
    # ... or a bearer token.
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-1")
    with pytest.raises(TrackingUnavailableError, match="sent MLFLOW_TRACKING_TOKEN"):
        check_tracking_uri(uri, "exp")
    assert seen[-1] == "Bearer tok-1"


@pytest.mark.integration
def test_unauthorized_ends_the_cli_with_exit_2(auth_proxy, tmp_path, capsys, monkeypatch):
    from jobs.pretrain import cli

    uri, _ = auth_proxy
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"")  # never read: the check stops the job first
    with pytest.raises(SystemExit) as done:
        cli([f"data.train_shards={shard}", f"run.tracking_uri={uri}",
             f"run.output_root={tmp_path / 'out'}"])  # fmt: skip
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "answered 401" in err[0] and "MLFLOW_TRACKING_TOKEN" in err[0]


@pytest.mark.integration
def test_credentials_file_is_read_as_mlflow_reads_it(auth_proxy, tmp_path, monkeypatch):
    uri, seen = auth_proxy
    for k in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow" / "credentials").write_text(
        "[mlflow]\nmlflow_tracking_username = bob\nmlflow_tracking_password = pw\n"
    )
    with pytest.raises(TrackingUnavailableError, match="answered 401"):
        check_tracking_uri(uri, "exp")
    assert seen == ["Basic " + base64.b64encode(b"bob:pw").decode()]
