"""Parquet cache of extracted features, one file per (weights hash, split, transform, layer).

A file holds the columns key (str), label (int64), feature (fixed-size list of float32) with the
rows sorted by key, and a sha256 of its content in the schema metadata. A file that cannot be
read, has the wrong layout, or whose content no longer matches its checksum is reported as
damaged: `load` returns None, and the caller extracts again and overwrites it. Writes are atomic
(temp file, then rename), so an interrupted write never leaves a half file under the real name.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

_CHECKSUM = b"ce.checksum"
# Rows per Parquet row group: the streaming probe decodes one group at a time and shuffles the
# group order, so small groups bound its memory (8192 x 4096-d float32 = 128 MiB) and mix key
# order; pyarrow's default (1M rows) would be one group per split.
ROW_GROUP_ROWS = 8192


@dataclass(frozen=True)
class Features:
    """Features of one layer on one split; rows sorted by key."""

    keys: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) int64
    x: np.ndarray  # (N, D) float32

    def __post_init__(self) -> None:
        if not (len(self.keys) == len(self.labels) == len(self.x)) or self.x.ndim != 2:
            raise ValueError(
                f"features: {len(self.keys)} keys, {len(self.labels)} labels, x {self.x.shape}"
            )


@dataclass(frozen=True)
class CacheKey:
    weights: str  # hash of the encoder's weights and config (see features.weights_hash)
    split: str  # e.g. "train-1a2b3c4d": split name + hash of its shard URLs
    transform: str  # e.g. "eval32-pool4096": image transform and pooling
    layer: str

    def path(self, root: str | Path) -> Path:
        return (
            Path(root) / self.weights[:16] / f"{self.split}__{self.transform}__{self.layer}.parquet"
        )


def checksum(f: Features) -> str:
    h = hashlib.sha256()
    h.update("\n".join(map(str, f.keys)).encode())
    # memoryviews, not tobytes(): no second copy of a features array that can be gigabytes.
    h.update(memoryview(np.ascontiguousarray(f.labels, dtype=np.int64)).cast("B"))
    h.update(memoryview(np.ascontiguousarray(f.x, dtype=np.float32)).cast("B"))
    return h.hexdigest()


def save(f: Features, path: str | Path) -> Path:
    """Write `f` atomically as Parquet with its checksum in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.ascontiguousarray(f.x, dtype=np.float32)
    feat = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    table = pa.table(
        {
            "key": pa.array([str(k) for k in f.keys], pa.string()),
            "label": pa.array(np.asarray(f.labels, dtype=np.int64)),
            "feature": feat,
        }
    ).replace_schema_metadata({_CHECKSUM: checksum(f).encode()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
    os.replace(tmp, path)
    return path


def _read(path: Path) -> Features:
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    if _CHECKSUM not in meta or table.column_names != ["key", "label", "feature"]:
        raise ValueError("missing checksum or unexpected columns")
    col = table.column("feature").combine_chunks()
    dim = col.type.list_size
    x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    f = Features(
        keys=np.asarray(table.column("key").to_pylist(), dtype=object),
        labels=table.column("label").to_numpy().astype(np.int64),
        x=x,
    )
    if checksum(f).encode() != meta[_CHECKSUM]:
        raise ValueError("content does not match its checksum")
    return f


def load(path: str | Path) -> Features | None:
    """The cached features, or None when the file is absent or damaged (logged as a warning)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return _read(path)
    except Exception as e:  # noqa: BLE001 - any read failure means "rebuild", never "crash"
        log.warning("feature cache %s is damaged (%s: %s); rebuilding", path, type(e).__name__, e)
        return None
