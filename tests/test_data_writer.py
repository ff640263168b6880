"""make_shards: round trip (every source image back once, bytes unchanged, with its label),
bad files and decompression bombs listed, no overwriting (and --overwrite deletes only the files
its manifest lists), atomic output, the digits default with its train/test split."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from jobs.make_shards import main
from pipeline.config import DataConfig, MaskConfig
from pipeline.data import build_loader
from pipeline.data.writer import Source, SourceError, SourceItem, folder_source, write_shards


def read_shards(folder: Path) -> dict[str, tuple[str, bytes, int]]:
    """key -> (image ext, image bytes, label), via Python's tarfile (independent of our code)."""
    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                assert key not in members or ext not in members[key], f"duplicate {m.name}"
                members.setdefault(key, {})[ext] = tf.extractfile(m).read()
    out = {}
    for key, sample in members.items():
        ext = "jpg" if "jpg" in sample else "png"
        out[key] = (ext, sample[ext], int(sample["cls"]))
    return out


@pytest.fixture
def image_tree(tmp_path: Path) -> tuple[Path, dict[bytes, int]]:
    """ROOT/<class>/<image> with real photo crops as .jpg/.JPEG/.png, plus files to skip.
    Returns (root, {image bytes: label})."""
    root = tmp_path / "src"
    photos = load_sample_images().images
    expected, rng = {}, np.random.default_rng(0)
    for label, cls in enumerate(["cat", "dog", "fish"]):
        (root / cls).mkdir(parents=True)
        for i in range(9):
            img = photos[i % 2]
            y, x = rng.integers(0, 300), rng.integers(0, 500)
            fmt, name = [("JPEG", f"a{i}.jpg"), ("JPEG", f"b.{i}.JPEG"), ("PNG", f"c{i}.png")][
                i % 3
            ]
            buf = io.BytesIO()
            Image.fromarray(img[y : y + 40, x : x + 48]).save(buf, format=fmt)
            (root / cls / name).write_bytes(buf.getvalue())
            expected[buf.getvalue()] = label
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "README").write_text("top-level file")
    return root, expected


def test_folder_round_trip(image_tree, tmp_path: Path) -> None:
    root, expected = image_tree
    out = tmp_path / "shards"
    manifest = main(["--src", str(root), "--out", str(out), "--shard-size", "10", "--seed", "3"])
    got = read_shards(out)
    assert sorted((v[1], v[2]) for v in got.values()) == sorted(expected.items())
    assert all("." not in k for k in got)
    assert manifest["total"] == 27 and manifest["classes"] == ["cat", "dog", "fish"]
    # The plan is 28 files in runs of 10, fixed before any is read (so any --workers gives the
    # same shards): the unreadable one leaves a hole in its shard instead of shifting the rest.
    counts = [s["count"] for s in manifest["shards"]]
    assert sorted(planned - c for planned, c in zip([10, 10, 8], counts, strict=True)) == [0, 0, 1]
    assert manifest["splits"]["all"]["pattern"] == str(out / "src-{000000..000002}.tar")
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"notes.txt", "broken.jpg", "README"}
    assert reasons["broken.jpg"].startswith("unreadable")
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp dir left
    # Shuffled across shards: the first shard is not just the first class.
    with tarfile.open(out / "src-000000.tar") as tf:
        labels = {int(tf.extractfile(m).read()) for m in tf if m.name.endswith(".cls")}
    assert len(labels) > 1


def test_existing_shards_are_kept_unless_overwrite(image_tree, tmp_path: Path) -> None:
    root, _ = image_tree
    out = tmp_path / "shards"
    main(["--src", str(root), "--out", str(out), "--shard-size", "10"])
    before = (out / "src-000000.tar").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["--src", str(root), "--out", str(out), "--shard-size", "100"])
    assert (out / "src-000000.tar").read_bytes() == before
    main(["--src", str(root), "--out", str(out), "--shard-size", "100", "--overwrite"])
    assert sorted(p.name for p in out.glob("*.tar")) == ["src-000000.tar"]  # stale ones gone
    assert json.loads((out / "manifest.json").read_text())["shards"][0]["count"] == 27


def test_interrupted_run_leaves_nothing_complete_looking(image_tree, tmp_path: Path) -> None:
    root, _ = image_tree
    src = folder_source(root)

    def interrupt() -> tuple[str, bytes]:
        raise KeyboardInterrupt

    items = src.items[:15] + [SourceItem("stop", 0, "stop", interrupt)] + src.items[15:]
    out = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        write_shards(
            Source(items, src.classes, []), out, prefix="x", shard_size=5, seed=0, progress=False
        )
    assert list(out.iterdir()) == []  # no shard, no manifest, no temp folder


