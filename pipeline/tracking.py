"""MLflow at the edges: reachability, one run per pretraining, one way a run ends
(`tracked_run`), rank-0 logging.

Everything here takes an explicit tracking URI: MLflow 3 otherwise writes `mlflow.db` into the
current directory, and Ray workers run in other directories. Nothing touches MLflow's global
state (`mlflow.set_tracking_uri`), so several runs can log from one process (Tune trials).
"""

from __future__ import annotations

import contextlib
import io
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RUN_NAME_TAG = "ce.run_name"  # ties an MLflow run to the Ray Train run it tracks (for resume)


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store cannot be reached or written."""


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any worker starts, when the tracking store is unusable."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise TrackingUnavailableError(f"MLflow server {uri} answered {resp.status}")
        except (urllib.error.URLError, OSError) as e:
            raise TrackingUnavailableError(
                f"cannot reach the MLflow tracking server at {uri} ({e}); start it with "
                f"`mlflow server --host 127.0.0.1 --port 5000` or set run.tracking_uri"
            ) from e
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingUnavailableError(f"cannot create the MLflow store {db}: {e}") from e
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingUnavailableError(
            f"tracking URI {uri!r}: use sqlite:///ABSOLUTE/PATH.db or http(s)://host:port "
            "(MLflow 3's file store is deprecated, and a relative path breaks in Ray workers)"
        )


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else c.create_experiment(name)


def new_run(uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> str:
    """A new RUNNING run in `experiment` (created if missing); returns its id."""
    exp_id = experiment_id(uri, experiment)
    return client(uri).create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id


def start_or_resume_run(
    uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None
) -> tuple[str, bool]:
    """The MLflow run for Ray Train run `run_name`: the existing one (resume) or a new one.

    Returns (run_id, resumed)."""
    c = client(uri)
    exp_id = experiment_id(uri, experiment)
    found = c.search_runs(
        [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id, True
    return new_run(uri, experiment, run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})}), False


# Ended on purpose, not broken: Ctrl-C, a SIGTERM turned into SystemExit, and Ray Tune stopping
# a trial (its function session leaves the trial's thread through sys.exit).
STOPPED = (KeyboardInterrupt, SystemExit)


@contextlib.contextmanager
def tracked_run(uri: str, run_id: str) -> Iterator[str]:
    """The one place a run ends: FINISHED when the block completes, KILLED when it is stopped
    (STOPPED), FAILED on any other exception, which is re-raised. Yields `run_id`.

    A process killed outright (SIGKILL, a Tune trial's actor torn down) never gets here and
    leaves its run RUNNING: the resume path (`start_or_resume_run`) or the search's clean-up
    closes it."""
    try:
        yield run_id
    except STOPPED:
        end_run(uri, run_id, "KILLED")
        raise
    except BaseException:
        end_run(uri, run_id, "FAILED")
        raise
    end_run(uri, run_id, "FINISHED")


def end_run(uri: str, run_id: str, status: str) -> None:
    """Terminate a run: FINISHED, FAILED or KILLED. Jobs use `tracked_run`, not this."""
    client(uri).set_terminated(run_id, status=status)


class RunLogger:
    """Logs metrics, params, images and files to one MLflow run from one process (rank 0)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self._client = client(uri)

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        # MLflow params are immutable; a resumed run logs only what it has not logged yet.
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):  # the REST API takes at most 100 params a batch
            self._client.log_batch(self.run_id, params=new[i : i + 100])

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def png(self, image, artifact_file: str) -> None:
        """`image`: a PIL image, logged as a PNG artifact at `artifact_file`."""
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        self.bytes(buf.getvalue(), artifact_file)

    def bytes(self, data: bytes, artifact_file: str) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / Path(artifact_file).name
            path.write_bytes(data)
            parent = Path(artifact_file).parent.as_posix()
            self.file(path, None if parent == "." else parent)

    def file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def tag(self, key: str, value: str) -> None:
        self._client.set_tag(self.run_id, key, value)
