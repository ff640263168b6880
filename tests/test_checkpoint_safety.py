"""Checkpoints survive a death at any moment: the upload writes its manifest last, the chooser
skips folders cut off or damaged and resumes from the newest complete one, a flaky store is
retried and a dead one named; and (slow, real Ray) a worker killed halfway through writing a
checkpoint restarts from a complete one and still finishes at max_steps."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from pipeline.checkpoint import (
    KILL_ENV,
    MANIFEST_FILE,
    RAY_SNAPSHOT_FILE,
    CheckpointUploadError,
    IncompleteCheckpointError,
    check_complete,
    choose_checkpoint,
    fetch_complete,
    load_checkpoint,
    save_checkpoint,
    set_aside_unreadable_snapshot,
    upload_checkpoint_dir,
    write_manifest,
)
from pipeline.retry import RetryPolicy

LOCAL = pafs.LocalFileSystem()


def stored_checkpoint(run: Path, name: str, step: int) -> Path:
    """A real checkpoint folder as the upload leaves it: checkpoint.pt, then its manifest."""
    folder = run / name
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(step)
    save_checkpoint(
        folder / "checkpoint.pt", {"step": step, "w": torch.randn(64, 64, generator=gen)}
    )
    write_manifest(folder, step=step)
    return folder


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """A run folder with complete checkpoints at steps 10 and 20, then at 30 one whose file was
    cut short, and one whose upload died before its manifest."""
    run = tmp_path / "run"
    stored_checkpoint(run, "checkpoint_a", 10)
    stored_checkpoint(run, "checkpoint_b", 20)
    cut = stored_checkpoint(run, "checkpoint_c", 30) / "checkpoint.pt"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    no_manifest = stored_checkpoint(run, "checkpoint_d", 40)
    (no_manifest / MANIFEST_FILE).unlink()
    (run / RAY_SNAPSHOT_FILE).write_text("{}")  # Ray's own files in the run folder are ignored
    return run


def test_chooser_skips_cut_off_checkpoints_and_takes_the_newest_complete(run, tmp_path) -> None:
    chosen = choose_checkpoint(LOCAL, str(run), None, tmp_path / "work")
    assert chosen is not None and chosen.step == 20
    assert Path(chosen.path).name == "checkpoint_b"
    assert load_checkpoint(chosen.local / "checkpoint.pt")["step"] == 20  # the downloaded copy


def test_a_damaged_offered_checkpoint_falls_back_to_the_previous(run, tmp_path) -> None:
    offered = run / "checkpoint_b" / "checkpoint.pt"
    data = bytearray(offered.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit flipped: only the sha256 notices
    offered.write_bytes(bytes(data))
    chosen = choose_checkpoint(LOCAL, str(run), str(run / "checkpoint_b"), tmp_path / "work")
    assert chosen is not None and chosen.step == 10
    assert "newest complete checkpoint in storage" in chosen.why and "checkpoint_b" in chosen.why


def test_no_complete_checkpoint_fails_naming_the_run_when_ray_offered_one(tmp_path) -> None:
    run = tmp_path / "run"
    folder = stored_checkpoint(run, "checkpoint_a", 10)
    (folder / MANIFEST_FILE).unlink()
    cut = folder / "checkpoint.pt"
    cut.write_bytes(cut.read_bytes()[:-100])
    assert choose_checkpoint(LOCAL, str(run), None, tmp_path / "w1") is None  # a fresh start
    with pytest.raises(RuntimeError, match=f"no complete checkpoint in {run}"):
        choose_checkpoint(LOCAL, str(run), str(folder), tmp_path / "w2")


def test_a_registered_checkpoint_from_before_manifests_still_resumes(tmp_path) -> None:
    run = tmp_path / "run"
    folder = stored_checkpoint(run, "checkpoint_a", 10)
    (folder / MANIFEST_FILE).unlink()
    assert choose_checkpoint(LOCAL, str(run), None, tmp_path / "w1") is None  # not Ray's: cut
    chosen = choose_checkpoint(LOCAL, str(run), str(folder), tmp_path / "w2")
    assert chosen is not None and chosen.step == 10 and "before manifests" in chosen.why


def test_check_complete_names_what_is_wrong(run) -> None:
    assert check_complete(run / "checkpoint_a")["step"] == 10
    with pytest.raises(IncompleteCheckpointError, match="bytes, its manifest says"):
        check_complete(run / "checkpoint_c")
    with pytest.raises(IncompleteCheckpointError, match="no checkpoint_manifest.json"):
        check_complete(run / "checkpoint_d")


class FlakyWrites(pafs.FSSpecHandler):
    """A real local filesystem whose first `fail` output streams break on write (a dropped
    connection to the store), through pyarrow's PyFileSystem like any other filesystem."""

    def __init__(self, fail: int):
        import fsspec

        super().__init__(fsspec.filesystem("file"))
        self.fail, self.opened = fail, 0

    def open_output_stream(self, path, metadata):
        self.opened += 1
        if self.fail > 0:
            self.fail -= 1
            raise ConnectionResetError(f"connection reset writing {path}")
        return super().open_output_stream(path, metadata)


