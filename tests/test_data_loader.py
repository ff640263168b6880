"""The shard stream: exactly-once epochs with equal step counts, resampled epochs, resuming,
URL handling and remote (fsspec) shards, on real CIFAR-10 shards and on digits shards written
with make_shards in a temp dir."""

from __future__ import annotations

import collections
import io
import math
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig, MaskConfig
from pipeline.data import build_loader, expand_urls, plan_rank_batches, shard_sample_counts
from pipeline.data.writer import Source, digits_source, write_shards


def tar_labels(urls: list[str]) -> dict[str, int]:
    """key -> label read with Python's own tarfile: an oracle independent of the reader."""
    out = {}
    for url in urls:
        with tarfile.open(url) as tf:
            for m in tf:
                if m.name.endswith(".cls"):
                    out[m.name[: -len(".cls")]] = int(tf.extractfile(m).read())
    return out


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> str:
    """197 real digits (32-px PNGs) in 7 shards: 6 of 29 and one of 23."""
    out = tmp_path_factory.mktemp("digits")
    src = digits_source(32)
    write_shards(
        Source(src.items[:197], src.classes, []),
        out,
        prefix="dg",
        shard_size=29,
        seed=0,
        progress=False,
    )
    return str(out / "dg-{000000..000006}.tar")


def run_epoch(urls: str, world: int, workers: int, **data_kw) -> tuple[list, list, list]:
    """(valid keys over all ranks, len(loader) per rank, batches seen per rank)."""
    keys, lens, seen = [], [], []
    data = DataConfig(image_size=32, num_workers=workers, **data_kw)
    for rank in range(world):
        loader = build_loader(
            data, MaskConfig(), urls=urls, train=True, rank=rank, world_size=world, epoch=1
        )
        n = 0
        for b in loader:
            keys += [k for k, v in zip(b["key"], b["valid"].tolist(), strict=True) if v]
            n += 1
        lens.append(len(loader))
        seen.append(n)
    return keys, lens, seen


def check_exactly_once(urls: str, keys: list[str], lens: list[int], seen: list[int]) -> None:
    expected = tar_labels(expand_urls(urls))
    counts = collections.Counter(keys)
    assert set(counts) == set(expected)
    assert max(counts.values()) == 1
    assert len(set(lens)) == 1 and lens == seen


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_digits_epoch_exactly_once(digits_shards: str, world: int, workers: int) -> None:
    keys, lens, seen = run_epoch(digits_shards, world, workers, batch_size=16, shuffle_buffer=40)
    check_exactly_once(digits_shards, keys, lens, seen)
    assert lens[0] == math.ceil(math.ceil(197 / world) / 16)


CIFAR_CASES = [(3, 2), (2, 0)] + [
    pytest.param(w, n, marks=pytest.mark.slow) for w, n in [(1, 0), (1, 2), (2, 2), (3, 0)]
]


@pytest.mark.cifar
@pytest.mark.parametrize(("world", "workers"), CIFAR_CASES)
def test_cifar_epoch_exactly_once(cifar_test: str, world: int, workers: int) -> None:
    # Two real shards of 5,000: for world 3 neither shards nor samples divide evenly.
    keys, lens, seen = run_epoch(cifar_test, world, workers, batch_size=500)
    check_exactly_once(cifar_test, keys, lens, seen)
    assert len(keys) == 10_000


def _plans(counts: list[int], *, world_size: int, **kw) -> list:
    """Every rank's batch plan for epoch 0, seed 0."""
    return [
        plan_rank_batches(counts, rank=r, world_size=world_size, seed=0, epoch=0, **kw)
        for r in range(world_size)
    ]


def test_plan_balanced_and_padded() -> None:
    # 10 samples, 3 ranks, batch 4: ceil(ceil(10/3)/4) = 1 step; sizes 3, 3, 4.
    plans = _plans([6, 4], world_size=3, batch_size=4, shuffle_buffer=8, shuffle=True)
    assert [len(p) for p in plans] == [1, 1, 1]
    assert sorted(np.concatenate([p[0] for p in plans]).tolist()) == list(range(10))
    # 5 samples, 3 ranks, batch 1: 2 steps each; the rank with 1 sample pads its second batch.
    plans = _plans([5], world_size=3, batch_size=1, shuffle_buffer=1, shuffle=False)
    assert [len(p) for p in plans] == [2, 2, 2]
    assert plans[0][1].tolist() == [-1]  # a repeat of index 0, marked by the -1 - i encoding
    # 100 samples, batch 64, 1 rank: 2 batches of 50, not 64 + 36.
    plan = plan_rank_batches(
        [100], rank=0, world_size=1, batch_size=64, shuffle_buffer=10, shuffle=True, seed=0, epoch=0
    )
    assert [len(b) for b in plan] == [50, 50]


