"""Per-shard sample counts, which the exact-epoch plan is built on: from the manifest beside
the shards when it lists them, else by scanning the tar headers (cached per file size and mtime).
"""

from __future__ import annotations

import logging
import os

from pipeline.data.manifest import manifest_entry
from pipeline.data.open import open_url
from pipeline.data.tar import count_tar_samples
from pipeline.data.urls import is_local, local_path
from pipeline.retry import RetryPolicy

log = logging.getLogger(__name__)

_SCAN_CACHE: dict[tuple[str, int, int], int] = {}


def _scan_count(url: str, retry: RetryPolicy | None) -> int:
    stat = os.stat(local_path(url)) if is_local(url) else None
    cache_key = (url, stat.st_size, stat.st_mtime_ns) if stat else None
    if cache_key in _SCAN_CACHE:
        return _SCAN_CACHE[cache_key]
    try:
        stream = open_url(url, retry)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"shard not found: {url}") from e
    with stream:
        n, err = count_tar_samples(stream)
    if err:
        log.warning("shard %s: %s; counted the %d samples before it", url, err, n)
    if cache_key:
        _SCAN_CACHE[cache_key] = n
    return n


def shard_sample_counts(urls: list[str], retry: RetryPolicy | None = None) -> list[int]:
    """Per-shard sample counts: from manifest.json beside the shards when present (make_shards
    writes it), else by scanning the tar headers (local) — note CIFAR-10's shared shards have no
    manifest.

    A manifest count is kept even when the shard's size no longer matches (a warning says so):
    for a shard truncated after writing, the manifest knows how many samples were lost, and
    the reader reports them as skipped. Remote shards without a manifest are scanned too."""
    cache: dict[str, dict | None] = {}
    counts = []
    for url in urls:
        entry = manifest_entry(url, cache)
        if entry is None:
            counts.append(_scan_count(url, retry))
            continue
        if is_local(url) and "bytes" in entry:
            size = os.path.getsize(local_path(url))
            if size != entry["bytes"]:
                log.warning(
                    "shard %s is %d bytes but its manifest says %d", url, size, entry["bytes"]
                )
        counts.append(int(entry["count"]))
    return counts
