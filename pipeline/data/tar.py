"""The tar reader: raw WebDataset samples out of a tar stream, and sample counts from headers.

Samples follow WebDataset's convention: consecutive tar members sharing a key (the path up to the
first dot of the file name) form one sample; the rest of the name is the member's extension
(`train-000001.jpg` -> key `train-000001`, ext `jpg`). The reader here is a small streaming tar
parser rather than `tarfile`, because it must (a) skip the members of samples another worker
decodes without reading them, and (b) count samples from headers alone, cheaply, on every
rank at the start of every epoch. Counting and reading share the same grouping code, so a
sample index means the same thing in both. Opening the stream is the caller's business
(pipeline.data.open).

Shards are untrusted input: every header is checked before its size is used (checksum, octal or
base-256 digits, not negative, at most `max_member` bytes (data.max_member_bytes), not past the
end of the stream when its size is known), so a forged header can neither loop the scan (a
negative size would step back onto itself) nor make it allocate or seek by an attacker's number.
Anything wrong is a TarReadError naming the shard, the byte and the problem; nothing else
escapes the scan.
"""

from __future__ import annotations

import io
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from typing import IO

BLOCK = 512
CHUNK = 1 << 20  # read-ahead window of the tar reader
_ZERO_BLOCK = bytes(BLOCK)  # two of them end an archive
# data.max_member_bytes' default: far above any image a shard holds, far below what a forged
# size could make the reader allocate.
MAX_MEMBER_BYTES = 64 << 20


class TarReadError(OSError):
    """A shard is truncated or holds a corrupt or forged tar header; samples before it are
    intact. The message is one line: the shard, the byte offset and the problem."""


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


