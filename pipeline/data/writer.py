"""Writing WebDataset shards from an image folder tree or scikit-learn's digits.

Each sample is `<key>.<jpg|png>` (the source bytes unchanged where they already are JPEG or
PNG) plus `<key>.cls` (the label as ASCII digits). Samples are shuffled across shards with a
seed, and the plan of which sample goes into which shard is fixed up front (`plan_shards`), so
the shards can be written by any number of processes (`workers`) and come out byte-identical:
same names, same samples in the same order, the same tar bytes (a fixed member mtime).

Shards are written into a hidden temporary folder (inside `out` when it is local, so the final
rename is atomic) and moved into place only when all are complete; `manifest.json` is written
last, so an interrupted run never leaves a complete-looking shard set behind
(pipeline.data.manifest writes it). A remote `out` (s3://, gs://, ... through fsspec) is staged
on local disk and uploaded shard by shard, manifest last.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.data.manifest import MANIFEST, write_manifest
from pipeline.data.urls import is_local, local_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
# Every tar member gets this mtime (the epoch), so the same source and seed give the same bytes
# whenever and with however many processes they are written.
SHARD_MTIME = 0.0


class SourceError(ValueError):
    """The source is missing, empty, or not laid out as expected."""


@dataclass(frozen=True)
class SourceItem:
    """One image to write: `read()` returns (extension, bytes), raising on unreadable input.
    `read` must pickle (a module-level function or a functools.partial of one) for workers > 1."""

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
    """The file's bytes, after decoding them once: truncated or non-image files raise here
    (ValueError / OSError / SyntaxError, which write_shard lists as skipped). JPEG draft mode
    makes the check a 1/8-scale decode (it still reads the whole stream). A decompression bomb
    (PIL's DecompressionBombWarning, over Image.MAX_IMAGE_PIXELS, made an error here; its
    DecompressionBombError, over twice that) and any other decoder failure is a ValueError:
    the sources are untrusted, and one bad file must not end the whole run."""
    data = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decoded_once(path, data), data
    except UnidentifiedImageError:  # its message names the BytesIO's address: not repeatable
        raise ValueError("not a readable image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError):
        raise
    except Exception as e:  # PIL's decoders raise many types on hostile input
        raise ValueError(f"undecodable image: {type(e).__name__}: {e}") from None


def _decoded_once(path: Path, data: bytes) -> str:
    """'jpg' or 'png' after a full (JPEG: draft) decode of `data`."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format not in ("JPEG", "PNG"):
            raise ValueError(f"{img.format} data behind a {path.suffix} name")
        img.draft("RGB", (64, 64))
        img.load()
        return "jpg" if img.format == "JPEG" else "png"


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
            items.append(SourceItem(key, label, str(path), functools.partial(_checked_file, path)))
    if not items:
        raise SourceError(
            f"no jpg/jpeg/png images found under {root} (expected ROOT/<class>/<image>)"
        )
    return Source(items, classes, skipped)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _digit_png(images: np.ndarray, i: int, size: int) -> tuple[str, bytes]:
    img = Image.fromarray(images[i]).resize((size, size), Image.Resampling.BILINEAR)
    return "png", _png_bytes(np.asarray(img))


def digits_source(size: int = 32) -> Source:
    """scikit-learn's bundled digits (1,797 8x8 grayscale images, values 0..16), upscaled to
    size x size PNGs so the 32-px pipeline can crop them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    items = [
        SourceItem(
            f"digits-{i:05d}",
            int(digits.target[i]),
            f"digits[{i}]",
            functools.partial(_digit_png, images, i, size),
        )
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


@dataclass(frozen=True)
class ShardJob:
    """One planned shard: its split, its place in that split's plan, its samples in order."""

    split: str
    stem: str
    index: int
    items: list[SourceItem]

    @property
    def file(self) -> str:
        """Its name while staged; the final name is given once every shard is written."""
        return f"{self.stem}-plan-{self.index:06d}.tar"


def plan_shards(
    splits: dict[str, list[SourceItem]], prefix: str, shard_size: int
) -> list[ShardJob]:
    """Consecutive runs of `shard_size` samples of each (already shuffled) split. Decided before
    any image is read, so what lands in which shard cannot depend on the number of workers."""
    return [
        ShardJob(split, shard_stem(prefix, split), k, items[start : start + shard_size])
        for split, items in splits.items()
        for k, start in enumerate(range(0, len(items), shard_size))
    ]


def write_shard(job: ShardJob, folder: str) -> tuple[int, list[dict[str, str]]]:
    """Write one planned shard to folder/job.file; returns (samples written, skipped entries).
    Module-level (and `job` picklable) so a worker process can run it."""
    count, skipped = 0, []
    with open(Path(folder) / job.file, "wb") as f, wds.TarWriter(f, mtime=SHARD_MTIME) as sink:
        for it in job.items:
            try:
                ext, data = it.read()
            except (OSError, ValueError, SyntaxError) as e:
                skipped.append({"path": it.origin, "reason": f"unreadable: {e}"})
                continue
            sink.write({"__key__": it.key, ext: data, "cls": str(it.label).encode()})
            count += 1
    return count, skipped


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None


