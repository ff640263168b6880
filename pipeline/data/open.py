"""Opening shard files: a binary read stream for a shard URL, and the bytes of a file beside it.

Local paths (and file://) open with the builtin `open`; http(s):// with the standard library
(urllib, Range requests); `pipe:` goes to WebDataset's own opener (`webdataset.gopen`, called
directly: it runs a shell command); every other scheme (s3://, gs://, memory://, ...) opens
through fsspec. Nothing is registered in another library's tables, so a DataLoader worker started
from a fresh interpreter (spawn / forkserver) opens every URL its parent can, with no setup.

Flaky storage: the stream `open_url` returns counts the bytes it has handed out. When a read
(or the open) fails with a transient error (pipeline.retry.is_transient: a dropped connection, a
timeout, HTTP 503), it waits, re-opens the shard and continues at that byte (seek, an HTTP Range
request, or reading and dropping the bytes already seen), so the tar reader above sees one
unbroken stream: no sample twice, none missing. After `retry.retries` failures per stream it
raises RetriesExhaustedError (an OSError naming the URL), which the loader counts as the
shard's remaining samples skipped. http is not left to WebDataset's curl opener because curl
retries 503s itself for a minute and reports a dropped connection as a short (corrupt-looking)
tar, which cannot be told apart from a truncated file.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import IO

import fsspec

from pipeline.data.urls import is_local, local_path, url_scheme
from pipeline.retry import (
    TRANSIENT_HTTP_STATUS,
    Retrier,
    RetryPolicy,
    TransientHTTPError,
    is_transient,
)

# Read-ahead caching: shards are read front to back, so large sequential blocks win.
_FSSPEC_BLOCK = 1 << 22
# A stalled connection becomes a TimeoutError (then retried) after this long without bytes.
HTTP_TIMEOUT_S = 60.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def open_url(url: str, retry: RetryPolicy | None = None) -> IO[bytes]:
    """A binary read stream for a shard URL (the caller closes it). Transient errors while
    opening or reading are retried per `retry` (None: RetryPolicy()'s defaults, which are
    data.read_retries / data.retry_backoff_s's defaults), resuming at the byte reached."""
    return _ResumingStream(url, retry or RetryPolicy())


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


# ---- openers: (url, start byte) -> a stream positioned there ---------------------------------


def _opener(url: str) -> tuple[Callable[[int], IO[bytes]], bool]:
    """(open at byte, whether seek works on what it returns)."""
    scheme = url_scheme(url)
    if is_local(url):
        return _seeking(lambda: open(local_path(url), "rb")), True
    if scheme in ("http", "https"):
        return lambda start: _HttpBody(url, start), False
    if scheme == "pipe":
        from webdataset import gopen  # the function, not the module of the same name

        return _dropping(lambda: gopen(url, "rb")), False
    # block_size goes to the file, not to fsspec.open: there it would be a filesystem option,
    # and s3fs hands unknown options to its botocore session, which rejects them.
    fs, path = fsspec.core.url_to_fs(url)
    return _seeking(lambda: fs.open(path, "rb", block_size=_FSSPEC_BLOCK)), True


def _seeking(open_fn: Callable[[], IO[bytes]]) -> Callable[[int], IO[bytes]]:
    def open_at(start: int) -> IO[bytes]:
        f = open_fn()
        if start:
            f.seek(start)
        return f

    return open_at


def _dropping(open_fn: Callable[[], IO[bytes]]) -> Callable[[int], IO[bytes]]:
    def open_at(start: int) -> IO[bytes]:
        f = open_fn()
        _drop_bytes(f, start)
        return f

    return open_at


def _drop_bytes(f: IO[bytes], n: int) -> None:
    while n > 0:
        b = f.read(min(n, 1 << 20))
        if not b:
            raise ConnectionResetError(f"stream ended {n} bytes before the resume point")
        n -= len(b)


class _HttpBody(io.RawIOBase):
    """An HTTP GET body from byte `start` (a Range request; a server that ignores Range is
    read and dropped up to `start`). A body that ends before its Content-Length raises
    ConnectionResetError (http.client itself would return a silent short read)."""

    def __init__(self, url: str, start: int) -> None:
        super().__init__()
        headers = {"Range": f"bytes={start}-"} if start else {}
        try:
            self._resp = urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=HTTP_TIMEOUT_S
            )
        except urllib.error.HTTPError as e:
            raise _http_status_error(url, e.code, e.reason) from e
        except urllib.error.URLError as e:  # no HTTP answer at all: refused, reset, timed out
            if isinstance(e.reason, OSError) and is_transient(e.reason):
                raise ConnectionError(f"{url}: {e.reason}") from e
            raise OSError(f"{url}: {e.reason}") from e
        self.url, self.pos, self.total = url, 0, _body_total(self._resp)
        if start and self._resp.status == 206:
            self.pos = start
        elif start:
            _drop_bytes(self._resp, start)
            self.pos = start

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._resp.readinto(b)
        if n == 0 and len(b) and self.total is not None and self.pos < self.total:
            raise ConnectionResetError(
                f"{self.url}: connection closed at byte {self.pos} of {self.total}"
            )
        self.pos += n
        return n

    def close(self) -> None:
        self._resp.close()
        super().close()


