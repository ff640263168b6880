"""Two Ray nodes on this machine, as a cluster user has them: `ray start --head` and a worker
raylet (`ray start --address`), 1 CPU each, each node its own session; the job sent with
`ray job submit --working-dir` (so the worker node gets the code as a user's cluster does), its
checkpoints in an S3 bucket every node reaches (`moto_server`), MLflow on an `mlflow server`.

    a. 2 workers land on both nodes; checkpoints go to the bucket.
    b. the worker node killed whole after the first checkpoint, a new one started: the run
       resumes from the newest complete checkpoint, finishes, and MLflow holds every (metric,
       step) once. Prints what the loss cost (time to resume, steps redone).
    c. the worker node killed and not replaced: the driver says what it waits for, stops after
       run.worker_wait_timeout_s with a clear error, its checkpoint intact; once a node is back,
       a rerun with the same run name resumes from it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from servers import MlflowServer, MotoS3, RayCluster

REPO = Path(__file__).resolve().parents[1]
BUCKET = "ce-multinode"
EXPERIMENT = "test-multinode"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = MotoS3(tmp_path_factory.mktemp("aws"), BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shards(s3, tmp_path_factory) -> str:
    """Tiny digits shards (32 px) in the bucket; returns the s3:// folder."""
    from pipeline.data.writer import Source, digits_source, write_shards

    out = tmp_path_factory.mktemp("shards")
    src = digits_source(32)
    write_shards(Source(src.items[:240], src.classes, []), out, prefix="dg", shard_size=48,
                 seed=0, val_fraction=0.2, progress=False)  # fmt: skip
    client = s3.client()
    for p in sorted(out.iterdir()):
        client.upload_file(str(p), BUCKET, f"shards/{p.name}")
    return f"s3://{BUCKET}/shards"


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """Head + one worker node (1 CPU each), and an MLflow server, all on loopback. Every node
    has the S3 environment, as a cluster's nodes have their credentials."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_API_SERVER_ADDRESS"}
    # RAY_AUTH_MODE: the job CLI needs no token on loopback (see test_pretrain_job).
    env |= s3.env | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    # Short: Ray's unix sockets live under the temp dir (a 107-byte path limit).
    temp = Path(tempfile.mkdtemp(prefix="ce-mn-", dir="/tmp"))
    ray_cluster = RayCluster(temp, env)
    mlflow = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        ray_cluster.start_head()
        mlflow.start()  # while the head starts
        ray_cluster.wait_ready(1)
        ray_cluster.add_worker()
        yield ray_cluster, mlflow.uri
    finally:
        ray_cluster.stop()
        mlflow.kill()
        subprocess.run(["rm", "-rf", str(temp)], check=False)


@pytest.fixture()
def two_nodes(cluster):
    """The cluster with a head and a live worker node (a test before may have killed one)."""
    ray_cluster, uri = cluster
    if len(ray_cluster.alive_nodes()) < 2:
        ray_cluster.add_worker()
    return ray_cluster, uri


def overrides(shards: str, run_name: str, **extra: object) -> list[str]:
    base = {
        "data.train_shards": f"{shards}/dg-train-*.tar",
        "data.val_shards": f"{shards}/dg-val-000000.tar",
        "data.image_size": 32, "model.image_size": 32, "model.width": 8, "model.bottleneck": 32,
        "data.batch_size": 8, "data.shuffle_buffer": 32, "train.eval_batches": 1,
        "train.max_steps": 8, "train.checkpoint_every": 4, "train.log_every": 2,
        "train.sample_every": 10_000, "run.output_root": f"s3://{BUCKET}/out",
        "run.name": EXPERIMENT, "run.run_name": run_name, "run.num_workers": 2,
        "run.cpus_per_worker": 1, "run.max_failures": 2, "run.system_metrics_every_s": 0,
    }  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def submit(ray_cluster: RayCluster, uri: str, args: list[str], log: Path) -> subprocess.Popen:
    """`ray job submit` (following the job's log into `log`), in the background."""
    cmd = ["ray", "job", "submit", "--address", ray_cluster.dashboard, "--working-dir", str(REPO),
           "--", "ce-pretrain", *args, f"run.tracking_uri={uri}"]  # fmt: skip
    return subprocess.Popen(cmd, env=ray_cluster.env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)  # fmt: skip


def finish(proc: subprocess.Popen, log: Path, timeout_s: float = 420) -> str:
    proc.wait(timeout=timeout_s)
    return log.read_text()


def mlflow_run(uri: str, run_name: str):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import RUN_NAME_TAG

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    (run,) = c.search_runs([exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    return c, run


def node_ids(ray_cluster: RayCluster) -> tuple[str, list[str]]:
    nodes = ray_cluster.alive_nodes()
    head = next(n["node_id"] for n in nodes if n["is_head_node"])
    return head, [n["node_id"] for n in nodes if not n["is_head_node"]]


def registered_checkpoint(s3: MotoS3, run_name: str) -> int | None:
    """The step of the newest checkpoint Ray Train has *registered* (listed in its snapshot),
    or None: a folder can exist before its report reached the controller."""
    key = f"out/ray_results/{run_name}/checkpoint_manager_snapshot.json"
    client = s3.client()
    try:
        snap = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    except client.exceptions.NoSuchKey:
        return None
    latest = snap.get("latest_checkpoint_result")
    if not latest:
        return None
    return int(re.search(r'"step": (\d+)', json.dumps(latest)).group(1))


def wait_for_checkpoint(s3: MotoS3, run_name: str, proc: subprocess.Popen, log: Path) -> int:
    t0 = time.time()
    while (step := registered_checkpoint(s3, run_name)) is None:
        assert proc.poll() is None, "the job ended before its first checkpoint:\n" + log.read_text()
        assert time.time() - t0 < 300, "no registered checkpoint in the bucket"
        time.sleep(0.2)
    return step


def complete_checkpoints(s3: MotoS3, run_name: str) -> dict[str, set[str]]:
    """{checkpoint folder: file names} in the bucket, for folders holding a manifest (written
    last: pipeline.checkpoint)."""
    prefix = f"out/ray_results/{run_name}/"
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    files: dict[str, set[str]] = {}
    for page in pages:
        for obj in page.get("Contents", []):
            parts = obj["Key"][len(prefix) :].split("/")
            if len(parts) == 2 and parts[0].startswith("checkpoint_"):
                files.setdefault(parts[0], set()).add(parts[1])
    return {d: names for d, names in files.items() if "checkpoint_manifest.json" in names}


@pytest.mark.slow
def test_job_runs_ranks_on_both_nodes_and_checkpoints_to_the_bucket(
    two_nodes, s3, shards, tmp_path
):
    ray_cluster, uri = two_nodes
    head, workers = node_ids(ray_cluster)
    log = tmp_path / "job.log"
    out = finish(submit(ray_cluster, uri, overrides(shards, "two-nodes"), log), log)

    assert "succeeded" in out, out[-4000:]
    assert "[train] done: step 8/8" in out, out[-4000:]
    for rank in (0, 1):  # each rank's startup line names its node
        assert re.search(rf"\[pretrain\] rank {rank}/2 on node [0-9a-f]{{12}} ", out), out[-4000:]
    c, run = mlflow_run(uri, "two-nodes")
    assert run.info.status == "FINISHED"
    assert sorted(run.data.tags["ce.rank_nodes"].split(",")) == sorted([head, *workers])
    ckpts = complete_checkpoints(s3, "two-nodes")
    assert ckpts and all({"checkpoint.pt", "checkpoint_manifest.json"} <= f for f in ckpts.values())
    assert f"done: checkpoint s3://{BUCKET}/out/ray_results/two-nodes/checkpoint_" in out


@pytest.mark.slow
def test_worker_node_lost_and_replaced_resumes_and_logs_each_step_once(
    two_nodes, s3, shards, tmp_path
):
    ray_cluster, uri = two_nodes
    head, _ = node_ids(ray_cluster)
    max_steps, every, log_every = 150, 25, 5
    args = overrides(shards, "node-loss", **{"train.max_steps": max_steps,
                     "train.checkpoint_every": every, "train.log_every": log_every})  # fmt: skip
    log = tmp_path / "job.log"
    proc = submit(ray_cluster, uri, args, log)
    try:
        wait_for_checkpoint(s3, "node-loss", proc, log)
        t_kill = time.time()
        ray_cluster.kill(ray_cluster.nodes[-1])  # the newest worker node, whole
        time.sleep(10)  # a replacement takes a while to boot
        t_added = time.time()
        new_worker = ray_cluster.add_worker()
        t_joined = time.time()
        out = finish(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "succeeded" in out, out[-6000:]
    assert f"[train] done: step {max_steps}/{max_steps}" in out, out[-6000:]

    c, run = mlflow_run(uri, "node-loss")
    assert run.info.status == "FINISHED"
    assert sorted(run.data.tags["ce.rank_nodes"].split(",")) == sorted([head, new_worker])
    (resumed,) = c.get_metric_history(run.info.run_id, "resumed_from_step")
    assert resumed.value > 0 and resumed.value % every == 0

    # Every (key, step) once: the steps replayed after the restart were not logged again.
    histories = {k: c.get_metric_history(run.info.run_id, k) for k in run.data.metrics}
    for key, history in histories.items():
        steps = [m.step for m in history]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
    assert sorted(m.step for m in histories["loss_rec"]) == list(
        range(log_every, max_steps + 1, log_every)
    )
    assert sorted(m.step for m in histories["val_rec_l2"]) == list(
        range(every, max_steps + 1, every)
    )

    # What the loss cost: from the kill to the restart (the resumed_from_step marker, logged by
    # the restarted rank 0 once it has loaded the checkpoint), and the steps trained twice.
    before = [m.step for m in histories["loss_rec"] if m.timestamp / 1000 < t_kill]
    redone = max(before) - int(resumed.value)
    figures = {
        "kill_to_resumed_s": round(resumed.timestamp / 1000 - t_kill, 1),
        "node_joined_after_kill_s": round(t_joined - t_kill, 1),
        "node_start_to_resumed_s": round(resumed.timestamp / 1000 - t_added, 1),
        "resumed_from_step": int(resumed.value),
        "last_step_logged_before_kill": max(before),
        "steps_redone": redone,
    }
    print(f"\n[node-loss figures] {json.dumps(figures)}")
    assert 0 <= redone < every + log_every


@pytest.mark.slow
def test_node_never_back_stops_with_a_clear_error_and_resumes_later(
    two_nodes, s3, shards, tmp_path
):
    ray_cluster, uri = two_nodes
    max_steps, every = 60, 20
    args = overrides(shards, "node-gone", **{"train.max_steps": max_steps,
                     "train.checkpoint_every": every, "train.log_every": 10,
                     "run.worker_wait_timeout_s": 20})  # fmt: skip
    log = tmp_path / "job.log"
    proc = submit(ray_cluster, uri, args, log)
    try:
        wait_for_checkpoint(s3, "node-gone", proc, log)
        t_kill = time.time()
        ray_cluster.kill(ray_cluster.nodes[-1])
        out = finish(proc, log)
        t_failed = time.time()
    finally:
        if proc.poll() is None:
            proc.kill()

    assert proc.returncode != 0 and "failed" in out, out[-6000:]
    # It said what it waited for, then stopped naming the limit, the cluster and the fix.
    assert re.search(r"\[pretrain\] waiting \d+s for 2 Ray Train workers \(CPU 1 each; CPU 2 in "
                     r"all\): 1 alive node, CPU 1 free of 1", out), out[-6000:]  # fmt: skip
    assert "WorkerWaitTimeoutError: 2 Ray Train workers (CPU 1 each) could not be placed for " \
           "20s (run.worker_wait_timeout_s)" in out, out[-6000:]  # fmt: skip
    assert "run again with run.run_name=node-gone" in out
    print(f"\n[node-gone] failed {t_failed - t_kill:.0f}s after the kill (limit 20s)")
    c, run = mlflow_run(uri, "node-gone")
    assert run.info.status == "FAILED"
    ckpts = complete_checkpoints(s3, "node-gone")
    assert ckpts and all({"checkpoint.pt", "checkpoint_manifest.json"} <= f for f in ckpts.values())

    # The node is back: the same command resumes from the kept checkpoint and finishes.
    ray_cluster.add_worker()
    log2 = tmp_path / "rerun.log"
    out2 = finish(submit(ray_cluster, uri, args, log2), log2)
    assert "succeeded" in out2 and "(resumed)" in out2, out2[-6000:]
    assert f"[train] done: step {max_steps}/{max_steps}" in out2
    c, run = mlflow_run(uri, "node-gone")
    assert run.info.status == "FINISHED"
    (resumed,) = c.get_metric_history(run.info.run_id, "resumed_from_step")
    assert resumed.value >= every and resumed.value % every == 0


# ---- the pieces, without a cluster (fast tier) -------------------------------------------------


def test_a_restarted_rank0_skips_the_steps_mlflow_already_holds(tmp_path):
    """What a restart replays (steps after the checkpoint, logged before the failure) is not
    logged again; system samples and the restart marker are not filtered."""
    from pipeline.ray_train import _Fresh, _logged_steps
    from pipeline.tracking import RunLogger, new_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = new_run(uri, "dedup", "r")
    logger = RunLogger(uri, run_id)  # synchronous
    for step in (2, 4, 6):
        logger.metrics({"loss_rec": 0.5, "images_per_s": 10.0}, step=step)
    logger.metrics({"val_rec_l2": 0.3}, step=4)
    logger.metrics({"system/cpu_utilization_percentage": 50.0, "resumed_from_step": 4}, step=6)

    logged = _logged_steps(logger)
    assert logged == {"loss_rec": 6, "images_per_s": 6, "val_rec_l2": 4}
    fresh = _Fresh(logged)
    replayed = {"loss_rec": 0.5, "val_rec_l2": 0.3, "loss_g": 1.0}
    assert fresh.only(replayed, step=4) == {"loss_g": 1.0}
    assert fresh.only(replayed, step=6) == {"loss_g": 1.0, "val_rec_l2": 0.3}
    assert fresh.only({"val_rec_l2": 0.3}, step=8) == {"val_rec_l2": 0.3}
    assert _Fresh({}).only({"loss_rec": 0.5}, step=2) == {"loss_rec": 0.5}


def test_an_unreachable_store_filters_nothing_and_says_so(tmp_path):
    from pipeline.ray_train import _logged_steps
    from pipeline.tracking import RunLogger
    from servers import free_port

    logger = RunLogger(f"http://127.0.0.1:{free_port()}", "0" * 32, spool_dir=tmp_path / "spool")
    try:
        with pytest.warns(UserWarning, match="logged again"):
            assert _logged_steps(logger) == {}
    finally:
        logger.close(timeout_s=0)


def test_worker_wait_key_and_ray_trains_start_timeout():
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import (
        WorkerGroupStartupFailedError,
        WorkerGroupStartupTimeoutError,
    )

    from pipeline.config import ConfigError, load_config
    from pipeline.worker_wait import is_start_timeout

    assert load_config().run.worker_wait_timeout_s == 600
    assert load_config(overrides=["run.worker_wait_timeout_s=0"]).run.worker_wait_timeout_s == 0
    with pytest.raises(ConfigError, match="run.worker_wait_timeout_s must be >= 0"):
        load_config(overrides=["run.worker_wait_timeout_s=-1"])
    # The error Ray Train raises when a placement group waited past its start timeout.
    assert is_start_timeout(ControllerError(WorkerGroupStartupTimeoutError(2)))
    assert not is_start_timeout(ControllerError(WorkerGroupStartupFailedError("no")))
    assert not is_start_timeout(RuntimeError("other"))
