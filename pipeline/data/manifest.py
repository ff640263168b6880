"""manifest.json, the file the shard writer puts beside a shard set: its name (`MANIFEST`,
defined here only), writing it (last, atomically) and reading a shard's entry back for counts.

Layout: {"shards": [{"name", "count", "bytes", "split", "prefix"}, ...], "total", "splits",
"classes", "skipped", "seed", "shard_size", "prefix"}; readers use only the shard entries. The
top-level keys describe the last write (its `prefix`); "shards" also keeps the entries of other
shard sets in the same folder, which is how `--overwrite` knows which files are whose.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pipeline.data.open import read_beside

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def write_manifest(manifest: dict, folder: Path, staging: Path) -> Path:
    """Write `folder/manifest.json`: first into `staging` (a folder on the same filesystem),
    then renamed into place, so a reader never sees half a manifest. Returns its path."""
    tmp = staging / MANIFEST
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def manifest_entry(url: str, cache: dict[str, dict[str, dict] | None]) -> dict | None:
    """The manifest entry {'name', 'count', 'bytes'} for this shard, if a manifest beside it
    lists it. `cache` holds each folder's parsed entries (None: no usable manifest); an
    unreadable manifest is ignored with a warning."""
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


def describe(manifest: dict, out: str) -> str:
    """What one `make_shards` write produced: shards of its prefix, skips, splits (printed)."""
    written = [s for s in manifest["shards"] if s.get("prefix") == manifest["prefix"]]
    lines = [f"wrote {manifest['total']} samples in {len(written)} shards to {out}"]
    if manifest["skipped"]:  # unreadable files and decompression bombs, each with its reason
        lines.append(f"skipped {len(manifest['skipped'])} files (listed in manifest.json)")
    lines += [f"{name}: {info['total']} samples  {info['pattern']}"
              for name, info in manifest["splits"].items()]  # fmt: skip
    return "\n".join(lines)
