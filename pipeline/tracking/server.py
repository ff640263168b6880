"""Which MLflow tracking store a job uses, and whether it lets the job in, decided once on the
driver before Ray starts.

    resolve_tracking_uri(run)      (uri, source): run.tracking_uri (the config, or a
                                   `run.tracking_uri=...` override) > $MLFLOW_TRACKING_URI >
                                   sqlite:///<run.output_root>/mlflow.db
    check_tracking_uri(uri, exp)   a real API call to a server (not /health, which MLflow
                                   exempts from its host check): a 403 or 401 becomes one line
                                   naming the URI and the fix; a sqlite store is created
    run_url(uri, exp_id, run_id)   where a user looks at the run
    redact(uri)                    the URI without a password, for printing and tags

The resolved URI is written into the config (`pipeline.runtime.resolve_paths`), so the workers
(which may not see the driver's environment) and the logged config hold the same store.
Credentials are never part of it: MLflow reads MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_INSECURE_TLS and MLFLOW_TRACKING_SERVER_CERT_PATH in
each process itself, and the check below sends what MLflow's client sends (its rules,
re-stated in `_auth` and `_tls`: importing MLflow only to fail fast would cost seconds).
"""

from __future__ import annotations

import base64
import configparser
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse, urlunparse

from pipeline.storage import default_sqlite_uri
from pipeline.tracking import TrackingUnavailableError, check_tracking

if TYPE_CHECKING:
    from pipeline.config import RunConfig

ENV_URI = "MLFLOW_TRACKING_URI"
SOURCE_CONFIG = "run.tracking_uri"
SOURCE_DEFAULT = "default: sqlite under run.output_root"
# The variables MLflow's client reads for a server's credentials (mlflow.utils.credentials).
CREDENTIAL_ENV = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
GET_BY_NAME = "/api/2.0/mlflow/experiments/get-by-name"  # a real API call, unlike /health
HOST_CHECK_MARK = "Invalid Host header"  # MLflow's 403 body (mlflow.server.security_utils)


def env_tracking_uri(environ: Mapping[str, str] = os.environ) -> str:
    """$MLFLOW_TRACKING_URI, '' when unset or blank."""
    return environ.get(ENV_URI, "").strip()


def tracking_source(run: RunConfig, environ: Mapping[str, str] = os.environ) -> str:
    """Where the tracking URI comes from: run.tracking_uri, MLFLOW_TRACKING_URI or the default."""
    if run.tracking_uri:
        return SOURCE_CONFIG
    return ENV_URI if env_tracking_uri(environ) else SOURCE_DEFAULT


def resolve_tracking_uri(
    run: RunConfig, environ: Mapping[str, str] = os.environ
) -> tuple[str, str]:
    """(uri, tracking_source). A relative sqlite path from the environment is made absolute
    here, on the driver: Ray workers run in other directories. Raises ValueError when nothing
    is set and run.output_root is an object-storage URI (no sqlite store can live there)."""
    source = tracking_source(run, environ)
    if source == SOURCE_CONFIG:
        return run.tracking_uri, source
    if source == ENV_URI:
        return _absolute_sqlite(env_tracking_uri(environ)), source
    return default_sqlite_uri(run.output_root, SOURCE_CONFIG), source


