"""Shard URLs and sample counts: which shards, and how many samples each (the tar reader
itself is pipeline.data.tar).
"""

from __future__ import annotations

import glob
import json
import logging
import os

from braceexpand import braceexpand

from pipeline.data.tar import count_tar_samples
from pipeline.remote import is_local, local_path, open_url, read_beside

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


# ---- URLs -----------------------------------------------------------------------------------


def _split_top_level(urls: str) -> list[str]:
    """Split on commas outside braces: 'a-{0,1}.tar,b.tar' -> ['a-{0,1}.tar', 'b.tar']."""
    parts, depth, cur = [], 0, []
    for ch in urls:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_local(part: str) -> list[str]:
    found, missing = [], []
    expanded = list(braceexpand(part))
    for url in expanded:
        path = local_path(url)
        if any(c in path for c in "*?["):
            found += sorted(glob.glob(path))
        elif os.path.isdir(path):
            found += sorted(glob.glob(os.path.join(path, "*.tar")))
        elif os.path.isfile(path):
            found.append(url)
        else:
            missing.append(url)
    if not found:
        raise FileNotFoundError(f"no shard matches {part!r}")
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(expanded)} shards named by {part!r} do not exist, "
            f"e.g. {missing[:3]}"
        )
    return found


def _expand_remote(part: str) -> list[str]:
    urls = list(braceexpand(part))
    if not any(c in part for c in "*?["):
        return urls  # existence is checked when the shard is counted or opened
    import fsspec

    found = []
    for url in urls:
        fs, _, paths = fsspec.get_fs_token_paths(url)
        protocol = url.split("://", 1)[0]
        found += sorted(f"{protocol}://{p.split('://')[-1]}" for p in fs.glob(paths[0]))
    if not found:
        raise FileNotFoundError(f"no shard matches {part!r}")
    return found


def expand_urls(urls: str) -> list[str]:
    """Brace patterns / comma lists / s3:// gs:// -> concrete shard URLs; raises
    FileNotFoundError naming the pattern when nothing matches (local).

    A local part may also be a folder (its `*.tar` files) or a glob. A local brace pattern
    naming some shards that do not exist is an error too (a silently smaller epoch is worse).
    The same shard twice is an error: it would break exactly-once epochs."""
    parts = _split_top_level(urls or "")
    if not parts:
        raise ValueError("no shard URLs given (data.train_shards / data.val_shards is empty)")
    out: list[str] = []
    for part in parts:
        out += _expand_local(part) if is_local(part) else _expand_remote(part)
    dupes = sorted({u for u in out if out.count(u) > 1})
    if dupes:
        raise ValueError(f"shards listed more than once in {urls!r}: {dupes[:5]}")
    return out


# ---- sample counts --------------------------------------------------------------------------

_SCAN_CACHE: dict[tuple[str, int, int], int] = {}


def _scan_count(url: str) -> int:
    stat = os.stat(local_path(url)) if is_local(url) else None
    cache_key = (url, stat.st_size, stat.st_mtime_ns) if stat else None
    if cache_key in _SCAN_CACHE:
        return _SCAN_CACHE[cache_key]
    try:
        stream = open_url(url)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"shard not found: {url}") from e
    with stream:
        n, err = count_tar_samples(stream)
    if err:
        log.warning("shard %s: %s; counted the %d samples before it", url, err, n)
    if cache_key:
        _SCAN_CACHE[cache_key] = n
    return n


def _manifest_counts(url: str, cache: dict[str, dict[str, dict] | None]) -> dict | None:
    """The manifest entry {'name', 'count', 'bytes'} for this shard, if a manifest lists it."""
    folder, _, name = url.rpartition("/")
    if folder not in cache:
        raw = read_beside(url, MANIFEST)
        try:
            shards = json.loads(raw)["shards"] if raw else None
            cache[folder] = {s["name"]: s for s in shards} if shards else None
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable %s beside %s: %s", MANIFEST, url, e)
            cache[folder] = None
    entries = cache[folder]
    return entries.get(name) if entries else None


def shard_sample_counts(urls: list[str]) -> list[int]:
    """Per-shard sample counts: from manifest.json beside the shards when present (make_shards
    writes it), else by scanning the tar headers (local) — note CIFAR-10's shared shards have no
    manifest.

    A manifest count is kept even when the shard's size no longer matches (a warning says so):
    for a shard truncated after writing, the manifest knows how many samples were lost, and
    the reader reports them as skipped. Remote shards without a manifest are scanned too."""
    cache: dict[str, dict | None] = {}
    counts = []
    for url in urls:
        entry = _manifest_counts(url, cache)
        if entry is None:
            counts.append(_scan_count(url))
            continue
        if is_local(url) and "bytes" in entry:
            size = os.path.getsize(local_path(url))
            if size != entry["bytes"]:
                log.warning(
                    "shard %s is %d bytes but its manifest says %d", url, size, entry["bytes"]
                )
        counts.append(int(entry["count"]))
    return counts
