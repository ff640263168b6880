"""Object storage end to end, against a real S3 server on loopback (moto_server, started here).

Shards are read from a bucket, a pretraining run with run.output_root=s3://... writes its
checkpoints there, is killed, resumes from the bucket's checkpoint, and an `mlflow server`
with --artifacts-destination s3://... stores the encoder there, which downloads back by
runs:/ to the weights of the last checkpoint. Every client (s3fs, pyarrow in Ray Train, boto3
in MLflow) finds the server through the standard AWS_ENDPOINT_URL, as on a real cluster.

The runs are subprocesses (`python -m jobs.pretrain`): each starts its own local Ray, whose
workers inherit the S3 environment; the test session's shared Ray started without it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import DataConfig, MaskConfig
from pipeline.data import build_loader, expand_urls
from pipeline.data.counts import shard_sample_counts
from pipeline.data.writer import Source, digits_source, write_shards
from servers import MotoS3, free_port, stop_group, wait_http

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUCKET = "ce-test"
RUN = "s3-resume"
MAX_STEPS, CKPT_EVERY = 200, 20


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto_server on a free loopback port, a bucket, and the AWS environment pointing at it
    (set in os.environ for this module, so this process's s3fs / boto3 use it too)."""
    import s3fs

    server = MotoS3(tmp_path_factory.mktemp("aws"), BUCKET)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in server.env.items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # none made before this env may be reused
        try:
            yield server.client(), server.env
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(s3, tmp_path_factory):
    """`mlflow server` on loopback storing artifacts in the bucket, started first thing (autouse)
    so that its slow start overlaps the shard tests; `resumed_run` waits until it answers.
    Yields (tracking URI, process)."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen(
        ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", f"s3://{BUCKET}/mlflow"],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env=os.environ.copy(),  # the S3 environment set by `s3`
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        stop_group(server)


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def shards(s3, tmp_path_factory):
    """Real digits shards (32-px PNGs) with their manifest, written locally and uploaded:
    (local folder, s3:// folder, manifest)."""
    client, _ = s3
    out = tmp_path_factory.mktemp("shards")
    src = digits_source(32)
    manifest = write_shards(Source(src.items[:240], src.classes, []), out, prefix="dg",
                            shard_size=48, seed=0, val_fraction=0.2, progress=False)  # fmt: skip
    for p in sorted(out.iterdir()):
        client.upload_file(str(p), BUCKET, f"shards/{p.name}")
    return out, f"s3://{BUCKET}/shards", manifest


def _all_batches(urls: str) -> list[dict]:
    data = DataConfig(image_size=32, batch_size=16, shuffle_buffer=32)
    return list(build_loader(data, MaskConfig(), urls=urls, train=True, epoch=1, seed=3))


def test_loader_reads_shards_from_a_bucket_like_the_local_copy(shards):
    local, remote, manifest = shards
    s3_urls = expand_urls(f"{remote}/dg-train-*.tar")  # a glob, listed through s3fs
    local_urls = [str(local / u.rsplit("/", 1)[1]) for u in s3_urls]
    names = [s["name"] for s in manifest["shards"] if s["name"].startswith("dg-train-")]
    assert [u.rsplit("/", 1)[1] for u in s3_urls] == names
    # Counts come from the manifest read beside the shards in the bucket.
    assert shard_sample_counts(s3_urls) == [s["count"] for s in manifest["shards"]
                                             if s["name"] in names]  # fmt: skip

    got, want = _all_batches(",".join(s3_urls)), _all_batches(",".join(local_urls))
    assert len(got) == len(want) > 0
    for b_s3, b_local in zip(got, want, strict=True):
        assert b_s3["key"] == b_local["key"]
        assert b_s3["label"].tolist() == b_local["label"].tolist()
        assert (b_s3["image"] == b_local["image"]).all() and (b_s3["mask"] == b_local["mask"]).all()
    n_valid = sum(int(b["valid"].sum()) for b in got)
    assert n_valid == sum(int(s["count"]) for s in manifest["shards"] if s["name"] in names)


def _snapshot_has_checkpoint(client) -> bool:
    """Ray Train has *registered* a checkpoint (its snapshot file lists it), not just begun
    uploading one: a report still in flight when the driver dies is lost."""
    key = f"out/ray_results/{RUN}/checkpoint_manager_snapshot.json"
    try:
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return False
    return bool(json.loads(body).get("latest_checkpoint_result"))


@pytest.fixture(scope="module")
def resumed_run(s3, shards, mlflow_server, tmp_path_factory):
    """A pretraining run into s3://bucket/out, tracked by the MLflow server, killed after its
    first registered checkpoint, then run again with the same run name to the end.
    Returns (tracking URI, the second run's stdout, the runs' working dir)."""
    client, _ = s3
    _, remote, _ = shards
    uri, server = mlflow_server
    work = tmp_path_factory.mktemp("work")  # the runs' cwd: nothing may land here
    overrides = {
        "data.train_shards": f"{remote}/dg-train-*.tar",
        "data.val_shards": f"{remote}/dg-val-000000.tar",
        "data.image_size": 32, "model.image_size": 32, "model.width": 8, "model.bottleneck": 32,
        "data.batch_size": 8, "data.shuffle_buffer": 32,
        "train.max_steps": MAX_STEPS, "train.checkpoint_every": CKPT_EVERY,
        "train.log_every": CKPT_EVERY, "train.sample_every": 10_000, "train.eval_batches": 1,
        "run.output_root": f"s3://{BUCKET}/out", "run.tracking_uri": uri,
        "run.name": "test-s3", "run.run_name": RUN, "run.num_workers": 1, "run.max_failures": 0,
    }  # fmt: skip
    cmd = [sys.executable, "-m", "jobs.pretrain", *(f"{k}={v}" for k, v in overrides.items())]
    # The S3 environment (set by `s3`) without the test session's Ray API address.
    env = {k: v for k, v in os.environ.items() if k != "RAY_API_SERVER_ADDRESS"}
    env |= {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""}
    wait_http(f"{uri}/health", 120, server)
    first = subprocess.Popen(cmd, cwd=work, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        t0 = time.time()
        while not _snapshot_has_checkpoint(client):
            assert first.poll() is None, "the first run ended before its first checkpoint"
            assert time.time() - t0 < 240, "no registered checkpoint in the bucket"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    second = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    return uri, second.stdout, work


def _mlflow_run(uri: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    (run,) = c.search_runs([c.get_experiment_by_name("test-s3").experiment_id])
    return c, run


def test_checkpoints_are_written_to_the_bucket(s3, resumed_run):
    client, _ = s3
    _, stdout, work = resumed_run
    keys = _keys(client, f"out/ray_results/{RUN}/")
    ckpts = {k.split("/")[3] for k in keys if k.endswith("/checkpoint.pt")}
    # At least the one the second run resumed from and its last one (the first run's uploads
    # after its last registered checkpoint may be left behind: the kill cut them off).
    assert len(ckpts) >= 2 and all(c.startswith("checkpoint_") for c in ckpts)
    last = re.search(r"done: checkpoint (\S+)", stdout).group(1)
    assert last.startswith(f"s3://{BUCKET}/out/ray_results/{RUN}/checkpoint_")
    assert last.rsplit("/", 1)[1] in ckpts
    assert not any(work.iterdir())  # no <cwd>/s3:/... and no local MLflow store


def test_killed_run_resumes_from_the_bucket_checkpoint(s3, resumed_run, tmp_path):
    import fsspec
    import torch

    uri, stdout, _ = resumed_run
    assert "(resumed)" in stdout
    c, run = _mlflow_run(uri)  # one MLflow run, continued
    assert run.info.status == "FINISHED"
    (resumed,) = c.get_metric_history(run.info.run_id, "resumed_from_step")
    assert 0 < resumed.value < MAX_STEPS and resumed.value % CKPT_EVERY == 0
    assert max(m.step for m in c.get_metric_history(run.info.run_id, "loss_rec")) == MAX_STEPS
    ckpt = re.search(r"done: checkpoint (\S+)", stdout).group(1)
    with fsspec.open(f"{ckpt}/checkpoint.pt", "rb") as f:
        assert torch.load(f, map_location="cpu", weights_only=True)["step"] == MAX_STEPS


def test_encoder_artifact_lands_in_the_bucket_and_loads_by_runs_uri(s3, resumed_run, tmp_path):
    from evaluation.features import load_encoder

    client, _ = s3
    uri, stdout, _ = resumed_run
    _, run = _mlflow_run(uri)
    stored = [k for k in _keys(client, "mlflow/") if k.endswith("/encoder/generator.pt")]
    assert len(stored) == 1 and run.info.run_id in stored[0]
    by_run = load_encoder("ce", f"runs:/{run.info.run_id}/encoder/generator.pt", tmp_path, uri)
    ckpt = re.search(r"done: checkpoint (\S+)", stdout).group(1)
    by_ckpt = load_encoder("ce", f"{ckpt}/checkpoint.pt", tmp_path)  # straight from the bucket
    assert by_run.weights == by_ckpt.weights  # the final encoder is the last checkpoint's
    assert not any(tmp_path.iterdir())  # both private download folders removed after loading