def _http_status_error(url: str, code: int, reason: str) -> OSError:
    if code == 404:
        return FileNotFoundError(f"{url}: HTTP 404 {reason}")
    if code in TRANSIENT_HTTP_STATUS:
        return TransientHTTPError(f"{url}: HTTP {code} {reason}")
    return OSError(f"{url}: HTTP {code} {reason}")


def _body_total(resp) -> int | None:
    """The full object's size: from Content-Range on a 206, else Content-Length."""
    m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
    if m and m.group(3) != "*":
        return int(m.group(3))
    length = resp.headers.get("Content-Length")
    return int(length) if length is not None and resp.status == 200 else None


# ---- the resuming stream ---------------------------------------------------------------------


class _ResumingStream(io.RawIOBase):
    """A read stream over a shard that survives transient errors by re-opening at the byte it
    had reached; one retry budget (Retrier) for the whole stream."""

    def __init__(self, url: str, policy: RetryPolicy) -> None:
        super().__init__()
        self.url, self.pos, self._f, self._size = url, 0, None, None
        self._open_at, self._seekable = _opener(url)
        self._retrier = Retrier(policy, f"shard {url}")
        self._call(lambda f: None)  # open now: a missing shard fails here, not at first read

    def _call(self, op: Callable[[IO[bytes]], object]):
        def attempt():
            if self._f is None:
                self._f = self._open_at(self.pos)
                self._check_size(getattr(self._f, "total", None))
            return op(self._f)

        return self._retrier.call(attempt, on_failure=self._drop)

    def _check_size(self, size: int | None) -> None:
        # Resuming at a byte offset is only sound if the object did not change in between.
        if self._size is None:
            self._size = size
        elif size is not None and size != self._size:
            raise OSError(f"{self.url} changed size while being read ({self._size} -> {size})")

    def _drop(self) -> None:
        if self._f is not None:
            # A broken connection may fail to close; it is dropped anyway.
            with contextlib.suppress(Exception):
                self._f.close()
            self._f = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def read(self, n: int = -1) -> bytes:
        data = self._call(lambda f: f.read(n))
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if not self._seekable:
            raise io.UnsupportedOperation(f"{self.url} is not seekable")
        if whence not in (os.SEEK_SET, os.SEEK_CUR):
            raise io.UnsupportedOperation("only SEEK_SET and SEEK_CUR")
        target = offset if whence == os.SEEK_SET else self.pos + offset
        self._call(lambda f: f.seek(target))
        self.pos = target
        return target

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self._drop()
        super().close()
