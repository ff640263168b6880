"""Shard URLs: what a data.*_shards string names. `split_urls` is the one function that splits
a comma list of URLs (every caller uses it); `expand_urls` turns the parts (brace patterns,
folders, globs, s3:// gs:// and other fsspec URLs) into concrete shard URLs; `url_scheme`,
`is_local` and `local_path` classify a URL.
"""

from __future__ import annotations

import glob
import os
from urllib.parse import urlparse

from braceexpand import braceexpand

# One classification of paths and URLs for shards and output roots alike (pipeline.storage).
from pipeline.storage import is_uri
from pipeline.storage import scheme as url_scheme


def is_local(url: str) -> bool:
    """A plain path or file://...: everything else goes through fsspec."""
    return not is_uri(url)


def local_path(url: str) -> str:
    """The filesystem path of a local URL (plain path or file://...)."""
    return urlparse(url).path if url_scheme(url) == "file" else url


def split_urls(urls: str) -> list[str]:
    """The one way to split a comma list of shard URLs: on commas outside braces, each part
    stripped, empty parts dropped: 'a-{0,1}.tar, b.tar' -> ['a-{0,1}.tar', 'b.tar']."""
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
        # url_to_fs, not get_fs_token_paths: that one already expands the glob, and globbing
        # its first match again kept only the first shard.
        fs, path = fsspec.core.url_to_fs(url)
        protocol = url.split("://", 1)[0]
        found += sorted(f"{protocol}://{p.split('://')[-1]}" for p in fs.glob(path))
    if not found:
        raise FileNotFoundError(f"no shard matches {part!r}")
    return found


def expand_urls(urls: str) -> list[str]:
    """Brace patterns / comma lists (split_urls) / s3:// gs:// -> concrete shard URLs; raises
    FileNotFoundError naming the pattern when nothing matches (local).

    A local part may also be a folder (its `*.tar` files) or a glob. A local brace pattern
    naming some shards that do not exist is an error too (a silently smaller epoch is worse).
    The same shard twice is an error: it would break exactly-once epochs."""
    parts = split_urls(urls or "")
    if not parts:
        raise ValueError("no shard URLs given (data.train_shards / data.val_shards is empty)")
    out: list[str] = []
    for part in parts:
        out += _expand_local(part) if is_local(part) else _expand_remote(part)
    dupes = sorted({u for u in out if out.count(u) > 1})
    if dupes:
        raise ValueError(f"shards listed more than once in {urls!r}: {dupes[:5]}")
    return out
