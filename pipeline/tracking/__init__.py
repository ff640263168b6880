"""Tracking: the one place MLflow lives.

- `runs`: reachability, one MLflow run per pretraining (created or resumed by run name), the one
  way a run ends (`tracked_run`), and `RunLogger`, rank 0's logger;
- `queue`: the logger's non-blocking queue and sender thread (outages, backoff);
- `spool`: what could not be sent yet, on local disk, acknowledged in order;
- `send`: the MLflow calls, with de-duplication of ambiguous batches.

The public names are re-exported here: `from pipeline.tracking import RunLogger, ...`.
"""

from pipeline.tracking.queue import LOST_METRIC, LOST_TAG, OUTAGE_TAG, REJECTED_METRIC
from pipeline.tracking.runs import (
    BOUNDED_HTTP_ENV,
    REPLAY_COMMAND,
    RUN_NAME_TAG,
    SPOOL_DIR,
    STOPPED,
    RunLogger,
    SystemMetrics,
    TrackingUnavailableError,
    check_tracking,
    client,
    end_run,
    experiment_id,
    log_shards_input,
    new_run,
    spool_dir,
    start_or_resume_run,
    tracked_run,
)
from pipeline.tracking.spool import SpoolBusyError

__all__ = [
    "BOUNDED_HTTP_ENV",
    "LOST_METRIC",
    "LOST_TAG",
    "OUTAGE_TAG",
    "REJECTED_METRIC",
    "REPLAY_COMMAND",
    "RUN_NAME_TAG",
    "SPOOL_DIR",
    "STOPPED",
    "SpoolBusyError",
    "RunLogger",
    "SystemMetrics",
    "TrackingUnavailableError",
    "check_tracking",
    "client",
    "end_run",
    "experiment_id",
    "log_shards_input",
    "new_run",
    "spool_dir",
    "start_or_resume_run",
    "tracked_run",
]