def _number(field: bytes) -> int:
    """A numeric header field: octal digits ended by NUL or space, or GNU base-256 (first byte
    0x80: positive, 0xff: negative, two's complement). ValueError for anything else."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    if field[0] == 0xFF:
        return int.from_bytes(field, "big", signed=True)
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not digits:
        return 0
    if not digits.isdigit() or b"8" in digits or b"9" in digits:  # isdigit: ASCII only
        raise ValueError(f"{field!r} is not an octal number")
    return int(digits, 8)


def _header_name(hdr: bytes) -> str:
    name = hdr[0:100].split(b"\0", 1)[0]
    if hdr[257:262] == b"ustar":
        prefix = hdr[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


_REGULAR = (ord("0"), 0, ord("7"))  # type flags of regular files
_LONG_NAME = (ord("L"), ord("x"))  # GNU long name, pax extended header
_SPACES = b" " * 8  # the checksum field counts as spaces in its own sum


def _byte_sum(block: bytes) -> int:
    """The sum of a 512-byte block's bytes. zlib.adler32's low half is 1 + the byte sum mod
    65521, and 256 bytes sum to at most 65280, so per half it is exact: ~0.5 us where sum()
    takes ~4 us (every header pays it, and at 32 px headers are half the reader's work)."""
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


def _checksum_ok(hdr: bytes) -> bool:
    """The stored checksum equals the header's byte sum (unsigned, or signed as some old tars
    wrote it); first compared in the form tarfile and GNU tar write it, six digits, NUL, space."""
    spaced = hdr[:148] + _SPACES + hdr[156:]
    actual = _byte_sum(spaced)
    if hdr[148:156] == b"%06o\0 " % actual:
        return True
    try:
        stored = _number(hdr[148:156])
    except ValueError:
        return False
    return stored == actual or stored == actual - 256 * sum(b >= 128 for b in spaced)


def _header_size(hdr: bytes) -> int | None:
    """The member's data size, None when the size field is no number."""
    try:  # the usual field: 11 octal digits and a NUL (int() takes bytes)
        return int(hdr[124:135], 8) if hdr[135] == 0 else _number(hdr[124:136])
    except ValueError:
        try:
            return _number(hdr[124:136])
        except ValueError:
            return None


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


def stream_size(f: IO[bytes]) -> int | None:
    """The byte size of a regular file or an in-memory stream read from its start; None when
    it cannot be known without reading (a pipe, a remote stream: pass the size instead)."""
    if isinstance(f, io.BytesIO):
        with f.getbuffer() as view:
            return view.nbytes
    try:
        st = os.fstat(f.fileno())
    except (OSError, AttributeError, ValueError):  # io.UnsupportedOperation is both
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


class _SampleScan:
    """One pass over a tar stream that groups members into samples: iterating yields (index,
    key, {ext: bytes}) of the samples `wanted` accepts and skips the data of the others;
    afterwards `index` is the last sample's index (counted from headers alone). Counting and
    reading share this code, so a sample index means the same thing in both, and every header
    is checked whether its sample is wanted or not, so both stop at the same header.

    Per-member Python work is what this costs at 32 px, so headers and small members are
    sliced out of one read-ahead window of CHUNK bytes (rather than two f.read calls per
    member) and the common case is inlined. Raises TarReadError on a truncated archive or a
    bad header, after the samples before it; the sample it cuts is dropped."""

    def __init__(
        self,
        f: IO[bytes],
        wanted: Callable[[int], bool],
        *,
        shard: str,
        max_member: int,
        size: int | None,
    ):
        self.f, self.wanted, self.index = f, wanted, -1
        self.shard, self.max_member, self.size = shard, max_member, size

    def _error(self, offset: int, problem: str) -> TarReadError:
        return TarReadError(f"{self.shard}: byte {offset}: {problem}")

    def _header(self, hdr: bytes, offset: int) -> tuple[int, str | None]:
        """(the member's size, why that size cannot be used or None). A header that fails its
        checksum raises at once; a bad size in a header that passes it is returned, so the
        caller can first close the sample before it (its name can be trusted)."""
        if not _checksum_ok(hdr):
            raise self._error(offset, "bad tar header: bad header checksum")
        size = _header_size(hdr)
        if size is None:
            return 0, f"bad tar header: size field {hdr[124:136]!r} is not a number"
        if 0 <= size <= self.max_member and (
            self.size is None or offset + BLOCK + size <= self.size
        ):
            return size, None
        if size < 0:
            problem = f"negative member size {size}"
        elif size > self.max_member:
            problem = f"member size {size} is over data.max_member_bytes={self.max_member}"
        else:
            problem = f"member size {size} runs past the end of the {self.size}-byte shard"
        return 0, f"bad tar header: {problem}"

    def _end(self, f: IO[bytes], buf: bytes, pos: int, offset: int) -> None:
        """After a zero block: the archive ends here if the next block is zero too (or the
        stream ends); anything else is a lone zero block in the middle of the archive."""
        nxt, _, _ = _take(f, buf, pos, BLOCK)
        if nxt and nxt != _ZERO_BLOCK:
            raise self._error(offset, "a zero block in the middle of the archive")

    def _truncated(self, partial: bytes, offset: int) -> TarReadError:
        if partial or offset == 0:
            return self._error(offset, "tar truncated inside a header (or not a tar file)")
        return self._error(offset, "tar ends without its end-of-archive marker")

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
                    raise self._truncated(hdr, offset)
            if hdr[0] == 0 and hdr == _ZERO_BLOCK:
                self._end(f, buf, pos, offset)
                break
            (size, bad), kind, at = self._header(hdr, offset), hdr[156], offset
            padded = -(-size // BLOCK) * BLOCK
            offset += BLOCK + padded
            if bad and kind not in _REGULAR:  # no sample to close first
                raise self._error(at, bad)
            if kind in _LONG_NAME:  # GNU long name / pax extended header for the next entry
                data, buf, pos = _take(f, buf, pos, size)
                buf, pos = _advance(f, buf, pos, padded - size)
                long_name = _long_name(kind, data)
                continue
            parts = _header_key_ext(hdr, long_name) if kind in _REGULAR else None
            long_name = None
            if parts is None:
                if bad:
                    raise self._error(at, bad)
                buf, pos = _advance(f, buf, pos, padded)
                continue
            if parts[0] != key:
                if cur:
                    yield self.index, key, cur
                key, cur = parts[0], {}
                self.index += 1
                want_cur = wanted(self.index)
            if bad:  # after closing the sample before it: that one is complete
                raise self._error(at, bad)
            if not want_cur:
                buf, pos = _advance(f, buf, pos, padded)
                continue
            if pos + padded <= len(buf):
                data, pos = buf[pos : pos + size], pos + padded
            else:
                data, buf, pos = _take(f, buf, pos, size)
                if len(data) < size:
                    raise self._error(at, f"tar truncated inside {parts[0]}.{parts[1]}")
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
    f: IO[bytes],
    wanted: Callable[[int], bool],
    *,
    shard: str = "tar stream",
    max_member: int = MAX_MEMBER_BYTES,
    size: int | None = None,
) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(index within shard, key, {ext: bytes}) for each sample whose index `wanted` accepts;
    the others are skipped without reading their data. A sample cut by truncation or a bad
    header is dropped (TarReadError, naming `shard`, is raised after the complete ones).
    `size`: the stream's byte size (None: stream_size(f), which knows files and BytesIO)."""
    total = stream_size(f) if size is None else size
    return iter(_SampleScan(f, wanted, shard=shard, max_member=max_member, size=total))


def count_tar_samples(
    f: IO[bytes],
    *,
    shard: str = "tar stream",
    max_member: int = MAX_MEMBER_BYTES,
    size: int | None = None,
) -> tuple[int, str | None]:
    """(samples whose headers are present, error message or None) from the headers alone;
    the same checks as iter_tar_samples, so both stop at the same header."""
    total = stream_size(f) if size is None else size
    scan = _SampleScan(f, lambda _: False, shard=shard, max_member=max_member, size=total)
    try:
        for _ in scan:
            pass
    except TarReadError as e:
        return scan.index + 1, str(e)
    return scan.index + 1, None
