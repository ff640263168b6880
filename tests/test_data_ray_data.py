"""The Ray Data input path (pipeline.data.ray_data) against the default loader, on digits shards
written by the test: the same batch contract, bit-identical pixels and masks per (seed, epoch,
key), equal steps on two ranks over an uneven shard split, and a 2-worker Ray Train run."""

from __future__ import annotations

import collections
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, DataConfig, MaskConfig, load_config
from pipeline.data import build_loader, expand_urls
from pipeline.data.ray_data import (
    build_dataset,
    decode_rows,
    epoch_batches,
    read_shards,
    steps_per_epoch,
    to_batch,
)
from pipeline.data.writer import Source, digits_source, write_shards

N_SAMPLES = 197  # 6 shards of 29 and one of 23: the ranks' halves cut a shard unevenly
DATA = DataConfig(image_size=32, resize=40, batch_size=16, shuffle_buffer=40)
MASK = MaskConfig(kind="random_region")  # seeded per sample: a wrong seed shows in the masks


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits")
    src = digits_source(32)
    write_shards(Source(src.items[:N_SAMPLES], src.classes, []), out, prefix="dg",
                 shard_size=29, seed=0, progress=False)  # fmt: skip
    return str(out / "dg-{000000..000006}.tar")


@pytest.fixture(scope="module")
def ray_with_room(ray_local):
    """The session's Ray restarted with 4 logical CPUs for this module, and back to 2 after:
    two Ray Train workers hold a CPU each, and Ray Data's read and decode tasks need CPUs
    beside them (on a cluster: other nodes' CPUs)."""
    from pipeline.runtime import start_local_ray

    ray_local.shutdown()
    start_local_ray(4, log_to_driver=False)
    yield ray_local
    ray_local.shutdown()
    start_local_ray(2, log_to_driver=False)


