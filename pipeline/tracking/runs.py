"""MLflow at the edges: reachability, one run per pretraining, one way a run ends
(`tracked_run`), rank-0 logging.

Everything here takes an explicit tracking URI: MLflow 3 otherwise writes `mlflow.db` into the
current directory, and Ray workers run in other directories. Nothing touches MLflow's global
state (`mlflow.set_tracking_uri`), so several runs can log from one process (Tune trials).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.tracking.queue import TrackingQueue
from pipeline.tracking.send import MlflowSender, is_permanent
from pipeline.tracking.spool import Spool

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
    """The experiment `name` in the store at `uri`, created if missing."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=_artifact_location(uri, name))


def _artifact_location(uri: str, name: str) -> str | None:
    """Beside a sqlite store: MLflow's default for one is ./mlruns in whatever directory the
    experiment happens to be created from (a job's, a test's), outside run.output_root. A
    server (http) decides itself (--artifacts-destination)."""
    if not uri.startswith("sqlite:///"):
        return None
    folder = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / folder)


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
        _close_run(uri, run_id, "KILLED")
        raise
    except BaseException:
        _close_run(uri, run_id, "FAILED")
        raise
    _close_run(uri, run_id, "FINISHED")


def _close_run(uri: str, run_id: str, status: str) -> None:
    """end_run with MLflow's HTTP retries bounded, and never raising: the work the block did
    (a finished training run, its checkpoints) must not be failed, nor its own error hidden, by
    a tracking server that is down at the very end. The run then stays RUNNING in MLflow and the
    next resume of it (start_or_resume_run) or `mlflow` itself can close it."""
    before = _set_env(BOUNDED_HTTP_ENV | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"})
    try:
        end_run(uri, run_id, status)
    except Exception as e:  # noqa: BLE001 - any client error: report, never mask the outcome
        print(f"[tracking] could not mark run {run_id} {status} at {uri} ({type(e).__name__}: "
              f"{e}); it stays RUNNING there", file=sys.stderr, flush=True)  # fmt: skip
    finally:
        _set_env(before)


def end_run(uri: str, run_id: str, status: str) -> None:
    """Terminate a run: FINISHED, FAILED or KILLED. Jobs use `tracked_run`, not this."""
    client(uri).set_terminated(run_id, status=status)


def log_shards_input(uri: str, run_id: str, shards: str, context: str) -> str:
    """Log a shard set as a dataset input of the run (MLflow's "Datasets" column): its source is
    the folder of the first shard, its digest a sha256 of the expanded shard URLs and of the
    manifest.json beside them, so runs on the same data show the same digest. `context`: "train"
    or "validation". Returns the digest."""
    import hashlib
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    from pipeline.data import expand_urls
    from pipeline.data.manifest import MANIFEST
    from pipeline.data.open import read_beside

    urls = expand_urls(shards)
    h = hashlib.sha256("\n".join(urls).encode())
    for folder in sorted({u.rsplit("/", 1)[0] for u in urls}):
        h.update(read_beside(f"{folder}/x", MANIFEST) or b"no manifest")
    digest = h.hexdigest()[:16]
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": same class twice
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(urls[0].rsplit("/", 1)[0])
    name = f"{context}_shards"
    dataset = MetaDataset(source, name=name, digest=digest)._to_mlflow_entity()
    tags = [InputTag("mlflow.data.context", context), InputTag("ce.shards", shards[:5000]),
            InputTag("ce.num_shards", str(len(urls)))]  # fmt: skip
    client(uri).log_inputs(run_id, datasets=[DatasetInput(dataset, tags=tags)])
    return digest


# MLflow's HTTP client retries a request for minutes by default (7 retries, 120 s timeout). The
# sender thread backs off on its own, so each of its requests gets one short try. Environment
# variables are per process: a worker's asynchronous RunLogger sets them while it is open.
BOUNDED_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
SPOOL_DIR = "tracking_spool"  # under the run's output root
REPLAY_COMMAND = "python -m jobs.replay_tracking --tracking-uri {uri} --spool-dir {dir}"


def spool_dir(output_root: str | Path) -> Path:
    """Where rank 0 keeps what it could not send to the tracking server yet: a local folder
    (for an object-storage output root, its local mirror: pipeline.storage.local_root)."""
    from pipeline.storage import local_root

    return local_root(str(output_root)) / SPOOL_DIR


class RunLogger:
    """Logs metrics, params, images and files to one MLflow run from one process (rank 0).

    Without `spool_dir` every call is synchronous (job-level, one-shot logging). With it, every
    call returns at once: entries go through a `TrackingQueue` whose sender thread survives a
    tracking-server outage, keeping what it cannot send in `<spool_dir>/<run_id>.jsonl` and
    sending it, in order and exactly once, when the server is back or when a logger for the
    same run opens that spool again. Call `close` at the end (it bounds the final flush).

    One process at a time sends a run's spool: the logger takes its lock, waiting at most
    `lock_wait_s` for another holder (a replay), then raises `SpoolBusyError`. A spool that
    cannot be written (a full disk) costs entries, counted and reported, never the run."""

    def __init__(
        self,
        uri: str,
        run_id: str,
        spool_dir: str | Path | None = None,
        *,
        max_memory: int = 1000,
        max_backoff_s: float = 10.0,
        lock_wait_s: float = 600.0,
        spool_retry_s: float = 2.0,
    ) -> None:
        self.uri, self.run_id = uri, run_id
        self._client = client(uri)
        self._queue: TrackingQueue | None = None
        self._monitor: SystemMetrics | None = None
        self.last_step = 0
        if spool_dir is not None:
            self.spool = Spool(spool_dir, run_id, lock=True, wait_s=lock_wait_s)
            self._saved_env = _set_env(BOUNDED_HTTP_ENV)
            self._queue = TrackingQueue(
                MlflowSender(self._client, run_id), self.spool, is_permanent=is_permanent,
                max_memory=max_memory, max_backoff_s=max_backoff_s, spool_retry_s=spool_retry_s,
            )  # fmt: skip

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        if self._queue is not None:  # the sender skips keys the run already has
            items = [(k, str(v)) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self._queue.put("params", params=dict(items[i : i + 100]))
            return
        existing = self._client.get_run(self.run_id).data.params
        # MLflow params are immutable; a resumed run logs only what it has not logged yet.
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):  # the REST API takes at most 100 params a batch
            self._client.log_batch(self.run_id, params=new[i : i + 100])

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.last_step = step
        if self._queue is not None:
            self._queue.put("metrics", rows=[[k, float(v), now, step] for k, v in metrics.items()])
            return
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def png(self, image, artifact_file: str) -> None:
        """`image`: a PIL image, logged as a PNG artifact at `artifact_file`."""
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        self.bytes(buf.getvalue(), artifact_file)

    def image(self, image, key: str, step: int) -> None:
        """`image`: a PIL image, logged as step `step` of the image series `key` (MLflow's UI
        shows a step slider)."""
        ts = int(time.time() * 1000)
        if self._queue is None:
            self._client.log_image(self.run_id, image, key=key, step=step, timestamp=ts)
            return
        path = self._staged(f"{key.replace('/', '_')}.png", lambda p: image.save(p, format="PNG"))
        if path is not None:
            self._queue.put("image", file=str(path), key=key, step=step, ts=ts)

    def bytes(self, data: bytes, artifact_file: str) -> None:
        import tempfile

        if self._queue is not None:
            path = self._staged(Path(artifact_file).name, lambda p: p.write_bytes(data))
            if path is not None:
                self._put_artifact(path, artifact_file)
            return
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / Path(artifact_file).name
            path.write_bytes(data)
            parent = Path(artifact_file).parent.as_posix()
            self.file(path, None if parent == "." else parent)

    def file(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._queue is not None:
            # A copy: the caller's file (often in a temporary folder) may be gone by send time.
            staged = self._staged(Path(path).name, lambda p: shutil.copyfile(path, p))
            if staged is not None:
                self._queue.put("artifact", file=str(staged), artifact_path=artifact_path)
            return
        self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def _staged(self, name: str, write) -> Path | None:
        """A payload written into the spool's folder; None (the entry counted as lost) when the
        disk refuses it: a full disk costs that image or file, never the training step."""
        path = None
        try:
            path = self._queue.stage(name)
            write(path)
            return path
        except OSError as e:
            if path is not None:
                self._queue.unstage(str(path))
            self._queue.lose(1, f"cannot write {name} into {self.spool.files} ({e})")
            return None

    def _put_artifact(self, staged: Path, artifact_file: str) -> None:
        parent = Path(artifact_file).parent.as_posix()
        artifact_path = None if parent == "." else parent
        self._queue.put("artifact", file=str(staged), artifact_path=artifact_path)

    def tag(self, key: str, value: str) -> None:
        if self._queue is not None:
            self._queue.put("tags", tags={key: str(value)})
            return
        self._client.set_tag(self.run_id, key, value)

    def system_metrics(self, interval_s: float) -> None:
        """Sample CPU, memory, disk, network (and GPU where present) every `interval_s` seconds
        as `system/...` metrics at the current training step, through this logger."""
        if interval_s > 0 and self._monitor is None:
            try:
                self._monitor = SystemMetrics(self, interval_s)
            except ImportError as e:  # psutil missing: a run without system/* metrics, said once
                print(f"[tracking] WARNING: no system metrics ({e})", flush=True)

    def close(self, timeout_s: float = 60.0) -> str:
        """Stop the system metrics, send what is queued for at most `timeout_s` seconds and
        keep the rest in the spool. Returns the line saying which happened."""
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        if self._queue is None:
            return "[tracking] sent (synchronous)"
        queue, self._queue = self._queue, None
        try:
            left = queue.close(timeout_s)
        finally:
            _set_env(self._saved_env)
        stats = queue.stats
        outage = f"; outage: {stats.tag_value()}" if stats.outages else ""
        if stats.lost:
            outage += f"; {stats.lost} entries LOST ({stats.lost_reason})"
        if stats.rejected:
            outage += f"; {stats.rejected} rejected by the server, kept in {self.spool.dead_path}"
        if left == 0:
            every = "" if stats.lost or stats.rejected else "all "
            return f"[tracking] {every}{queue.sent} entries sent to {self.uri}{outage}"
        replay = REPLAY_COMMAND.format(uri=self.uri, dir=self.spool.root)
        return (
            f"[tracking] {left} entries NOT sent to {self.uri} within {timeout_s:g} s{outage}; "
            f"kept in {self.spool.path}: they are sent when this run resumes (same "
            f"run.run_name) or by `{replay}`"
        )


def _set_env(values: dict[str, str | None]) -> dict[str, str | None]:
    """Set (None: unset) environment variables; returns their previous values."""
    before = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return before


class SystemMetrics:
    """MLflow's system monitors (`SystemMetricsMonitor`: CPU, memory, disk, network, GPU),
    sampled on a thread of our own and logged through the RunLogger's queue. MLflow's own loop
    calls the server synchronously at every sample and stops for good at the first failure."""

    def __init__(self, logger: RunLogger, interval_s: float) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._sampler = SystemMetricsMonitor(logger.run_id, tracking_uri=logger.uri)
        self._logger, self._interval_s = logger, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        self._sampler.collect_metrics()  # CPU percentages are measured between two samples
        while not self._stop.wait(self._interval_s):
            self._sampler.collect_metrics()
            metrics = self._sampler.aggregate_metrics()
            for monitor in self._sampler.monitors:
                monitor.clear_metrics()
            system = {f"system/{k}": v for k, v in metrics.items()}
            self._logger.metrics(system, step=self._logger.last_step)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
