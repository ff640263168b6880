"""Bad input inside real shards: corrupt JPEGs, a sample without an image, a truncated tar,
forged tar headers. The stream finishes, the skip count is exact, and every good sample arrives
once."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from deadline import hard_timeout
from PIL import Image
from sklearn.datasets import load_sample_images

from pipeline.config import DataConfig, MaskConfig
from pipeline.data import build_loader

PER_SHARD = 20
TRUNCATE_AT = 12  # the sample of shard 2 whose JPEG the truncation cuts


def photo_crops(n: int) -> list[bytes]:
    """n real 32-px JPEG crops from scikit-learn's bundled photographs."""
    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        y, x = rng.integers(0, img.shape[0] - 32), rng.integers(0, img.shape[1] - 32)
        buf = io.BytesIO()
        Image.fromarray(img[y : y + 32, x : x + 32]).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_bad_shards(folder: Path, with_manifest: bool) -> tuple[str, set[str]]:
    """3 shards of 20; shard 0 has two corrupt JPEGs, shard 1 a sample with only a label,
    shard 2 is cut inside sample 12's JPEG. Returns (pattern, keys that must arrive)."""
    jpgs, good = photo_crops(3 * PER_SHARD), set()
    for s in range(3):
        with wds.TarWriter(str(folder / f"bad-{s:06d}.tar")) as w:
            for i in range(PER_SHARD):
                key, data = f"s{s}-{i:03d}", jpgs[s * PER_SHARD + i]
                sample = {"__key__": key, "jpg": data, "cls": b"1"}
                if (s, i) == (0, 3):
                    sample["jpg"] = b"not a jpeg at all" * 10
                elif (s, i) == (0, 7):
                    sample["jpg"] = data[: len(data) // 2]  # truncated JPEG stream
                elif (s, i) == (1, 5):
                    del sample["jpg"]
                elif s < 2 or i < TRUNCATE_AT:
                    good.add(key)
                w.write(sample)
    shard2 = folder / "bad-000002.tar"
    with tarfile.open(shard2) as tf:
        m = tf.getmember(f"s2-{TRUNCATE_AT:03d}.jpg")
        cut = m.offset_data + m.size // 2
    if with_manifest:  # written before the damage, as make_shards would have
        entries = [{"name": f"bad-{s:06d}.tar", "count": PER_SHARD} for s in range(3)]
        (folder / "manifest.json").write_text(json.dumps({"shards": entries}))
    shard2.write_bytes(shard2.read_bytes()[:cut])
    return str(folder / "bad-{000000..000002}.tar"), good


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("with_manifest", [False, True])
def test_bad_samples_are_skipped_and_counted(
    tmp_path: Path, workers: int, with_manifest: bool
) -> None:
    pattern, good = write_bad_shards(tmp_path, with_manifest)
    data = DataConfig(image_size=32, batch_size=8, num_workers=workers, shuffle_buffer=16)
    loader = build_loader(data, MaskConfig(), urls=pattern, train=True, world_size=1)
    batches = list(loader)
    keys = [k for b in batches for k, v in zip(b["key"], b["valid"].tolist(), strict=True) if v]
    assert sorted(keys) == sorted(good)  # every good sample once, nothing else
    # 2 corrupt + 1 without image + the cut sample; with a manifest (20 planned in shard 2)
    # the 7 samples after the cut are known lost too.
    expected = 4 + (PER_SHARD - TRUNCATE_AT - 1 if with_manifest else 0)
    assert loader.skipped == sum(b["skipped"] for b in batches) == expected
    assert len(batches) == len(loader)


def test_missing_labels_in_a_labelled_stream_are_skipped(tmp_path: Path) -> None:
    jpgs = photo_crops(6)
    with wds.TarWriter(str(tmp_path / "mixed-000000.tar")) as w:
        for i, data in enumerate(jpgs):
            sample = {"__key__": f"m{i}", "jpg": data, "cls": str(i).encode()}
            if i == 2:
                del sample["cls"]
            w.write(sample)
    loader = build_loader(
        DataConfig(image_size=32, batch_size=6),
        MaskConfig(),
        urls=str(tmp_path / "mixed-000000.tar"),
        train=False,
    )
    (b,) = list(loader)
    assert b["key"] == ["m0", "m1", "m3", "m4", "m5"] and b["label"].tolist() == [0, 1, 3, 4, 5]
    assert b["skipped"] == 1


def test_unlabelled_shards_have_no_label(tmp_path: Path) -> None:
    with wds.TarWriter(str(tmp_path / "u-000000.tar")) as w:
        for i, data in enumerate(photo_crops(4)):
            w.write({"__key__": f"u{i}", "jpg": data})
    (b,) = list(
        build_loader(
            DataConfig(image_size=32, batch_size=4),
            MaskConfig(),
            urls=str(tmp_path / "u-000000.tar"),
            train=True,
        )
    )
    assert "label" not in b and len(b["key"]) == 4 and b["skipped"] == 0


# ---- forged tar headers (issue 19): the loader finishes and counts what it lost --------------

FORGED = 10  # samples per forged shard
# shard -> (sample whose jpg header is forged, how); the cls member comes first in each sample,
# so the header scan has counted the forged sample and the reader's loss of it is a skip.
FORGERIES = {
    0: (4, "size", b"-0000001000\0"),  # the old reader looped forever, counting and reading
    1: (6, "size", b"\x80" + (2**40).to_bytes(11, "big")),  # was a MemoryError
    2: (2, "size", b"\x80" + (2**88 - 1).to_bytes(11, "big")),  # was an OverflowError
    3: (8, "name", b"forged.jpg"),  # checksum left as it was: a bad checksum
}


def _forge_member(shard: Path, name: str, field: str, value: bytes) -> None:
    """Overwrite one header field of member `name`; the checksum is fixed unless the field is
    the name (then the old checksum no longer matches)."""
    with tarfile.open(shard) as tf:
        at = tf.getmember(name).offset
    blob = bytearray(shard.read_bytes())
    hdr = blob[at : at + 512]
    start, length = {"size": (124, 12), "name": (0, 100)}[field]
    hdr[start : start + length] = value.ljust(length, b"\0")
    if field == "size":
        hdr[148:156] = b" " * 8
        hdr[148:156] = b"%06o\0 " % sum(hdr)
    blob[at : at + 512] = hdr
    shard.write_bytes(bytes(blob))


def write_forged_shards(folder: Path, with_manifest: bool) -> tuple[str, set[str]]:
    """Five shards of FORGED real JPEG samples, shards 0-3 forged as FORGERIES says, shard 4
    clean. Returns (pattern, keys that must arrive)."""
    jpgs, good = photo_crops(5 * FORGED), set()
    for s in range(5):
        shard = folder / f"forged-{s:06d}.tar"
        with wds.TarWriter(str(shard)) as w:
            for i in range(FORGED):
                key = f"f{s}-{i:03d}"
                w.write({"__key__": key, "jpg": jpgs[s * FORGED + i], "cls": b"3"})
                if s not in FORGERIES or i < FORGERIES[s][0]:
                    good.add(key)
        if s in FORGERIES:
            i, field, value = FORGERIES[s]
            _forge_member(shard, f"f{s}-{i:03d}.jpg", field, value)
    if with_manifest:
        entries = [{"name": f"forged-{s:06d}.tar", "count": FORGED} for s in range(5)]
        (folder / "manifest.json").write_text(json.dumps({"shards": entries}))
    return str(folder / "forged-{000000..000004}.tar"), good


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("with_manifest", [False, True])
def test_forged_headers_end_their_shard_and_the_run_goes_on(
    tmp_path: Path, workers: int, with_manifest: bool, caplog
) -> None:
    pattern, good = write_forged_shards(tmp_path, with_manifest)
    data = DataConfig(image_size=32, batch_size=8, num_workers=workers, shuffle_buffer=16)
    with hard_timeout(120):  # the old reader never returned here
        loader = build_loader(data, MaskConfig(), urls=pattern, train=True, world_size=1)
        batches = list(loader)
    keys = [k for b in batches for k, v in zip(b["key"], b["valid"].tolist(), strict=True) if v]
    assert sorted(keys) == sorted(good)  # every sample before a forged header, once
    # Without a manifest the header scan knows each forged sample (its cls came first) and
    # nothing after it: 1 skip per forged shard. With one, every sample from the forged one on.
    lost_after = sum(FORGED - i for i, _, _ in FORGERIES.values())
    expected = lost_after if with_manifest else len(FORGERIES)
    assert loader.skipped == sum(b["skipped"] for b in batches) == expected
    assert len(batches) == len(loader)
    if workers == 0:  # the loader workers' log lines do not reach caplog
        lines = [r.getMessage() for r in caplog.records if "bad tar header" in r.getMessage()]
        assert any("negative member size -512" in m for m in lines)
        assert any("forged-000003.tar: byte" in m and "checksum" in m for m in lines)


def test_max_member_bytes_reaches_counter_and_reader(tmp_path: Path) -> None:
    """A cap below one JPEG's size: without a manifest, the count stops where the reader stops
    (had the counter not known the cap, it would count all 10 and 10 - k would be lost)."""
    jpgs = sorted(photo_crops(10), key=len)  # the big ones last
    shard = tmp_path / "cap-000000.tar"
    with wds.TarWriter(str(shard)) as w:
        for i, data in enumerate(jpgs):
            w.write({"__key__": f"c{i}", "jpg": data, "cls": b"1"})
    cap = len(jpgs[6])
    first_big = next(i for i, j in enumerate(jpgs) if len(j) > cap)
    assert 7 <= first_big < 10
    data = DataConfig(image_size=32, batch_size=4, max_member_bytes=cap)
    loader = build_loader(data, MaskConfig(), urls=str(shard), train=False)
    batches = list(loader)
    keys = [k for b in batches for k, v in zip(b["key"], b["valid"].tolist(), strict=True) if v]
    assert keys == [f"c{i}" for i in range(first_big)]
    assert loader.skipped == 1  # the sample whose jpg is over the cap


@pytest.mark.integration  # ~20 s on the shared machine: two epochs with loader workers
def test_a_training_run_over_forged_shards_finishes(tmp_path: Path, one_thread) -> None:
    """The training loop itself (pipeline.trainer.fit, two loader workers, no manifest) over
    the forged shards: two full epochs of planned steps, every forged shard's skip logged in
    the `skipped` metric each epoch. (A pretraining run over such shards made no step in 300 s
    before.)"""
    from pipeline.config import Config, ModelConfig, TrainConfig
    from pipeline.trainer import Trainer, fit

    pattern, good = write_forged_shards(tmp_path, with_manifest=False)
    data = DataConfig(image_size=32, batch_size=8, num_workers=2, shuffle_buffer=16)
    steps_per_epoch = -(-(len(good) + len(FORGERIES)) // 8)  # the scan counts each cut sample
    cfg = Config(
        data=data,
        model=ModelConfig(image_size=32, width=8, bottleneck=16),
        train=TrainConfig(max_steps=2 * steps_per_epoch, log_every=1, checkpoint_every=1000),
    )
    logs: list[dict] = []

    def loader_for_epoch(epoch: int, start_batch: int):
        return build_loader(
            cfg.data, cfg.mask, urls=pattern, train=True, epoch=epoch, start_batch=start_batch
        )

    with hard_timeout(180):
        trainer = fit(Trainer(cfg), loader_for_epoch, on_log=logs.append)
    assert (trainer.step, trainer.epoch) == (2 * steps_per_epoch, 2)
    assert sum(m["skipped"] for m in logs) == 2 * len(FORGERIES)
    assert all(np.isfinite(m["loss_g"]) for m in logs)