def _bar(total: int, progress: bool) -> tqdm | _NoBar:
    # No tqdm object at all when hidden: even a disabled one starts tqdm's monitor thread, and a
    # process with another thread gets spawned (slow-starting) workers instead of forked ones.
    return tqdm(total=total, desc="shards", unit="img") if progress else _NoBar()


def _write_planned(
    jobs: list[ShardJob], folder: Path, workers: int, progress: bool
) -> list[tuple[int, list[dict[str, str]]]]:
    """Every job's result, in plan order, written here (workers == 1) or by a process pool."""
    total = sum(len(j.items) for j in jobs)
    if workers == 1 or len(jobs) <= 1:
        results = []
        with _bar(total, progress) as shown:
            for job in jobs:
                results.append(write_shard(job, str(folder)))
                shown.update(len(job.items))
        return results
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=_pool_context())
    results: list = [None] * len(jobs)
    try:
        # Submitted before the bar exists: a forked pool starts its workers at the first submit.
        futures = {pool.submit(write_shard, job, str(folder)): i for i, job in enumerate(jobs)}
        with _bar(total, progress) as shown:
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                shown.update(len(jobs[i].items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error: no new shard starts
    return results


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork when this process runs no other thread (the make_shards CLI): a forked worker starts
    at once, where a spawned one first imports webdataset and with it torch (1 s on an idle
    machine, 7 s on a loaded 2-core one). spawn otherwise (inside a Ray worker or any threaded
    process, where fork could copy a lock another thread holds; macOS, where fork is unsafe).
    The output is the same either way."""
    # tqdm's monitor thread (left by any earlier bar) only sleeps and touches tqdm's own lock,
    # which a worker never takes: it does not make fork unsafe here.
    others = [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and t.name != "tqdm_monitor"
    ]
    if sys.platform == "linux" and not others:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


class _Destination:
    """The output folder. Local: staged in a hidden folder inside it, so moving a shard into
    place is an atomic rename. Remote (any fsspec URL): staged in a local temporary folder and
    uploaded; an object store shows an object only once its upload is complete."""

    def __init__(self, out: str | Path):
        self.url = str(out)
        self.local = is_local(self.url)
        if self.local:
            self.folder = Path(local_path(self.url))
        else:
            self.fs, root = fsspec.core.url_to_fs(self.url)
            self.root = root.rstrip("/")

    def _path(self, name: str) -> str:
        return str(self.folder / name) if self.local else f"{self.root}/{name}"

    def _on_disk(self, prefix: str) -> list[str]:
        """Names of the files in the folder that this prefix's shards would be called."""
        if self.local:
            if not self.folder.is_dir():
                return []
            found = [p.name for p in self.folder.glob(f"{prefix}-*.tar")]
        else:
            found = [p.rsplit("/", 1)[-1] for p in self.fs.glob(f"{self.root}/{prefix}-*.tar")]
        own = set_names(prefix)
        return sorted(n for n in found if own.fullmatch(n))

    def read_manifest(self) -> list[dict]:
        """The shard entries of the manifest already in the folder ([] when there is none, or
        when it is unreadable: a warning says so)."""
        try:
            if self.local:
                raw = (self.folder / MANIFEST).read_bytes()
            else:
                raw = self.fs.cat_file(f"{self.root}/{MANIFEST}")
            entries = json.loads(raw)["shards"]
            if not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries):
                raise ValueError("a shard entry without a name")
            return entries
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the unreadable %s in %s: %s", MANIFEST, self.url, e)
            return []

    def existing(self, prefix: str, entries: list[dict]) -> tuple[list[str], list[str]]:
        """(this prefix's shards that `entries`, the folder's manifest, lists and that exist;
        files named like this prefix's shards that it does not list). Only the first are ever
        deleted: a prefix glob would also take another set's shards (`cifar-*` matches
        `cifar-small-000000.tar`)."""
        on_disk = self._on_disk(prefix)
        listed = [e["name"] for e in entries if owned_by(e, prefix)]
        if self.local:
            listed = [n for n in listed if (self.folder / n).is_file()]
        else:
            listed = [n for n in listed if self.fs.exists(self._path(n))]
        return listed, [n for n in on_disk if n not in listed]

    def staging(self, prefix: str) -> Path:
        if not self.local:
            return Path(tempfile.mkdtemp(prefix=f"{prefix}-partial-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{prefix}-partial-", dir=self.folder))

    def pattern(self, names: list[str]) -> str:
        folder = str(self.folder) if self.local else self.url.rstrip("/")
        return brace_pattern(folder, names)

    def publish(self, staged: Path, manifest: dict, old: list[str]) -> None:
        """Replace the shards named in `old` by the staged shards, then write the manifest:
        last, so it never names a shard that is not there yet."""
        names = [s["name"] for s in manifest["shards"] if s.get("prefix") == manifest["prefix"]]
        if self.local:
            for name in old:
                (self.folder / name).unlink(missing_ok=True)
            for name in names:
                os.replace(staged / name, self.folder / name)
            write_manifest(manifest, self.folder, staging=staged)
            return
        if old:
            self.fs.rm([self._path(n) for n in old])
        self.fs.put([str(staged / n) for n in names], [self._path(n) for n in names])
        write_manifest(manifest, staged, staging=staged)
        self.fs.put_file(str(staged / MANIFEST), self._path(MANIFEST))


def set_names(prefix: str) -> re.Pattern[str]:
    """The names of a shard set's files: <prefix>[-train|-val|-test]-NNNNNN.tar."""
    return re.compile(rf"{re.escape(prefix)}(-(train|val|test))?-\d{{6}}\.tar")


def owned_by(entry: dict, prefix: str) -> bool:
    """Whether a manifest entry belongs to this prefix's set: its `prefix` field, or for a
    manifest written before entries had one, its name."""
    if "prefix" in entry:
        return entry["prefix"] == prefix
    return bool(set_names(prefix).fullmatch(entry["name"]))


def existing_outputs(out: str | Path, prefix: str) -> list[str]:
    """This prefix's shards already in `out` (a folder or an fsspec URL): those its manifest
    lists, then unlisted files named like them."""
    dest = _Destination(out)
    listed, unlisted = dest.existing(prefix, dest.read_manifest())
    return listed + unlisted


def brace_pattern(folder: str | Path, names: list[str]) -> str:
    """'folder/stem-{000000..000003}.tar' for consecutive shard names (or the single name)."""
    folder = str(folder).rstrip("/") or "/"
    if len(names) == 1:
        return f"{folder}/{names[0]}"
    stem = names[0].rsplit("-", 1)[0]
    last = names[-1].rsplit("-", 1)[1].split(".")[0]
    return f"{folder}/{stem}-{{{'0' * len(last)}..{last}}}.tar"


def write_shards(
    source: Source,
    out: str | Path,
    *,
    prefix: str,
    shard_size: int,
    seed: int,
    test_fraction: float = 0.0,
    val_fraction: float = 0.0,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 1,
) -> dict:
    """Write the source as shards into `out` (a folder or an fsspec URL such as s3://b/x) with
    `workers` processes and return the manifest (also written, last). The output is the same
    bytes for any `workers`."""
    if shard_size <= 0:
        raise SourceError(f"--shard-size must be > 0, got {shard_size}")
    if workers < 1:
        raise SourceError(f"--workers must be >= 1, got {workers}")
    dest = _Destination(out)
    entries = dest.read_manifest()
    old, unlisted = dest.existing(prefix, entries)
    if (old or unlisted) and not overwrite:
        names = old + unlisted
        raise FileExistsError(
            f"{out} already holds {names[:4]}...; pass --overwrite to replace them"
        )
    if unlisted:
        log.warning("%s: %s not in its %s: left in place unless a new shard takes its name",
                    out, unlisted[:4], MANIFEST)  # fmt: skip
    splits = split_items(source.items, test_fraction, seed, val_fraction)
    jobs = plan_shards(splits, prefix, shard_size)
    tmp = dest.staging(prefix)
    try:
        (tmp / "plan").mkdir()
        results = _write_planned(jobs, tmp / "plan", workers, progress)
        manifest = _assemble(source, splits, jobs, results, tmp, dest)
        manifest["seed"], manifest["shard_size"], manifest["prefix"] = seed, shard_size, prefix
        for entry in manifest["shards"]:
            entry["prefix"] = prefix
        mine = {s["name"] for s in manifest["shards"]}
        # Other sets in the folder keep their entries (their counts stay known to readers).
        manifest["shards"] += [
            e for e in entries if not owned_by(e, prefix) and e["name"] not in mine
        ]
        dest.publish(tmp, manifest, old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _assemble(
    source: Source,
    splits: dict[str, list[SourceItem]],
    jobs: list[ShardJob],
    results: list[tuple[int, list[dict[str, str]]]],
    tmp: Path,
    dest: _Destination,
) -> dict:
    """Name the written shards (consecutive per split, in plan order; a shard whose every image
    was unreadable is dropped) by moving them from tmp/plan to tmp, and build the manifest."""
    shards, skipped = [], list(source.skipped)
    kept: dict[str, list[tuple[ShardJob, int]]] = {split: [] for split in splits}
    for job, (count, bad) in zip(jobs, results, strict=True):
        skipped += bad
        if count:
            kept[job.split].append((job, count))
    split_info = {}
    for split, written in kept.items():
        names = []
        for k, (job, count) in enumerate(written):
            name = f"{job.stem}-{k:06d}.tar"
            os.replace(tmp / "plan" / job.file, tmp / name)
            shards.append(
                {"name": name, "count": count, "bytes": (tmp / name).stat().st_size, "split": split}
            )
            names.append(name)
        split_info[split] = {
            "total": sum(count for _, count in written),
            "pattern": dest.pattern(names) if names else "",
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
