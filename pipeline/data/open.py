"""Opening shard files: a binary read stream for a shard URL, and the bytes of a file beside it.

Local paths (and file://) open with the builtin `open`; `pipe:` and `http(s)://` go to
WebDataset's own opener (`webdataset.gopen`, called directly: pipe: runs a shell command, http
goes through curl); every other scheme (s3://, gs://, memory://, ...) opens through fsspec.
Nothing is registered in another library's tables, so a DataLoader worker started from a fresh
interpreter (spawn / forkserver) opens every URL its parent can, with no setup.
"""

from __future__ import annotations

from typing import IO

import fsspec

from pipeline.data.urls import is_local, local_path, url_scheme

# Schemes WebDataset's opener handles itself and well.
_WEBDATASET_SCHEMES = {"pipe", "http", "https"}
# Read-ahead caching: shards are read front to back, so large sequential blocks win.
_FSSPEC_BLOCK = 1 << 22


def open_url(url: str) -> IO[bytes]:
    """A binary read stream for a shard URL (the caller closes it)."""
    scheme = url_scheme(url)
    if is_local(url):
        return open(local_path(url), "rb")
    if scheme in _WEBDATASET_SCHEMES:
        from webdataset import gopen  # the function, not the module of the same name

        return gopen(url, "rb")
    # block_size goes to the file, not to fsspec.open: there it would be a filesystem option,
    # and s3fs hands unknown options to its botocore session, which rejects them.
    fs, path = fsspec.core.url_to_fs(url)
    return fs.open(path, "rb", block_size=_FSSPEC_BLOCK)


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
