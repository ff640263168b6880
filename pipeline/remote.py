"""Opening shard URLs: local paths directly, `s3://`, `gs://` (and any fsspec protocol) through
fsspec, by way of a handler in WebDataset's `gopen` table.

The handler table is per process, so every process that opens shards (the training process and
each DataLoader worker, which under `spawn`/`forkserver` starts from a fresh interpreter) calls
`register_fsspec_handlers` for the schemes it is about to open; it is cheap and idempotent.
"""

from __future__ import annotations

import sys
from typing import IO

import fsspec
import webdataset  # noqa: F401  (imports webdataset.gopen, whose table we extend)

from pipeline.data.urls import is_local, local_path, url_scheme

# `webdataset.gopen` the attribute is the function; the module with the table is this one.
_GOPEN = sys.modules["webdataset.gopen"]

# Schemes WebDataset handles itself and well (pipe: runs a shell command, http via curl).
_NATIVE = {"", "file", "pipe", "http", "https"}
DEFAULT_REMOTE = ("s3", "gs", "gcs")


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> IO[bytes]:
    # Read-ahead caching: shards are read front to back, so large sequential blocks win.
    return fsspec.open(url, mode, block_size=max(bufsize, 1 << 22), **kw).open()


def register_fsspec_handlers(schemes: tuple[str, ...] | set[str] = DEFAULT_REMOTE) -> None:
    """Route these URL schemes through fsspec in this process's WebDataset gopen table."""
    for scheme in schemes:
        if scheme not in _NATIVE:
            _GOPEN.gopen_schemes[scheme] = _fsspec_gopen


def open_url(url: str) -> IO[bytes]:
    """A binary read stream for a shard URL (registers the fsspec handler for its scheme)."""
    register_fsspec_handlers({url_scheme(url)})
    return _GOPEN.gopen(url, "rb")


def read_beside(url: str, name: str) -> bytes | None:
    """Bytes of the file `name` in the same folder as `url`, or None when it does not exist."""
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    target = f"{base}/{name}"
    try:
        if is_local(url):
            with open(local_path(target), "rb") as f:
                return f.read()
        with fsspec.open(target, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


register_fsspec_handlers()