def default_rows(urls: str, epoch: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """key -> that sample's tensors from one epoch of the default loader (one rank)."""
    out = {}
    for b in build_loader(DATA, MASK, urls=urls, train=True, epoch=epoch, seed=seed):
        for i, key in enumerate(b["key"]):
            out[key] = {name: b[name][i] for name in ("image", "input", "mask", "label")}
    return out


def assert_same_samples(batches: list[dict], reference: dict[str, dict]) -> None:
    for b in batches:
        for i, key in enumerate(b["key"]):
            for name, want in reference[key].items():
                assert torch.equal(b[name][i], want), (key, name)


def test_wire_batches_match_the_default_loader_without_ray(shards: str) -> None:
    """read_shards + decode_rows + to_batch as plain functions: same keys, dtypes, shapes and
    bit-identical tensors per (seed, epoch, key) as build_loader."""
    urls = np.array(expand_urls(shards), dtype=object)
    blocks = [blk for u in urls for blk in read_shards({"url": np.array([u], dtype=object)})]
    assert sum(len(blk["key"]) for blk in blocks) == N_SAMPLES
    ref_batch = next(iter(build_loader(DATA, MASK, urls=shards, train=True, epoch=2, seed=7)))
    reference = default_rows(shards, epoch=2, seed=7)
    for blk in blocks:
        wire = decode_rows(blk, data=DATA, mask=MASK, seed=7, first_epoch=2)
        batch = to_batch(wire, MASK)
        assert batch.pop("epoch") == 2
        assert set(batch) == set(ref_batch)
        for name in ("image", "input", "mask", "label", "valid"):
            assert batch[name].dtype == ref_batch[name].dtype, name
            assert batch[name].shape[1:] == ref_batch[name].shape[1:], name
        assert batch["valid"].all() and batch["skipped"] == 0
        assert_same_samples([batch], reference)
    other = to_batch(decode_rows(blocks[0], data=DATA, mask=MASK, seed=7, first_epoch=3), MASK)
    assert not torch.equal(other["mask"], to_batch(decode_rows(blocks[0], data=DATA, mask=MASK,
                           seed=7, first_epoch=2), MASK)["mask"])  # fmt: skip


def test_a_bad_sample_keeps_its_row_as_a_counted_invalid_repeat(shards: str) -> None:
    url = expand_urls(shards)[0]
    blk = next(read_shards({"url": np.array([url], dtype=object)}))
    samples = list(blk["sample"])
    samples[3] = __import__("pickle").dumps({"jpg": b"not an image", "cls": b"1"})
    blk = {**blk, "sample": np.array(samples, dtype=object)}
    batch = to_batch(decode_rows(blk, data=DATA, mask=MASK, seed=0, first_epoch=0), MASK)
    assert len(batch["key"]) == len(samples)  # the row count (and the step count) holds
    assert batch["skipped"] == 1 and batch["valid"].tolist().count(False) == 1
    assert blk["key"][3] not in batch["key"]


def test_config_input_is_validated() -> None:
    assert load_config(overrides=["data.input=ray_data"]).data.input == "ray_data"
    with pytest.raises(ConfigError, match="data.input"):
        load_config(overrides=["data.input=ray"])
    with pytest.raises(ConfigError, match="data.input=ray_data"):
        load_config(overrides=["data.input=ray_data", "data.resampled=true",
                               "data.steps_per_epoch=5"])  # fmt: skip


def test_one_rank_two_epochs_match_the_default_loader(ray_with_room, shards: str) -> None:
    ds = build_dataset(DATA, MASK, urls=shards, seed=7)
    shard = ds.iterator()
    for epoch in (0, 1):
        loader = epoch_batches(shard, DATA, MASK, urls=shards, rank=0, world_size=1,
                               epoch=epoch, seed=7)  # fmt: skip
        batches = list(loader)
        assert len(loader) == len(batches) == N_SAMPLES // 16
        keys = [k for b in batches for k in b["key"]]
        assert len(keys) == len(set(keys)) == 16 * len(batches)
        assert_same_samples(batches, default_rows(shards, epoch=epoch, seed=7))


def test_resume_and_a_truncated_shard_keep_the_step_count(
    ray_with_room, shards: str, tmp_path: Path
) -> None:
    """start_batch hands out the rest of a pass; samples lost to a truncated shard (counted
    in the manifest, gone from the tar) become padded steps, valid=False, never fewer steps."""
    folder = Path(expand_urls(shards)[0]).parent
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cut = tmp_path / "dg-000000.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    urls = str(tmp_path / "dg-{000000..000006}.tar")
    shard = build_dataset(DATA, MASK, urls=urls, seed=2).iterator()
    loader = epoch_batches(shard, DATA, MASK, urls=urls, rank=0, world_size=1, epoch=0, seed=2,
                           start_batch=3)  # fmt: skip
    batches = list(loader)
    steps = N_SAMPLES // 16
    assert len(loader) == len(batches) == steps - 3
    valid = [int(b["valid"].sum()) for b in batches]
    blocks = read_shards({"url": np.array(expand_urls(urls), dtype=object)})
    lost = N_SAMPLES - sum(len(b["key"]) for b in blocks)
    assert lost > 0 and valid.count(0) == steps - (N_SAMPLES - lost) // 16
    assert all(v == 16 for v in valid if v)


def test_two_ranks_take_equal_steps_from_an_uneven_split(ray_with_room, shards: str) -> None:
    its = build_dataset(DATA, MASK, urls=shards, seed=1).streaming_split(2, equal=True)
    got: dict[int, list] = {}

    def rank(r: int) -> None:
        loader = epoch_batches(its[r], DATA, MASK, urls=shards, rank=r, world_size=2,
                               epoch=0, seed=1)  # fmt: skip
        got[r] = [len(loader), [b["key"] for b in loader]]

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    steps = steps_per_epoch(N_SAMPLES, 2, 16)
    assert steps == 6 and [got[r][0] for r in range(2)] == [steps, steps]
    assert [len(got[r][1]) for r in range(2)] == [steps, steps]
    keys = collections.Counter(k for r in range(2) for b in got[r][1] for k in b)
    assert len(keys) == 2 * steps * 16 and max(keys.values()) == 1


def test_two_worker_pretraining_on_ray_data(tmp_path: Path, ray_with_room, shards: str) -> None:
    from mlflow.tracking import MlflowClient

    from jobs.pretrain import main

    overrides = {
        "data.train_shards": shards, "data.image_size": 32, "model.image_size": 32,
        "data.input": "ray_data", "data.batch_size": 16, "data.shuffle_buffer": 32,
        "model.width": 8, "model.bottleneck": 32, "train.max_steps": 12,
        "train.log_every": 6, "train.checkpoint_every": 6, "train.eval_batches": 0,
        "run.output_root": str(tmp_path / "out"), "run.name": "raydata", "run.num_workers": 2,
        "run.max_failures": 0, "run.run_name": "raydata",
    }  # fmt: skip
    res = main([f"{k}={v}" for k, v in overrides.items()])
    assert res.metrics["step"] == 12
    # 6 steps an epoch (197 // 2 // 16) on this path; the default loader's 7 would leave epoch 1
    assert res.metrics["epoch"] == 2
    assert Path(res.checkpoint_path, "checkpoint.pt").is_file()
    run = MlflowClient(tracking_uri=res.tracking_uri).get_run(res.mlflow_run_id)
    assert run.data.tags["ce.steps_per_rank"] == "12,12" and run.info.status == "FINISHED"
