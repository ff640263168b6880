"""Writing WebDataset shards from an image folder tree or scikit-learn's digits.

Each sample is `<key>.<jpg|png>` (the source bytes unchanged where they already are JPEG or
PNG) plus `<key>.cls` (the label as ASCII digits). Samples are shuffled across shards with a
seed. Shards are written into a hidden temporary folder inside `out` and renamed into place
only when all are complete; `manifest.json` is written last, so an interrupted run never
leaves a complete-looking shard set behind (pipeline.data.manifest writes it).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.data.manifest import MANIFEST, write_manifest

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}


class SourceError(ValueError):
    """The source is missing, empty, or not laid out as expected."""


@dataclass(frozen=True)
class SourceItem:
    """One image to write: `read()` returns (extension, bytes), raising on unreadable input."""

    key: str
    label: int
    origin: str  # the file path (or array index) it came from, for the manifest
    read: Callable[[], tuple[str, bytes]]


@dataclass(frozen=True)
class Source:
    items: list[SourceItem]
    classes: list[str]
    skipped: list[dict[str, str]]  # {"path", "reason"} for files left out while listing


def _safe_key(text: str) -> str:
    """WebDataset keys end at the first dot; keep keys to [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _checked_file(path: Path) -> tuple[str, bytes]:
    """The file's bytes, after decoding them once: truncated or non-image files raise here.
    JPEG draft mode makes the check a 1/8-scale decode (it still reads the whole stream)."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        if img.format not in ("JPEG", "PNG"):
            raise ValueError(f"{img.format} data behind a {path.suffix} name")
        img.draft("RGB", (64, 64))
        img.load()
        ext = "jpg" if img.format == "JPEG" else "png"
    return ext, data


def folder_source(root: Path) -> Source:
    """ROOT/<class>/<image> with jpg/jpeg/png in any case; classes are the sorted folder names
    and a label is an index into them. Other files are listed as skipped."""
    if not root.is_dir():
        raise SourceError(f"source folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    skipped = [
        {"path": str(p), "reason": "not inside a class folder"}
        for p in sorted(root.iterdir())
        if p.is_file()
    ]
    items, seen = [], set()
    for label, name in enumerate(classes):
        for path in sorted(p for p in (root / name).rglob("*") if p.is_file()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append({"path": str(path), "reason": f"not an image ({path.suffix!r})"})
                continue
            key = _safe_key(str(path.relative_to(root).with_suffix("")))
            while key in seen:  # a.jpg and a.png in one folder
                key += "_"
            seen.add(key)
            items.append(SourceItem(key, label, str(path), lambda p=path: _checked_file(p)))
    if not items:
        raise SourceError(
            f"no jpg/jpeg/png images found under {root} (expected ROOT/<class>/<image>)"
        )
    return Source(items, classes, skipped)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def digits_source(size: int = 32) -> Source:
    """scikit-learn's bundled digits (1,797 8x8 grayscale images, values 0..16), upscaled to
    size x size PNGs so the 32-px pipeline can crop them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)

    def reader(i: int) -> Callable[[], tuple[str, bytes]]:
        def read() -> tuple[str, bytes]:
            img = Image.fromarray(images[i]).resize((size, size), Image.Resampling.BILINEAR)
            return "png", _png_bytes(np.asarray(img))

        return read

    items = [
        SourceItem(f"digits-{i:05d}", int(digits.target[i]), f"digits[{i}]", reader(i))
        for i in range(len(images))
    ]
    return Source(items, [str(c) for c in digits.target_names], [])