def test_padding_rows_are_invalid(digits_shards: str) -> None:
    # 29 samples over 40 ranks: every rank runs 1 step; ranks without a sample get padding.
    one = expand_urls(digits_shards)[0]
    data = DataConfig(image_size=32, batch_size=2)
    keys, world = [], 40
    for rank in range(world):
        loader = build_loader(data, MaskConfig(), urls=one, train=True, rank=rank, world_size=world)
        (b,) = list(loader)
        owned = (rank + 1) * 29 // world - rank * 29 // world
        assert len(loader) == 1 and int(b["valid"].sum()) == owned and len(b["key"]) >= 1
        keys += [k for k, v in zip(b["key"], b["valid"].tolist(), strict=True) if v]
    assert sorted(keys) == sorted(tar_labels([one]))


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_fixed_steps(digits_shards: str, workers: int) -> None:
    data = DataConfig(
        image_size=32,
        batch_size=16,
        num_workers=workers,
        resampled=True,
        steps_per_epoch=5,
        shuffle_buffer=30,
    )
    for rank in range(2):
        loader = build_loader(
            data, MaskConfig(), urls=digits_shards, train=True, rank=rank, world_size=2
        )
        sizes = [len(b["key"]) for b in loader]
        assert len(loader) == 5 and sizes == [16] * 5


def test_resampled_draws_repeat_per_seed_and_differ_per_rank(digits_shards: str) -> None:
    """WebDataset's ResampledShards + shuffle, seeded from (seed, epoch, rank): the same
    arguments give the same samples, another rank or epoch other ones."""
    data = DataConfig(image_size=32, batch_size=8, resampled=True, steps_per_epoch=3,
                      shuffle_buffer=20)  # fmt: skip

    def keys(rank: int, epoch: int) -> list[str]:
        loader = build_loader(data, MaskConfig(), urls=digits_shards, train=True, rank=rank,
                              world_size=2, epoch=epoch, seed=3)  # fmt: skip
        return [k for b in loader for k in b["key"]]

    first = keys(0, 0)
    assert len(first) == 24 and keys(0, 0) == first
    assert keys(1, 0) != first and keys(0, 1) != first
    assert set(first) <= set(tar_labels(expand_urls(digits_shards)))


def test_resume_and_worker_count_give_the_same_batches(digits_shards: str) -> None:
    def batches(workers: int, start: int) -> list[dict]:
        data = DataConfig(image_size=32, batch_size=16, num_workers=workers, shuffle_buffer=50)
        return list(
            build_loader(
                data,
                MaskConfig(kind="random_region"),
                urls=digits_shards,
                train=True,
                epoch=3,
                seed=5,
                start_batch=start,
            )
        )

    full, resumed, two = batches(0, 0), batches(0, 4), batches(2, 0)
    assert len(resumed) == len(full) - 4
    assert [b["key"] for b in resumed] == [b["key"] for b in full[4:]]
    assert [b["key"] for b in two] == [b["key"] for b in full]
    for a, b in zip(full, two, strict=True):
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["mask"], b["mask"])
    data = DataConfig(image_size=32, batch_size=16, shuffle_buffer=50)
    other = build_loader(data, MaskConfig(), urls=digits_shards, train=True, epoch=4, seed=5)
    assert [b["key"] for b in other] != [b["key"] for b in full]  # a new epoch reshuffles


def test_batch_contract_and_eval_transform(cifar_test: str) -> None:
    one = expand_urls(cifar_test)[:1]
    data = DataConfig(image_size=32, batch_size=64)
    loader = build_loader(data, MaskConfig(), urls=one[0], train=False)
    b = next(iter(loader))
    assert b["image"].shape == b["input"].shape == (64, 3, 32, 32)
    assert b["mask"].shape == (64, 1, 32, 32) and b["image"].dtype == torch.float32
    assert b["label"].dtype == torch.int64 and b["valid"].all() and b["skipped"] == 0
    labels = tar_labels(one)
    assert b["label"].tolist() == [labels[k] for k in b["key"]]
    # Eval at 32 px from 32-px sources: the image is the decoded JPEG, unflipped, in [-1, 1].
    with tarfile.open(one[0]) as tf:
        jpg = tf.extractfile(f"{b['key'][0]}.jpg").read()
    ref = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(b["image"][0].permute(1, 2, 0), torch.from_numpy(ref), atol=1e-6)


def test_expand_urls(tmp_path: Path, digits_shards: str) -> None:
    urls = expand_urls(digits_shards)
    assert len(urls) == 7 and urls[0].endswith("dg-000000.tar")
    folder = str(Path(urls[0]).parent)
    assert expand_urls(f"{urls[0]},{folder}/dg-{{000001..000002}}.tar") == urls[:3]
    assert expand_urls(folder) == urls  # a folder means its *.tar files
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_urls(str(tmp_path / "nothing-{000..003}.tar"))
    with pytest.raises(FileNotFoundError, match="1 of 8"):
        expand_urls(f"{folder}/dg-{{000000..000007}}.tar")
    with pytest.raises(ValueError, match="more than once"):
        expand_urls(f"{urls[0]},{urls[0]}")
    with pytest.raises(ValueError, match="empty"):
        expand_urls("")


