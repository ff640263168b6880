"""Bad input inside real shards: corrupt JPEGs, a sample without an image, a truncated tar.
The stream finishes, the skip count is exact, and every good sample arrives once."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
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