def key_share(key: str) -> float:
    """A key's fixed place in [0, 1): sha256 of the key, so a sample's split never depends on
    the seed, the source order or which other samples exist."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def split_items(
    items: list[SourceItem], test_fraction: float, seed: int, val_fraction: float = 0.0
) -> dict[str, list[SourceItem]]:
    """{'all': items}, or 'train' / 'val' / 'test' splits, each shuffled.

    val: a share of all items chosen by key alone (`key_share`): the split every choice
    (checkpoint, search, probe C) is made on, fixed whatever the seed. test: a stratified share
    of all items drawn with `seed` from the rest, read only to score."""
    if not 0 <= test_fraction < 1 or not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
        raise SourceError(
            f"--split-test ({test_fraction}) and --split-val ({val_fraction}) must be in [0, 1) "
            "and leave a training share"
        )
    rng = np.random.default_rng(seed)
    if test_fraction <= 0 and val_fraction <= 0:
        return {"all": [items[i] for i in rng.permutation(len(items))]}
    val = np.array([key_share(it.key) < val_fraction for it in items])
    labels = np.array([it.label for it in items])
    test = np.zeros(len(items), dtype=bool)
    for c in np.unique(labels):  # stratified: every class keeps its share of all items
        idx = rng.permutation(np.flatnonzero((labels == c) & ~val))
        test[idx[: round((labels == c).sum() * test_fraction)]] = True
    splits = {"train": ~test & ~val, "val": val, "test": test}
    return {
        name: [items[i] for i in rng.permutation(np.flatnonzero(chosen))]
        for name, chosen in splits.items()
        if chosen.any() or name == "train"
    }


def shard_stem(prefix: str, split: str) -> str:
    return prefix if split == "all" else f"{prefix}-{split}"


def existing_outputs(out: Path, prefix: str) -> list[Path]:
    """Shards of this prefix (and a manifest) already in `out`."""
    if not out.is_dir():
        return []
    found = sorted(out.glob(f"{prefix}-*.tar"))
    return found + ([out / MANIFEST] if (out / MANIFEST).exists() else [])


def _write_split(
    items: list[SourceItem], tmp: Path, stem: str, shard_size: int, bar: tqdm
) -> tuple[list[dict], list[dict]]:
    """Write one split's shards into `tmp`; returns (shard entries, skipped entries)."""
    counts: dict[str, int] = {}
    skipped = []
    with wds.ShardWriter(str(tmp / f"{stem}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for it in items:
            bar.update(1)
            try:
                ext, data = it.read()
            except (OSError, ValueError, SyntaxError) as e:
                skipped.append({"path": it.origin, "reason": f"unreadable: {e}"})
                continue
            sink.write({"__key__": it.key, ext: data, "cls": str(it.label).encode()})
            name = os.path.basename(sink.fname)
            counts[name] = counts.get(name, 0) + 1
    shards = [
        {"name": n, "count": c, "bytes": (tmp / n).stat().st_size}
        for n, c in sorted(counts.items())
    ]
    return shards, skipped


def brace_pattern(folder: Path, names: list[str]) -> str:
    """'folder/stem-{000000..000003}.tar' for consecutive shard names (or the single name)."""
    if len(names) == 1:
        return str(folder / names[0])
    stem = names[0].rsplit("-", 1)[0]
    last = names[-1].rsplit("-", 1)[1].split(".")[0]
    return str(folder / f"{stem}-{{{'0' * len(last)}..{last}}}.tar")


def write_shards(
    source: Source,
    out: Path,
    *,
    prefix: str,
    shard_size: int,
    seed: int,
    test_fraction: float = 0.0,
    val_fraction: float = 0.0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write the source as shards into `out` and return the manifest (also written, last)."""
    if shard_size <= 0:
        raise SourceError(f"--shard-size must be > 0, got {shard_size}")
    old = existing_outputs(out, prefix)
    if old and not overwrite:
        raise FileExistsError(
            f"{out} already holds {[p.name for p in old][:4]}...; pass --overwrite to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)
    splits = split_items(source.items, test_fraction, seed, val_fraction)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-partial-", dir=out))
    try:
        manifest = _write_all(source, splits, tmp, out, prefix, shard_size, progress)
        manifest["seed"], manifest["shard_size"] = seed, shard_size
        for p in old:
            p.unlink()
        for entry in manifest["shards"]:
            os.replace(tmp / entry["name"], out / entry["name"])
        write_manifest(manifest, out, staging=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_all(source, splits, tmp, out, prefix, shard_size, progress) -> dict:
    shards, skipped, split_info = [], list(source.skipped), {}
    with tqdm(total=len(source.items), desc="shards", unit="img", disable=not progress) as bar:
        for split, items in splits.items():
            written, bad = _write_split(items, tmp, shard_stem(prefix, split), shard_size, bar)
            for s in written:
                s["split"] = split
            shards += written
            skipped += bad
            names = [s["name"] for s in written]
            split_info[split] = {
                "total": sum(s["count"] for s in written),
                "pattern": brace_pattern(out, names) if names else "",
            }
    total = sum(s["count"] for s in shards)
    if total == 0:
        raise SourceError(f"every source file was unreadable ({len(skipped)} skipped)")
    return {
        "shards": shards,
        "total": total,
        "splits": split_info,
        "classes": source.classes,
        "skipped": skipped,
    }
