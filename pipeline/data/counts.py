"""Per-shard sample counts, which the exact-epoch plan is built on: from the manifest beside
the shards when it lists them, else by scanning the tar headers (cached per file size and mtime).
"""

from __future__ import annotations

import logging
import os

from pipeline.data.manifest import manifest_entry
from pipeline.data.open import open_url
from pipeline.data.tar import MAX_MEMBER_BYTES, count_tar_samples
from pipeline.data.urls import is_local, local_path
from pipeline.retry import RetryPolicy

log = logging.getLogger(__name__)

_SCAN_CACHE: dict[tuple[str, int, int, int], int] = {}


def shard_bytes(url: str) -> int | None:
    """A local shard's size (the tar reader's bound for member sizes); None for remote URLs."""
    return os.path.getsize(local_path(url)) if is_local(url) else None


def _scan_count(url: str, retry: RetryPolicy | None, max_member: int) -> int:
    stat = os.stat(local_path(url)) if is_local(url) else None
    cache_key = (url, stat.st_size, stat.st_mtime_ns, max_member) if stat else None
    if cache_key in _SCAN_CACHE:
        return _SCAN_CACHE[cache_key]
    try:
        stream = open_url(url, retry)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"shard not found: {url}") from e
    with stream:
        size = stat.st_size if stat else None
        n, err = count_tar_samples(stream, shard=url, max_member=max_member, size=size)
    if err:  # err names the shard, the byte and the problem
        log.warning("%s; counted the %d samples before it", err, n)
    if cache_key:
        _SCAN_CACHE[cache_key] = n
    return n


def shard_sample_counts(
    urls: list[str], retry: RetryPolicy | None = None, max_member: int = MAX_MEMBER_BYTES
) -> list[int]:
    """Per-shard sample counts: from manifest.json beside the shards when present (make_shards
    writes it), else by scanning the tar headers (local) — note CIFAR-10's shared shards have no
    manifest.

    A manifest count is kept even when the shard's size no longer matches (a warning says so):
    for a shard truncated after writing, the manifest knows how many samples were lost, and
    the reader reports them as skipped. Remote shards without a manifest are scanned too. A
    scan stops at a bad header (data.max_member_bytes, `max_member`, is one of its checks) and
    counts the samples whose headers came before it, as the reader will meet them."""
    cache: dict[str, dict | None] = {}
    counts = []
    for url in urls:
        entry = manifest_entry(url, cache)
        if entry is None:
            counts.append(_scan_count(url, retry, max_member))
            continue
        if is_local(url) and "bytes" in entry:
            size = os.path.getsize(local_path(url))
            if size != entry["bytes"]:
                log.warning(
                    "shard %s is %d bytes but its manifest says %d", url, size, entry["bytes"]
                )
        counts.append(int(entry["count"]))
    return counts
