"""make_shards: round trip (every source image back once, bytes unchanged, with its label),
bad files listed, no overwriting, atomic output, the digits default with its train/test split."""

from __future__ import annotations

import io
import json
import tarfile
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