@pytest.mark.parametrize(("fail", "ok"), [(2, True), (10, False)])
def test_upload_retries_then_names_the_path(tmp_path: Path, fail: int, ok: bool) -> None:
    src = stored_checkpoint(tmp_path / "local", "ckpt", 7)
    handler = FlakyWrites(fail)
    fs, dest = pafs.PyFileSystem(handler), str(tmp_path / "store" / "run" / "checkpoint_x")
    policy = RetryPolicy(retries=3, backoff_s=0.001)
    if ok:
        upload_checkpoint_dir(src, fs, dest, policy, step=7)
        assert check_complete(dest)["step"] == 7
        assert handler.opened == 2 + 2  # two broken tries, then the file and its manifest
    else:
        with pytest.raises(CheckpointUploadError, match=f"could not write checkpoint to {dest}"):
            upload_checkpoint_dir(src, fs, dest, policy, step=7)
        assert handler.opened == 4  # the first try and 3 retries, then it stops
        assert not Path(dest, MANIFEST_FILE).exists()


def test_unreadable_ray_snapshot_is_set_aside(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    good = json.dumps({"checkpoint_results": []})
    (run / RAY_SNAPSHOT_FILE).write_text(good)
    assert set_aside_unreadable_snapshot(LOCAL, str(run)) is None
    (run / RAY_SNAPSHOT_FILE).write_text(good[:7])  # a driver killed mid-rewrite
    aside = set_aside_unreadable_snapshot(LOCAL, str(run))
    assert aside is not None and Path(aside).read_text() == good[:7]
    assert not (run / RAY_SNAPSHOT_FILE).exists()


def test_fetch_checks_the_download(run, tmp_path) -> None:
    assert (
        fetch_complete(LOCAL, str(run / "checkpoint_a"), tmp_path / "w") / MANIFEST_FILE
    ).exists()
    with pytest.raises(IncompleteCheckpointError):
        fetch_complete(LOCAL, str(run / "checkpoint_c"), tmp_path / "w")


# ---- a worker killed while writing a checkpoint (real Ray) ------------------------------------


def write_noise_shards(folder: Path, shards: int = 2, per_shard: int = 64) -> str:
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"noise-{s:06d}.tar")) as w:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    buf, format="JPEG"
                )
                w.write({"__key__": f"s{s}-{i:03d}", "jpg": buf.getvalue(), "cls": b"0"})
    return str(folder / f"noise-{{000000..{shards - 1:06d}}}.tar")


