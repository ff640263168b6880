"""Resume keeps the newest checkpoint through a flaky store: a real S3 API (moto_server) behind
a real loopback TCP proxy that resets the connection on the first GETs of a chosen object.

pyarrow's S3 client (built as Ray Train builds it, default retry strategy) already retries a
request 3 times, so the proxy resets the first 3 GETs: an error that outlasts the client's own
retries, which before reached the resume as "unreadable" and made it fall back to an older
checkpoint (whose later reports then let Ray Train prune the newer one)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from pipeline.checkpoint import (
    CheckpointReadError,
    choose_checkpoint,
    load_checkpoint,
    save_checkpoint,
    stored_config,
    upload_checkpoint_dir,
    write_manifest,
)
from pipeline.config import load_config, to_dict
from pipeline.retry import NO_RETRY, RetryPolicy
from servers import MotoServer, ResettingProxy

pytestmark = pytest.mark.integration  # starts moto_server

SDK_ATTEMPTS = 3  # pyarrow.fs.AwsStandardS3RetryStrategy's default max_attempts
RETRY = RetryPolicy(retries=2, backoff_s=0.05)
RUN = "ckpt/run"


def s3fs(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(access_key="test", secret_key="test", endpoint_override=endpoint,
                             scheme="http", region="us-east-1")  # fmt: skip


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """moto_server with a run holding complete checkpoints at steps 10 (older) and 20 (newest),
    uploaded as a run's rank 0 uploads them (manifest last, config inside)."""
    server = MotoServer("ckpt")
    local = tmp_path_factory.mktemp("local")
    fs = s3fs(server.endpoint)
    for name, step in (("checkpoint_a", 10), ("checkpoint_b", 20)):
        folder = local / name
        folder.mkdir()
        cfg = to_dict(load_config(None, [f"train.lr_d={step / 1e4}"]))
        save_checkpoint(folder / "checkpoint.pt",
                        {"step": step, "w": torch.full((256, 256), float(step))})  # fmt: skip
        write_manifest(folder, step=step, config=cfg)
        upload_checkpoint_dir(folder, fs, f"{RUN}/{name}", NO_RETRY, step=step)
    yield server
    server.stop()


@pytest.fixture()
def proxy(moto, request):
    """A fresh proxy per test: `request.param` = (match, resets)."""
    match, resets = request.param
    p = ResettingProxy(moto.port, match=match, resets=resets)
    yield p
    p.close()


@pytest.mark.parametrize(
    "proxy",
    [
        (b"", SDK_ATTEMPTS),  # the first GETs of the resume, whatever they are (the listing)
        (b"checkpoint_b/checkpoint_manifest.json", SDK_ATTEMPTS),  # the newest manifest
        (b"checkpoint_b/checkpoint.pt", SDK_ATTEMPTS),  # the newest checkpoint's download
    ],
    indirect=True,
    ids=["first-get", "newest-manifest", "newest-download"],
)
def test_resume_retries_and_keeps_the_newest(proxy, tmp_path: Path):
    chosen = choose_checkpoint(s3fs(proxy.endpoint), RUN, None, tmp_path / "w", RETRY)
    assert len(proxy.reset_lines) == SDK_ATTEMPTS, proxy.gets  # the faults did happen
    assert chosen is not None and chosen.step == 20 and chosen.path == f"{RUN}/checkpoint_b"
    state = load_checkpoint(chosen.local / "checkpoint.pt")
    assert state["step"] == 20 and float(state["w"][0, 0]) == 20.0


@pytest.mark.parametrize(
    "proxy", [(b"checkpoint_b/checkpoint_manifest.json", SDK_ATTEMPTS)], indirect=True
)
def test_an_unreadable_newest_stops_the_resume_instead_of_falling_back(proxy, tmp_path: Path):
    """Without retries left, the resume fails (Ray Train retries the attempt) rather than start
    from step 10 while step 20 is complete."""
    with pytest.raises(CheckpointReadError, match="checkpoint_b/checkpoint_manifest.json"):
        choose_checkpoint(s3fs(proxy.endpoint), RUN, "ckpt/run/checkpoint_a", tmp_path, NO_RETRY)


@pytest.mark.parametrize(
    "proxy", [(b"checkpoint_b/checkpoint_manifest.json", SDK_ATTEMPTS)], indirect=True
)
def test_the_identity_check_reads_the_newest_config_through_resets(proxy):
    got = stored_config(s3fs(proxy.endpoint), RUN, RETRY)
    assert len(proxy.reset_lines) == SDK_ATTEMPTS
    assert got is not None and got.step == 20 and got.config["train"]["lr_d"] == 20 / 1e4
