"""Shard URLs and raw tar reading: which shards, how many samples each, and their raw members.

Samples follow WebDataset's convention: consecutive tar members sharing a key (the path up to the
first dot of the file name) form one sample; the rest of the name is the member's extension
(`train-000001.jpg` -> key `train-000001`, ext `jpg`). The reader here is a small streaming tar
parser rather than `tarfile`, because it must (a) skip the members of samples another worker
decodes without reading them, and (b) count samples from headers alone, cheaply, on every
rank at the start of every epoch. Counting and reading share the same grouping code, so a
sample index means the same thing in both.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import IO

from braceexpand import braceexpand

from pipeline.remote import is_local, local_path, open_url, read_beside

log = logging.getLogger(__name__)

BLOCK = 512
CHUNK = 1 << 20  # read-ahead window of the tar reader
_ZERO_BLOCK = bytes(BLOCK)  # two of them end an archive
MANIFEST = "manifest.json"


class TarReadError(OSError):
    """A shard is truncated or holds a corrupt tar header; samples before it are intact."""


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


# ---- tar parsing ----------------------------------------------------------------------------


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