@pytest.mark.slow
def test_worker_killed_during_checkpoint_write_resumes_from_a_complete_one(
    tmp_path: Path, ray_local
) -> None:
    from pipeline.config import load_config
    from pipeline.ray_train import build_trainer
    from pipeline.tracking import client, new_run

    shards = tmp_path / "shards"
    shards.mkdir()
    cfg = load_config(None, [
        f"data.train_shards={write_noise_shards(shards)}", "data.image_size=32",
        "model.image_size=32", "model.width=8", "model.bottleneck=32", "data.batch_size=8",
        "data.shuffle_buffer=16", "train.max_steps=30", "train.checkpoint_every=10",
        "train.log_every=10", "train.eval_batches=0", "train.precision=fp32",
        f"run.output_root={tmp_path / 'out'}", "run.num_workers=1", "run.max_failures=2",
        "run.num_to_keep=2",
    ])  # fmt: skip
    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    run_id = new_run(uri, "ckpt-safety", "killed")
    trainer = build_trainer(cfg, run_name="killed", tracking_uri=uri, mlflow_run_id=run_id)
    marker = tmp_path / "killed.txt"
    trainer.run_config.worker_runtime_env = {"env_vars": {KILL_ENV: f"20:{marker}"}}

    result = trainer.fit()

    assert marker.exists(), "the fault was never injected"
    assert result.metrics["step"] == 30
    run_dir = tmp_path / "out" / "ray_results" / "killed"
    # The folder the kill cut off is still there, half written and without its manifest...
    folders = [d for d in run_dir.glob("checkpoint_*") if d.is_dir()]
    cut = [d for d in folders if not (d / MANIFEST_FILE).exists()]
    assert len(cut) == 1
    assert (cut[0] / "checkpoint.pt").stat().st_size > 0
    # ...and the run resumed from the complete step-10 checkpoint, not from it.
    history = client(uri).get_metric_history(run_id, "resumed_from_step")
    assert [m.value for m in history] == [10]
    final = check_complete(result.checkpoint.path)
    assert final["step"] == 30
    assert load_checkpoint(Path(result.checkpoint.path) / "checkpoint.pt")["step"] == 30


# ---- the same on S3 (a real moto_server on loopback) -----------------------------------------


@pytest.fixture()
def s3(tmp_path: Path):
    """A moto S3 server on a free loopback port and a pyarrow S3FileSystem with a bucket."""
    import shutil
    import socket
    import subprocess
    import time

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server")
    assert exe, "moto_server not installed (pip install 'moto[server]', the dev extra)"
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    keys = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)
    deadline = time.time() + 30
    while True:
        try:
            client.create_bucket(Bucket="ckpt")
            break
        except Exception:
            if time.time() > deadline:
                proc.kill()
                raise
            time.sleep(0.2)
    fs = pafs.S3FileSystem(
        access_key="test", secret_key="test", endpoint_override=endpoint, scheme="http",
        region="us-east-1", allow_bucket_creation=True,
    )  # fmt: skip
    yield fs, client
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.slow
def test_upload_and_choice_on_s3(s3, tmp_path: Path) -> None:
    fs, client = s3
    policy = RetryPolicy(retries=1, backoff_s=0.01)
    for name, step in [("checkpoint_a", 10), ("checkpoint_b", 20)]:
        src = stored_checkpoint(tmp_path / "local", name, step)
        upload_checkpoint_dir(src, fs, f"ckpt/run/{name}", policy, step=step)
    # An upload cut off before its manifest (half the file there): the newest step, incomplete.
    client.delete_object(Bucket="ckpt", Key=f"run/checkpoint_b/{MANIFEST_FILE}")
    key = "run/checkpoint_b/checkpoint.pt"
    body = client.get_object(Bucket="ckpt", Key=key)["Body"].read()
    client.put_object(Bucket="ckpt", Key=key, Body=body[: len(body) // 2])
    chosen = choose_checkpoint(fs, "ckpt/run", None, tmp_path / "work")
    assert chosen is not None and chosen.step == 10 and chosen.path == "ckpt/run/checkpoint_a"
    assert load_checkpoint(chosen.local / "checkpoint.pt")["step"] == 10
    with pytest.raises(RuntimeError, match="no complete checkpoint in s3://ckpt/other"):
        choose_checkpoint(fs, "ckpt/other", "ckpt/run/checkpoint_b", tmp_path / "w2")
