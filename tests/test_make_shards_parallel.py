"""make_shards --workers N: the plan is fixed up front, so N processes write the same bytes as
one (names, samples, order, manifest); holes from unreadable files stay in their planned shard;
a failing worker leaves no shard set; a remote --out (a real fsspec filesystem) gets the same
shards with the manifest last."""

from __future__ import annotations

import functools
import io
import json
import operator
import tarfile
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from jobs.make_shards import main, resolve_workers
from pipeline.data.writer import (
    Source,
    SourceError,
    SourceItem,
    folder_source,
    plan_shards,
    split_items,
    write_shards,
)


@pytest.fixture
def jpeg_tree(tmp_path: Path) -> Path:
    """ROOT/<class>/<image>: 3 classes x 14 real JPEGs (random noise, 24x20), 2 broken files."""
    root, rng = tmp_path / "src", np.random.default_rng(1)
    for cls in ("a", "b", "c"):
        (root / cls).mkdir(parents=True)
        for i in range(14):
            buf = io.BytesIO()
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buf, format="JPEG", quality=80)
            (root / cls / f"img{i:02d}.jpg").write_bytes(buf.getvalue())
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "c" / "empty.png").write_bytes(b"")
    return root


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every member in order, via Python's tarfile (independent of our code)."""
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf]


def run(root: Path, out: Path, workers: int) -> dict:
    args = ["--src", str(root), "--out", str(out), "--shard-size", "4", "--seed", "7"]
    return main([*args, "--split-val", "0.2", "--split-test", "0.2", "--workers", str(workers)])


@pytest.mark.slow  # starts process pools
def test_any_number_of_workers_writes_the_same_bytes(jpeg_tree: Path, tmp_path: Path) -> None:
    one = run(jpeg_tree, tmp_path / "one", workers=1)
    three = run(jpeg_tree, tmp_path / "three", workers=3)  # forked workers (no other thread)
    # With another thread alive the pool spawns fresh interpreters instead: same bytes too.
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait)
    busy.start()
    try:
        two = run(jpeg_tree, tmp_path / "two", workers=2)
    finally:
        stop.set()
        busy.join()
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(names) == len(one["shards"]) + 1 > 8  # every shard + the manifest, nothing else
    for other, manifest in (("three", three), ("two", two)):
        assert names == sorted(p.name for p in (tmp_path / other).iterdir())
        for name in names:
            if name.endswith(".tar"):
                got = (tmp_path / other / name).read_bytes()
                assert got == (tmp_path / "one" / name).read_bytes()
                assert tar_members(tmp_path / other / name)  # real, non-empty tars
        # The manifests differ only in the folder named by the patterns.
        text = (tmp_path / other / "manifest.json").read_text().replace(other, "one")
        assert json.loads(text) == one and manifest["total"] == one["total"] == 42
    assert sorted(Path(s["path"]).name for s in one["skipped"]) == ["broken.jpg", "empty.png"]


def test_plan_is_consecutive_runs_of_each_split(jpeg_tree: Path) -> None:
    splits = split_items(folder_source(jpeg_tree).items, 0.2, seed=7, val_fraction=0.2)
    jobs = plan_shards(splits, "p", shard_size=4)
    for split, items in splits.items():
        mine = [j for j in jobs if j.split == split]
        assert [j.index for j in mine] == list(range(len(mine)))
        assert [it.key for j in mine for it in j.items] == [it.key for it in items]
        assert all(len(j.items) == 4 for j in mine[:-1]) and 1 <= len(mine[-1].items) <= 4
        assert {j.stem for j in mine} == {f"p-{split}"}


def test_a_shard_of_only_unreadable_files_is_dropped_and_names_stay_consecutive(
    jpeg_tree: Path, tmp_path: Path
) -> None:
    src = folder_source(jpeg_tree)
    missing = functools.partial(Path.read_bytes, tmp_path / "missing.jpg")  # raises OSError
    bad = [SourceItem(f"gone{i}", 0, f"gone{i}", missing) for i in range(200)]
    # No split: one shuffle of 242 items, 200 bad: many shards of 4 hold only bad ones.
    manifest = write_shards(
        Source(src.items + bad, src.classes, []), tmp_path / "o", prefix="q", shard_size=4,
        seed=0, progress=False,
    )  # fmt: skip
    jobs = plan_shards(split_items(src.items + bad, 0.0, 0), "q", 4)
    unreadable = {it.key for it in bad} | {"a_broken", "c_empty"}
    all_bad = sum(all(it.key in unreadable for it in j.items) for j in jobs)
    assert all_bad > 0
    assert len(manifest["shards"]) == len(jobs) - all_bad
    names = [s["name"] for s in manifest["shards"]]
    assert names == [f"q-{k:06d}.tar" for k in range(len(names))]
    assert sorted(p.name for p in (tmp_path / "o").glob("*.tar")) == names
    assert manifest["total"] == 42 and len(manifest["skipped"]) == 202
    counted = sum(len(tar_members(tmp_path / "o" / n)) for n in names)
    assert counted == 2 * 42  # an image and a .cls per sample


def test_a_failing_worker_leaves_no_shard_set(jpeg_tree: Path, tmp_path: Path) -> None:
    src = folder_source(jpeg_tree)
    crash = SourceItem("crash", 0, "crash", functools.partial(operator.truediv, 1, 0))
    out = tmp_path / "o"
    with pytest.raises(ZeroDivisionError):
        write_shards(
            Source([*src.items, crash], src.classes, []), out, prefix="x", shard_size=3,
            seed=0, progress=False, workers=2,
        )  # fmt: skip
    assert list(out.iterdir()) == []  # no shard, no manifest, no staging folder


def test_remote_out_gets_the_shards_then_the_manifest(jpeg_tree: Path, tmp_path: Path) -> None:
    """memory:// is a real fsspec filesystem that is not local: the path s3:// and gs:// take."""
    url = "memory://bucket-sh/cifar/shards"
    fs = fsspec.filesystem("memory")
    try:
        remote = run(jpeg_tree, url, workers=1)  # type: ignore[arg-type]
        local = run(jpeg_tree, tmp_path / "local", workers=1)
        for s in local["shards"]:
            got = fs.cat_file(f"/bucket-sh/cifar/shards/{s['name']}")
            assert got == (tmp_path / "local" / s["name"]).read_bytes()
        manifest = json.loads(fs.cat_file("/bucket-sh/cifar/shards/manifest.json"))
        assert manifest == remote and remote["total"] == local["total"]
        assert remote["splits"]["train"]["pattern"].startswith(f"{url}/src-train-{{000000..")
        assert len(fs.ls("/bucket-sh/cifar/shards")) == len(local["shards"]) + 1
        with pytest.raises(FileExistsError, match="--overwrite"):
            run(jpeg_tree, url, workers=1)  # type: ignore[arg-type]
    finally:
        fs.rm("/bucket-sh", recursive=True)


def test_workers_flag_is_checked() -> None:
    assert resolve_workers(3) == 3 and resolve_workers(0) >= 1
    with pytest.raises(SourceError, match="--workers"):
        resolve_workers(-1)
    with pytest.raises(SourceError, match="--workers must be >= 1"):
        write_shards(Source([], [], []), "unused", prefix="p", shard_size=1, seed=0, workers=0)