def test_bad_sources_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        main(["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(SourceError, match="no jpg/jpeg/png images"):
        main(["--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])


def test_digits_default_split_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    manifest = main(["--src", "digits", "--out", str(out), "--shard-size", "500"])
    train, val, test = (manifest["splits"][k] for k in ("train", "val", "test"))
    assert train["total"] + val["total"] + test["total"] == 1797
    assert test["total"] == pytest.approx(360, abs=5)
    assert val["total"] == pytest.approx(180, abs=30)  # by key hash: about 10 % of all
    assert (out / "digits-train-000000.tar").is_file() and (
        out / "digits-test-000000.tar"
    ).is_file()
    assert train["pattern"] == str(out / "digits-train-{000000..000002}.tar")
    assert val["pattern"] == str(out / "digits-val-000000.tar")
    got = read_shards(out)
    assert len(got) == 1797 and all(ext == "png" for ext, _, _ in got.values())
    img = Image.open(io.BytesIO(next(iter(got.values()))[1]))
    assert img.size == (32, 32)
    # Stratified: every digit is in the held-out split.
    with tarfile.open(out / "digits-test-000000.tar") as tf:
        test_keys = [n.split(".")[0] for n in tf.getnames() if n.endswith(".cls")]
    test_labels = {got[k][2] for k in test_keys}
    assert test_labels == set(range(10))
    # And the loader reads the split back, each sample once with its label.
    loader = build_loader(
        DataConfig(image_size=32, batch_size=128), MaskConfig(), urls=test["pattern"], train=False
    )
    seen = {k: int(y) for b in loader for k, y in zip(b["key"], b["label"], strict=True)}
    assert len(seen) == test["total"] and all(seen[k] == got[k][2] for k in seen)


def test_validation_split_is_fixed_by_key_and_disjoint(tmp_path: Path) -> None:
    """The val split depends on the keys alone: another seed reshuffles train and test but never
    moves a sample into or out of val, and no key is in two splits."""

    def keys_by_split(seed: int) -> dict[str, set[str]]:
        out = tmp_path / f"seed{seed}"
        main(["--src", "digits", "--out", str(out), "--seed", str(seed), "--split-val", "0.15"])
        by_split: dict[str, set[str]] = {}
        for tar in sorted(out.glob("*.tar")):
            split = tar.name.split("-")[1]
            with tarfile.open(tar) as tf:
                names = {n.split(".")[0] for n in tf.getnames()}
            by_split.setdefault(split, set()).update(names)
        return by_split

    a, b = keys_by_split(0), keys_by_split(1)
    assert set(a) == {"train", "val", "test"}
    assert a["val"] == b["val"] and a["test"] != b["test"]
    assert len(a["val"]) == pytest.approx(0.15 * 1797, abs=40)
    assert not (a["val"] & a["train"]) and not (a["val"] & a["test"])
    assert not (a["train"] & a["test"])
    assert sum(map(len, a.values())) == 1797


def test_split_shares_must_leave_a_training_share(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="training share"):
        main(["--src", "digits", "--out", str(tmp_path / "o"), "--split-test", "0.5",
              "--split-val", "0.5"])  # fmt: skip


def png_bytes(
    width: int, height: int, *, bit_depth: int = 8, color: int = 2, rows: int = 1
) -> bytes:
    """A real PNG declaring width x height whose IDAT holds `rows` rows of zeros (all rows: a
    valid image; fewer: truncated). A decompression bomb is such a header with huge sizes."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    channels = {0: 1, 2: 3}[color]
    row = 1 + (width * channels * bit_depth + 7) // 8  # a filter byte, then the pixels
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    idat = zlib.compress(bytes(row * rows), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bombs_are_skipped_and_listed(image_tree, tmp_path: Path) -> None:
    """A PNG declaring 100000 x 100000 pixels (PIL's DecompressionBombError: over twice
    Image.MAX_IMAGE_PIXELS) used to end the whole run; one of 9500 x 9500 1-bit pixels (only
    PIL's warning) was decoded to 90 MB. Both are now listed as skipped, the rest written."""
    root, expected = image_tree
    assert Image.MAX_IMAGE_PIXELS < 9500 * 9500 < 2 * Image.MAX_IMAGE_PIXELS < 10**10
    (root / "cat" / "bomb.png").write_bytes(png_bytes(100_000, 100_000))
    (root / "dog" / "warn.png").write_bytes(png_bytes(9500, 9500, bit_depth=1, color=0, rows=9500))
    out = tmp_path / "shards"
    manifest = main(["--src", str(root), "--out", str(out), "--shard-size", "10"])
    assert manifest["total"] == len(expected) == 27
    assert sorted((v[1], v[2]) for v in read_shards(out).values()) == sorted(expected.items())
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert (
        "decompression bomb" in reasons["bomb.png"] and "decompression bomb" in reasons["warn.png"]
    )
    assert reasons["broken.jpg"].startswith("unreadable")


def test_overwrite_removes_only_the_files_its_manifest_lists(image_tree, tmp_path: Path) -> None:
    """Two sets in one folder whose prefixes overlap (`src` and `src-small`: the old prefix glob
    `src-*.tar` took both). Overwriting one leaves the other's files and manifest entries."""
    root, _ = image_tree
    out = tmp_path / "shards"
    main(["--src", str(root), "--out", str(out), "--shard-size", "10"])  # src-00000{0..2}
    small = ["--src", str(root), "--out", str(out), "--shard-size", "5", "--prefix", "src-small"]
    main(small)  # beside it: nothing of src-small's is there, so no --overwrite is needed
    small_files = {p.name: p.read_bytes() for p in out.glob("src-small-*.tar")}
    assert len(small_files) == 6
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["--src", str(root), "--out", str(out), "--shard-size", "100"])
    manifest = main(["--src", str(root), "--out", str(out), "--shard-size", "100", "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.glob("src-small-*.tar")} == small_files
    assert sorted(p.name for p in out.glob("src-0*.tar")) == ["src-000000.tar"]  # stale gone
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest and manifest["prefix"] == "src" and manifest["total"] == 27
    entries = {s["name"]: s for s in manifest["shards"]}
    assert set(entries) == {"src-000000.tar", *small_files}
    assert {entries[n]["prefix"] for n in small_files} == {"src-small"}
    # The readers still take src-small's counts from the manifest: every sample once.
    loader = build_loader(
        DataConfig(image_size=32, batch_size=9),
        MaskConfig(),
        urls=str(out / "src-small-{000000..000005}.tar"),
        train=False,
    )
    assert sum(int(b["valid"].sum()) for b in loader) == 27
    # And src-small overwritten in turn leaves src alone.
    main([*small, "--overwrite"])
    assert (out / "src-000000.tar").is_file() and len(list(out.glob("src-small-*.tar"))) == 6
