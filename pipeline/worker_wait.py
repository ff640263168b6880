"""The driver says what it waits for when Ray Train cannot place its workers, and gives up.

Ray Train 2.60 (V2) never gives up by itself: a worker group whose placement group does not fit
the cluster times out after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s), which is a controller
failure, and `FailureConfig.controller_failure_limit` defaults to -1 (retry forever). Its
notices go to the session's train logs at INFO, below the console level the job sets, so a job
whose worker node died and never came back would wait in silence. Here:

- a thread of the driver watches the job's placement groups (Ray Train reserves its workers'
  resources with one) and, while none is placed, prints every 30 s

    [pretrain] waiting 40s for 2 Ray Train workers (CPU 1 each; CPU 2 in all): 1 alive node,
               CPU 1 free of 1; stops after 600s in one placement (run.worker_wait_timeout_s)

- Ray Train's own time-out is set to `run.worker_wait_timeout_s` for this run (the environment
  variable above, which the driver propagates to the controller) and the trainer is built with
  `controller_failure_limit=0` (`build_trainer(..., worker_wait_timeout_s=...)`), so one wait
  that long ends the run, with the controller and its workers stopped by Ray Train itself;
- `watch` turns that ending into `WorkerWaitTimeoutError`, naming the cluster it saw and how to
  resume. Checkpoints already written stay where they are.

A wait that ends in time costs nothing: a worker node lost mid-run and replaced within the limit
(`FailureConfig.max_failures` restarts the group) is not a controller failure.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

FIRST_NOTICE_S = 30.0  # a normal start places its workers within seconds (~15 s here, loaded)
NOTICE_EVERY_S = 30.0
POLL_S = 2.0
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train's, read by its controller


class WorkerWaitTimeoutError(RuntimeError):
    """Ray Train's workers could not be placed on the cluster within the configured time."""


def _job_placement_groups(job_hex: str) -> list[dict]:
    import ray.util

    # A PlacementGroupID ends with the JobID of the job that made it (Ray's ID layout), so this
    # is the run's own group, not another job's on the same cluster.
    return [
        pg
        for pg in ray.util.placement_group_table().values()
        if pg["placement_group_id"].endswith(job_hex) and pg["state"] != "REMOVED"
    ]


def cluster_line(need: dict[str, float]) -> str:
    """'1 alive node, CPU 1 free of 1' for the resources a worker needs."""
    import ray

    alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    total, free = ray.cluster_resources(), ray.available_resources()
    have = ", ".join(f"{k} {free.get(k, 0):g} free of {total.get(k, 0):g}" for k in need)
    return f"{alive} alive node{'s' if alive != 1 else ''}, {have}"


def waiting_line(workers: int, need: dict[str, float], waited_s: float, timeout_s: float) -> str:
    each = " ".join(f"{k} {v:g}" for k, v in need.items())
    total = " ".join(f"{k} {v * workers:g}" for k, v in need.items())
    limit = f"stops after {timeout_s:g}s in one placement" if timeout_s > 0 else "no limit"
    return (
        f"[pretrain] waiting {waited_s:.0f}s for {workers} Ray Train workers ({each} each; "
        f"{total} in all): {cluster_line(need)}; {limit} (run.worker_wait_timeout_s)"
    )


class _Watcher:
    def __init__(self, workers: int, need: dict[str, float], timeout_s: float) -> None:
        import ray

        self.workers, self.need, self.timeout_s = workers, need, timeout_s
        # A short limit still gets its notice before the run stops.
        half = timeout_s / 2 if timeout_s > 0 else FIRST_NOTICE_S
        self.first_notice_s = min(FIRST_NOTICE_S, half)
        self.job_hex = ray.get_runtime_context().get_job_id()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="worker-wait", daemon=True)

    def _loop(self) -> None:
        since, noticed = time.monotonic(), 0.0  # fit() starts without a placed group
        while not self.stop.wait(POLL_S):
            try:
                placed = any(pg["state"] == "CREATED" for pg in _job_placement_groups(self.job_hex))
            except Exception:  # noqa: BLE001 - the GCS briefly unreachable: ask again later
                continue
            now = time.monotonic()
            if placed:
                since, noticed = now, 0.0
                continue
            waited = now - since
            if waited >= self.first_notice_s and now - noticed >= NOTICE_EVERY_S:
                print(waiting_line(self.workers, self.need, waited, self.timeout_s), flush=True)
                noticed = now


def is_start_timeout(err: BaseException) -> bool:
    """Ray Train's ControllerError wrapping a WorkerGroupStartupTimeoutError (by name: the
    class lives in Ray Train's private modules)."""
    failure = getattr(err, "controller_failure", None)
    return type(failure).__name__ == "WorkerGroupStartupTimeoutError"


@contextlib.contextmanager
def watch(workers: int, need: dict[str, float], timeout_s: float, resume_hint: str) -> Iterator:
    """Around `trainer.fit()` on the driver, for a trainer built with the same
    `worker_wait_timeout_s`: print what it waits for while its workers are not placed, and
    raise WorkerWaitTimeoutError when Ray Train gave up after `timeout_s` seconds (0: Ray
    Train's default, retry forever; still reported). With no workers (local mode) it does
    nothing."""
    if workers <= 0:
        yield
        return
    w = _Watcher(workers, need, timeout_s)
    before = os.environ.get(START_TIMEOUT_ENV)
    if timeout_s > 0:  # read when fit() creates the controller; that process keeps its copy
        os.environ[START_TIMEOUT_ENV] = f"{timeout_s:g}"
    w.thread.start()
    try:
        yield
    except Exception as e:
        if not is_start_timeout(e):
            raise
        each = ", ".join(f"{k} {v:g}" for k, v in need.items())
        raise WorkerWaitTimeoutError(
            f"{workers} Ray Train workers ({each} each) could not be placed for {timeout_s:g}s "
            f"(run.worker_wait_timeout_s): {cluster_line(need)}. The run was stopped; its "
            f"checkpoints are kept. Add nodes, then run again with {resume_hint} to resume "
            f"from the newest complete checkpoint."
        ) from e
    finally:
        w.stop.set()
        w.thread.join(timeout=5)
        if before is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = before
