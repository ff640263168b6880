"""The MLflow side of rank 0's tracking queue: one batch of spool entries to one run, sent so
that a retry never duplicates anything.

Metrics are (key, step, timestamp, value) rows and MLflow appends every row it is sent, so a
batch that failed after the server may have applied it ("ambiguous": a timeout, a connection
cut mid-answer, a process killed while the request was out) is first compared with the run's
metric history, and only the missing rows are sent. Step images (`log_image(key=, step=)`) get
a fresh file name per call, so an ambiguous one is looked up among the run's images first.
Params, tags and plain artifacts are idempotent: resending them changes nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.tracking.spool import Entry

# HTTP statuses that mean "this request will never succeed": drop it rather than block the queue.
_RETRYABLE_4XX = {408, 429}


def is_permanent(error: BaseException) -> bool:
    """A rejection by the store (HTTP 4xx from a server, the same error codes from a database
    store: an unknown run, a bad value), or a payload that cannot be sent, as opposed to the
    server being unreachable, slow or failing (retry those: MLflow's client reports them as
    INTERNAL_ERROR, status 500)."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return 400 <= status < 500 and status not in _RETRYABLE_4XX
    return isinstance(error, (ValueError, TypeError, KeyError, FileNotFoundError))


class MlflowSender:
    """`send(batch, ambiguous_upto)` for `TrackingQueue`: MLflow calls for one batch."""

    def __init__(self, client, run_id: str) -> None:
        self._client, self.run_id = client, run_id

    def __call__(self, batch: list[Entry], ambiguous_upto: int) -> None:
        kind = batch[0]["kind"]
        ambiguous = [e for e in batch if e["seq"] <= ambiguous_upto]
        if kind == "artifact":
            self._artifact(batch[0])
        elif kind == "image":
            if not (ambiguous and self._image_exists(batch[0])):
                self._image(batch[0])
        else:
            self._log_batch(batch, {e["seq"] for e in ambiguous})

    def _log_batch(self, batch: list[Entry], ambiguous: set[int]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        rows = [(e["seq"], r) for e in batch if e["kind"] == "metrics" for r in e["rows"]]
        if ambiguous:
            rows = self._not_yet_logged(rows, ambiguous)
        metrics = [Metric(k, float(v), int(ts), int(step)) for _, (k, v, ts, step) in rows]
        params = {k: v for e in batch if e["kind"] == "params" for k, v in e["params"].items()}
        if params:  # a resumed run keeps the params it has (MLflow params are immutable)
            existing = self._client.get_run(self.run_id).data.params
            params = {k: v for k, v in params.items() if k not in existing}
        tags = {k: v for e in batch if e["kind"] == "tags" for k, v in e["tags"].items()}
        if metrics or params or tags:
            self._client.log_batch(
                self.run_id,
                metrics=metrics,
                params=[Param(k, str(v)) for k, v in params.items()],
                tags=[RunTag(k, str(v)) for k, v in tags.items()],
            )

    def _not_yet_logged(self, rows: list[tuple[int, list]], ambiguous: set[int]) -> list:
        """Rows of ambiguous entries that the run's history does not hold yet."""
        keys = {r[0] for seq, r in rows if seq in ambiguous}
        seen = {
            (k, m.step, m.timestamp, m.value)
            for k in keys
            for m in self._client.get_metric_history(self.run_id, k)
        }
        return [
            (seq, r)
            for seq, r in rows
            if seq not in ambiguous or (r[0], int(r[3]), int(r[2]), float(r[1])) not in seen
        ]

    def _artifact(self, e: Entry) -> None:
        path = Path(e["file"])
        if not path.is_file():
            raise FileNotFoundError(f"tracking spool payload {path} is missing")
        self._client.log_artifact(self.run_id, str(path), artifact_path=e.get("artifact_path"))

    def _image(self, e: Entry) -> None:
        from PIL import Image

        with Image.open(e["file"]) as image:
            image.load()
            self._client.log_image(
                self.run_id, image, key=e["key"], step=int(e["step"]), timestamp=int(e["ts"])
            )

    def _image_exists(self, e: Entry) -> bool:
        # MLflow 3 names step images images/<key, / as ~>+step+<step>+timestamp+<ts>+<uuid>.png
        prefix = f"{re.sub('/', '~', e['key'])}+step+{e['step']}+timestamp+{e['ts']}+"
        names = (Path(a.path).name for a in self._client.list_artifacts(self.run_id, "images"))
        return any(n.startswith(prefix) and n.endswith(".png") for n in names)
