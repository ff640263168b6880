"""The labelled images of a fine-tune run: a stratified `label_fraction` of the pool (the
training shards) and, disjoint from it, a stratified val carve of `val_images`, both drawn with
`carve_seed` from the pool's keys in sorted order, so the same pool and seed carve the same
images in every run, whatever the shard order. Both are written once as small WebDataset shards
(the samples' bytes unchanged) under `<output_root>/finetune/carves/<id>/`, so the training
loop reads them through the same loader as pretraining; `carve.json` (written last, atomically)
lists the keys and marks the carve complete. The test shards are never read here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from pipeline.data.open import open_url
from pipeline.data.samples import parse_label
from pipeline.data.tar import iter_tar_samples
from pipeline.data.urls import expand_urls
from pipeline.data.writer import SHARD_MTIME
from pipeline.finetune.settings import FinetuneData

CARVE_FILE = "carve.json"
CARVE_LAYOUT = 2  # in the carve id: a change of how carves are written never reuses old ones
# The labelled split is cut into this many shards, written in a seeded random order: the loader
# reshuffles shard order every epoch, so each rank's share changes from epoch to epoch.
TRAIN_SHARDS = 8


@dataclass(frozen=True)
class Carve:
    """Where the carved shards are, and which keys each split holds (sorted)."""

    folder: Path
    train_keys: list[str]
    val_keys: list[str]
    num_classes: int

    def shards(self, split: str) -> str:
        """The brace pattern of a split's shards: train-{000000..000007}.tar, val-000000.tar."""
        last = len(list(self.folder.glob(f"{split}-*.tar"))) - 1
        name = f"{split}-{{000000..{last:06d}}}.tar" if last > 0 else f"{split}-000000.tar"
        return str(self.folder / name)


def stratified_carve(
    keys: list[str], labels: np.ndarray, fraction: float, val_images: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices into `keys` of the labelled and the val images. Each class gives
    round(fraction * n_c) labelled images (at least 1) and round(val_images * n_c / N) val
    images from a seeded permutation of its keys in sorted order."""
    n = len(keys)
    order = np.argsort(np.asarray(keys, dtype=str), kind="stable")
    rng = np.random.default_rng([seed, 17])
    train, val = [], []
    for c in np.unique(labels):
        members = order[labels[order] == c]  # this class, keys sorted
        perm = rng.permutation(members)
        n_train = max(1, round(fraction * len(members)))
        n_val = round(val_images * len(members) / n)
        if n_train + n_val > len(members):
            raise ValueError(
                f"class {c}: {n_train} labelled + {n_val} val images > its {len(members)} "
                "images; lower data.label_fraction or data.val_images"
            )
        train.append(perm[:n_train])
        val.append(perm[n_train : n_train + n_val])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def carve_id(data: FinetuneData, urls: list[str]) -> str:
    """What the carve depends on: the pool's shards (name and size) and the carve settings."""
    h = hashlib.sha256()
    for url in urls:
        size = os.path.getsize(url) if os.path.exists(url) else -1
        h.update(f"{url}|{size}\n".encode())
    h.update(f"{data.label_fraction}|{data.val_images}|{data.carve_seed}|{CARVE_LAYOUT}".encode())
    return h.hexdigest()[:16]


def _read_pool(urls: list[str]) -> tuple[list[str], np.ndarray, list[dict[str, bytes]]]:
    keys, labels, samples = [], [], []
    for url in urls:
        with open_url(url) as f:
            for _, key, sample in iter_tar_samples(f, lambda _: True):
                label = parse_label(sample)
                if label is None:
                    raise ValueError(f"{url}: sample {key} has no cls label; fine-tuning needs one")
                keys.append(key)
                labels.append(label)
                samples.append(sample)
    if len(set(keys)) != len(keys):
        raise ValueError(f"the pool {urls[0]}... repeats sample keys")
    return keys, np.asarray(labels, dtype=np.int64), samples


def _write_split(path: Path, keys: list[str], samples: list[dict[str, bytes]]) -> None:
    with open(path, "wb") as f, wds.TarWriter(f, mtime=SHARD_MTIME) as sink:
        for key, sample in zip(keys, samples, strict=True):
            sink.write({"__key__": key, **sample})


def carve(data: FinetuneData, output_root: str) -> Carve:
    """The carve for `data` under `output_root` (a local folder): reused when complete, else
    read from the pool and written (into a temporary folder renamed into place)."""
    urls = expand_urls(data.train_shards)
    folder = Path(output_root) / "finetune" / "carves" / carve_id(data, urls)
    if (folder / CARVE_FILE).is_file():
        meta = json.loads((folder / CARVE_FILE).read_text())
        return Carve(folder, meta["train"], meta["val"], meta["num_classes"])
    keys, labels, samples = _read_pool(urls)
    train, val = stratified_carve(
        keys, labels, data.label_fraction, data.val_images, data.carve_seed
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".carve-", dir=folder.parent))
    order = np.random.default_rng([data.carve_seed, 23]).permutation(train)
    for k, part in enumerate(np.array_split(order, min(TRAIN_SHARDS, len(order)))):
        _write_split(staging / f"train-{k:06d}.tar", [keys[i] for i in part],
                     [samples[i] for i in part])  # fmt: skip
    _write_split(staging / "val-000000.tar", [keys[i] for i in val], [samples[i] for i in val])
    meta = {
        "pool": urls, "label_fraction": data.label_fraction, "val_images": data.val_images,
        "carve_seed": data.carve_seed, "num_classes": int(labels.max()) + 1,
        "train": [keys[i] for i in train], "val": [keys[i] for i in val],
    }  # fmt: skip
    (staging / CARVE_FILE).write_text(json.dumps(meta))
    try:
        os.replace(staging, folder)
    except OSError:  # another run carved the same images meanwhile: theirs is identical
        shutil.rmtree(staging, ignore_errors=True)
    return Carve(folder, meta["train"], meta["val"], meta["num_classes"])