def _absolute_sqlite(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db (four slashes: an absolute path)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def redact(uri: str) -> str:
    """`uri` with any password in it replaced by ***, for the console and the run's tags."""
    u = urlparse(uri)
    if not u.password:
        return uri
    host = u.hostname or ""
    netloc = f"{u.username}:***@{host}" + (f":{u.port}" if u.port else "")
    return urlunparse(u._replace(netloc=netloc))


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page: on a server, its URL; on a local store, the command that serves it."""
    if is_server(uri):
        return f"{redact(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {redact(uri)}  (then open run {run_id})"


def check_tracking_uri(uri: str, experiment: str = "Default", timeout_s: float = 10.0) -> None:
    """Fail before any worker starts when the store at `uri` cannot be used by this job. For a
    server: one real API call (look up `experiment` by name) with the credentials MLflow's
    client would send, no retries. Raises TrackingUnavailableError with one line naming the
    URI and the fix."""
    if urlparse(uri).password:
        raise TrackingUnavailableError(
            f"tracking URI {redact(uri)}: take the password out of the URI (it is logged with "
            "the run's config); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    if not is_server(uri):
        check_tracking(uri)  # sqlite: folder created; file: and relative paths refused
        return
    status, body = _get_experiment(uri, experiment, timeout_s)
    if status == 200 or (status == 404 and "RESOURCE_DOES_NOT_EXIST" in body):
        return  # answered as MLflow does: reachable, and this job is let in
    raise TrackingUnavailableError(refusal_message(uri, status, body))


def _get_experiment(uri: str, experiment: str, timeout_s: float) -> tuple[int, str]:
    """(HTTP status, body) of GET experiments/get-by-name with the credentials and TLS settings
    MLflow's client would use, one try. Plain urllib: importing MLflow costs seconds, and the
    point of the check is to fail fast. An auth plugin (MLFLOW_TRACKING_AUTH) or SigV4 only
    MLflow's own client can send: then it sends the request."""
    if os.environ.get("MLFLOW_TRACKING_AUTH") or os.environ.get("MLFLOW_TRACKING_AWS_SIGV4"):
        return _get_with_mlflow(uri, experiment, timeout_s)
    query = urllib.parse.urlencode({"experiment_name": experiment})
    req = urllib.request.Request(f"{uri.rstrip('/')}{GET_BY_NAME}?{query}", headers=_auth())
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=_tls()) as resp:
            return resp.status, resp.read(500).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read(500).decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        raise TrackingUnavailableError(
            f"cannot reach the MLflow tracking server at {redact(uri)} "
            f"({_first_line(getattr(e, 'reason', e))}); start it (cluster/README.md), or set "
            "run.tracking_uri / MLFLOW_TRACKING_URI"
        ) from e


def _auth() -> dict[str, str]:
    """MLflow's rule (mlflow.utils.rest_utils.http_request): basic auth from
    MLFLOW_TRACKING_USERNAME / _PASSWORD (or ~/.mlflow/credentials), else a bearer token."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    stored = configparser.ConfigParser()
    stored.read(Path("~/.mlflow/credentials").expanduser())
    if stored.has_section("mlflow"):
        user = user or stored["mlflow"].get("mlflow_tracking_username")
        password = password or stored["mlflow"].get("mlflow_tracking_password")
    if user and password:
        return {
            "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        }
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _tls() -> ssl.SSLContext:
    """MLFLOW_TRACKING_INSECURE_TLS, _SERVER_CERT_PATH, _CLIENT_CERT_PATH, as MLflow reads them."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("true", "1"):
        return ssl._create_unverified_context()  # noqa: S323 - the user asked for it
    ctx = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"))
    if cert := os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH"):
        ctx.load_cert_chain(cert)
    return ctx


def _get_with_mlflow(uri: str, experiment: str, timeout_s: float) -> tuple[int, str]:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        resp = http_request(
            get_default_host_creds(uri), GET_BY_NAME, "GET", max_retries=0, backoff_factor=0,
            timeout=timeout_s, raise_on_status=False, params={"experiment_name": experiment},
        )  # fmt: skip
    except (MlflowException, OSError) as e:
        raise TrackingUnavailableError(
            f"cannot reach the MLflow tracking server at {redact(uri)} ({_first_line(e)})"
        ) from e
    return resp.status_code, resp.text[:500]


def refusal_message(uri: str, status: int, body: str) -> str:
    """One line for a server that answered but did not let the job in: what it said and what
    to change, on the server or in this job's environment."""
    host = urlparse(uri).netloc.rsplit("@", 1)[-1]
    said = f"MLflow server {redact(uri)} answered {status}"
    if status == 403 and HOST_CHECK_MARK in body:
        return (
            f"{said} ({HOST_CHECK_MARK}): the server does not accept the name {host}; add it "
            f"to the server's --allowed-hosts (or MLFLOW_SERVER_ALLOWED_HOSTS), as "
            "cluster/mlflow-server.yaml does for its service names"
        )
    if status == 401:
        have = [k for k in CREDENTIAL_ENV if os.environ.get(k)]
        sent = f"sent {', '.join(have)}" if have else "sent no credentials"
        return (
            f"{said} (unauthorized; {sent}): set MLFLOW_TRACKING_TOKEN, or "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, for this job"
        )
    if status == 403:
        return (
            f"{said} (forbidden: {_first_line(body)}): the credentials in "
            "MLFLOW_TRACKING_TOKEN / MLFLOW_TRACKING_USERNAME lack permission on this server"
        )
    return f"{said} to an MLflow API call ({_first_line(body)}): is {uri} an MLflow server?"


def _first_line(x: object) -> str:
    text = " ".join(str(x).split())
    return text[:200] or "no message"
