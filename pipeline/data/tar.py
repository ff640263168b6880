"""The tar reader: raw WebDataset samples out of a tar stream, and sample counts from headers.

Samples follow WebDataset's convention: consecutive tar members sharing a key (the path up to the
first dot of the file name) form one sample; the rest of the name is the member's extension
(`train-000001.jpg` -> key `train-000001`, ext `jpg`). The reader here is a small streaming tar
parser rather than `tarfile`, because it must (a) skip the members of samples another worker
decodes without reading them, and (b) count samples from headers alone, cheaply, on every
rank at the start of every epoch. Counting and reading share the same grouping code, so a
sample index means the same thing in both. Opening the stream is the caller's business
(pipeline.data.open).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import IO

BLOCK = 512
CHUNK = 1 << 20  # read-ahead window of the tar reader
_ZERO_BLOCK = bytes(BLOCK)  # two of them end an archive


class TarReadError(OSError):
    """A shard is truncated or holds a corrupt tar header; samples before it are intact."""


def _read_exact(f: IO[bytes], n: int) -> bytes:
    first = f.read(n)
    if len(first) == n or not first:
        return first
    chunks, left = [first], n - len(first)
    while left > 0:
        b = f.read(left)
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


def _skip(f: IO[bytes], n: int) -> None:
    try:
        f.seek(n, os.SEEK_CUR)
    except (OSError, ValueError, AttributeError):
        # Non-seekable streams (pipes): read and drop.
        while n > 0:
            b = f.read(min(n, 1 << 20))
            if not b:
                return
            n -= len(b)


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    s = field.replace(b"\0", b" ").strip()
    return int(s, 8) if s else 0


def _header_name(hdr: bytes) -> str:
    name = hdr[0:100].split(b"\0", 1)[0]
    if hdr[257:262] == b"ustar":
        prefix = hdr[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


_REGULAR = (ord("0"), 0, ord("7"))  # type flags of regular files
_LONG_NAME = (ord("L"), ord("x"))  # GNU long name, pax extended header


def _check_sum(hdr: bytes, offset: int) -> None:
    stored = _octal(hdr[148:156])
    actual = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
    if stored != actual:
        raise TarReadError(f"corrupt tar header at byte {offset}")


def _end_error(partial: bytes, offset: int) -> str:
    if partial or offset == 0:
        return f"tar truncated at byte {offset} (or not a tar file)"
    return f"tar ends at byte {offset} without its end-of-archive marker"


def _long_name(kind: int, data: bytes) -> str | None:
    if kind == ord("L"):
        return data.rstrip(b"\0").decode("utf-8", "replace")
    return _pax_path(data)


def _pax_path(data: bytes) -> str | None:
    for record in data.split(b"\n"):
        _, _, kv = record.partition(b" ")
        if kv.startswith(b"path="):
            return kv[5:].decode("utf-8", "replace")
    return None


def _take(f: IO[bytes], buf: bytes, pos: int, n: int) -> tuple[bytes, bytes, int]:
    """(the next n bytes, fewer at the end of the stream; the new buffer; its position)."""
    end = pos + n
    if end <= len(buf):
        return buf[pos:end], buf, end
    if n > CHUNK:  # a big member: read it directly rather than through the window
        return buf[pos:] + _read_exact(f, end - len(buf)), b"", 0
    buf = buf[pos:] + _read_exact(f, CHUNK)
    return buf[:n], buf, min(n, len(buf))


def _advance(f: IO[bytes], buf: bytes, pos: int, n: int) -> tuple[bytes, int]:
    """Skip n bytes; past the window, seek (or read and drop) without reading them in."""
    if pos + n <= len(buf):
        return buf, pos + n
    _skip(f, pos + n - len(buf))
    return b"", 0


def _header_size(hdr: bytes) -> int:
    try:  # the usual field: 11 octal digits and a NUL (int() takes bytes)
        return int(hdr[124:135], 8) if hdr[135] == 0 else _octal(hdr[124:136])
    except ValueError:
        return _octal(hdr[124:136])


def _header_key_ext(hdr: bytes, long_name: str | None) -> tuple[str, str] | None:
    """split_name of the entry's name, with a shortcut for the usual short name without a
    folder (~2x cheaper)."""
    if long_name is None and hdr[345] == 0:  # no ustar prefix
        name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if "/" not in name:
            key, dot, ext = name.partition(".")
            return (key, ext.lower()) if key and dot else None
        return split_name(name)
    return split_name(long_name or _header_name(hdr))


class _SampleScan:
    """One pass over a tar stream that groups members into samples: iterating yields (index,
    key, {ext: bytes}) of the samples `wanted` accepts and skips the data of the others;
    afterwards `index` is the last sample's index (counted from headers alone). Counting and
    reading share this code, so a sample index means the same thing in both.

    Per-member Python work is what this costs at 32 px, so headers and small members are
    sliced out of one read-ahead window of CHUNK bytes (rather than two f.read calls per
    member) and the common case is inlined. Raises TarReadError on a truncated archive or a
    corrupt header, after the samples before it; the sample it cuts is dropped."""

    def __init__(self, f: IO[bytes], wanted: Callable[[int], bool]):
        self.f, self.wanted, self.index = f, wanted, -1

    def __iter__(self) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        f, wanted = self.f, self.wanted
        buf, pos, offset = b"", 0, 0  # offset: archive byte of the current header
        key, cur, want_cur, long_name = None, {}, False, None
        while True:
            if pos + BLOCK <= len(buf):
                hdr, pos = buf[pos : pos + BLOCK], pos + BLOCK
            else:
                hdr, buf, pos = _take(f, buf, pos, BLOCK)
                if len(hdr) < BLOCK:
                    raise TarReadError(_end_error(hdr, offset))
            if hdr[0] == 0 and hdr == _ZERO_BLOCK:
                break
            if hdr[257:262] != b"ustar":  # the magic is a cheap test; the checksum costs ~3 us
                _check_sum(hdr, offset)
            size, kind = _header_size(hdr), hdr[156]
            padded = -(-size // BLOCK) * BLOCK
            offset += BLOCK + padded
            if kind in _LONG_NAME:  # GNU long name / pax extended header for the next entry
                data, buf, pos = _take(f, buf, pos, size)
                buf, pos = _advance(f, buf, pos, padded - size)
                long_name = _long_name(kind, data)
                continue
            parts = _header_key_ext(hdr, long_name) if kind in _REGULAR else None
            long_name = None
            if parts is None:
                buf, pos = _advance(f, buf, pos, padded)
                continue
            if parts[0] != key:
                if cur:
                    yield self.index, key, cur
                key, cur = parts[0], {}
                self.index += 1
                want_cur = wanted(self.index)
            if not want_cur:
                buf, pos = _advance(f, buf, pos, padded)
                continue
            if pos + padded <= len(buf):
                data, pos = buf[pos : pos + size], pos + padded
            else:
                data, buf, pos = _take(f, buf, pos, size)
                if len(data) < size:
                    raise TarReadError(f"tar truncated inside {parts[0]}.{parts[1]}")
                buf, pos = _advance(f, buf, pos, padded - size)
            cur[parts[1]] = data
        if cur:
            yield self.index, key, cur


def split_name(name: str) -> tuple[str, str] | None:
    """'dir/abc.seg.png' -> ('dir/abc', 'seg.png'); None for names without an extension."""
    folder, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_tar_samples(
    f: IO[bytes], wanted: Callable[[int], bool]
) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(index within shard, key, {ext: bytes}) for each sample whose index `wanted` accepts;
    the others are skipped without reading their data. A sample cut by truncation is dropped
    (TarReadError is raised after the complete ones)."""
    return iter(_SampleScan(f, wanted))


def count_tar_samples(f: IO[bytes]) -> tuple[int, str | None]:
    """(samples whose headers are present, error message or None) from the headers alone."""
    scan = _SampleScan(f, lambda _: False)
    try:
        for _ in scan:
            pass
    except TarReadError as e:
        return scan.index + 1, str(e)
    return scan.index + 1, None