def test_counts_from_manifest_and_headers(tmp_path: Path, digits_shards: str) -> None:
    urls = expand_urls(digits_shards)
    from_manifest = shard_sample_counts(urls)
    for u in urls:  # without the manifest the tar headers are scanned
        (tmp_path / Path(u).name).write_bytes(Path(u).read_bytes())
    scanned = shard_sample_counts([str(tmp_path / Path(u).name) for u in urls])
    assert from_manifest == scanned == [29] * 6 + [23]


@pytest.mark.cifar
def test_cifar_counts(cifar_train: str) -> None:
    assert shard_sample_counts(expand_urls(cifar_train)[:3]) == [5000] * 3


def test_memory_protocol_through_fsspec(digits_shards: str) -> None:
    # memory:// lives in this process only, so no loader workers here (see the next test).
    fs = fsspec.filesystem("memory")
    urls = expand_urls(digits_shards)
    for u in urls[:3]:
        fs.pipe(f"/ce-test/{Path(u).name}", Path(u).read_bytes())
    pattern = "memory://ce-test/dg-{000000..000002}.tar"
    assert shard_sample_counts(expand_urls(pattern)) == [29, 29, 29]
    keys, lens, seen = run_epoch(pattern, 2, 0, batch_size=8)
    assert sorted(keys) == sorted(tar_labels(urls[:3]))
    assert lens == seen


def test_fsspec_handler_in_loader_workers(digits_shards: str) -> None:
    # local:// is fsspec's local filesystem under a scheme WebDataset does not know: it only
    # opens if each spawned worker routes it to fsspec itself.
    pattern = "local://" + digits_shards
    keys, lens, seen = run_epoch(pattern, 1, 2, batch_size=16)
    assert sorted(keys) == sorted(tar_labels(expand_urls(digits_shards)))
    assert lens == seen


def test_bad_arguments(digits_shards: str) -> None:
    with pytest.raises(ValueError, match="rank 2"):
        build_loader(
            DataConfig(), MaskConfig(), urls=digits_shards, train=True, rank=2, world_size=2
        )
    with pytest.raises(ValueError, match="start_batch"):
        build_loader(
            DataConfig(batch_size=16), MaskConfig(), urls=digits_shards, train=True, start_batch=99
        )


def _tar_bytes(members: list[tuple[str, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("chunk", [512, 1536, 1 << 20])
def test_tar_reader_groups_skips_and_truncates(monkeypatch, fmt: int, chunk: int) -> None:
    # Members straddling the read-ahead window, names in folders, long names (GNU / pax; the
    # ustar prefix field for ustar), a member without an extension, a big member, skipped
    # samples: the reader must agree with the grouping by key, and with tarfile's bytes.
    import pipeline.data.tar as sr

    monkeypatch.setattr(sr, "CHUNK", chunk)
    long_dir = "d" * 90 + "/" + "e" * 60
    members = [
        ("a.jpg", b"x" * 700),
        ("a.cls", b"1"),
        ("sub/b.seg.PNG", bytes(range(256)) * 9),
        ("sub/b.cls", b" 2\n"),
        ("README", b"no extension"),
        (f"{long_dir}/c.jpg", b"y" * 5000),
        (f"{long_dir}/c.cls", b"3"),
        ("d.jpg", b"z" * 1),
    ]
    blob = _tar_bytes(members, fmt)
    want = {
        "a": {"jpg": b"x" * 700, "cls": b"1"},
        "sub/b": {"seg.png": bytes(range(256)) * 9, "cls": b" 2\n"},
        f"{long_dir}/c": {"jpg": b"y" * 5000, "cls": b"3"},
        "d": {"jpg": b"z"},
    }
    got = list(sr.iter_tar_samples(io.BytesIO(blob), lambda _: True))
    assert [(i, k) for i, k, _ in got] == list(enumerate(want))
    assert all(s == want[k] for _, k, s in got)
    some = list(sr.iter_tar_samples(io.BytesIO(blob), {1, 3}.__contains__))
    assert [(i, k) for i, k, _ in some] == [(1, "sub/b"), (3, "d")]
    assert sr.count_tar_samples(io.BytesIO(blob)) == (4, None)
    # Cut inside c.jpg: a and b come out, then the error; the count sees c's header.
    cut = blob[: blob.index(b"y" * 5000) + 100]
    out = []
    with pytest.raises(sr.TarReadError):
        for _, k, _ in sr.iter_tar_samples(io.BytesIO(cut), lambda _: True):
            out.append(k)
    assert out == ["a", "sub/b"]
    n, err = sr.count_tar_samples(io.BytesIO(cut))
    assert n == 3 and err
