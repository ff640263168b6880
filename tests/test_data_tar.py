"""The tar reader against forged and broken shards: every header is checked before its size is
used, so a hostile shard costs a TarReadError (one line: shard, byte, problem) and never a hang,
a MemoryError or an OverflowError; counting (headers alone) and reading stop at the same header.

Real shards are written with webdataset's TarWriter (what make_shards uses) and Python's tarfile
(GNU / pax long names); Python's tarfile is the oracle for clean shards only (it too loops on a
negative size). The fuzz test mutates header fields of those shards with hypothesis.
"""

from __future__ import annotations

import io
import re
import tarfile
from functools import cache

import numpy as np
import pytest
import webdataset as wds
from deadline import hard_timeout
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pipeline.data.tar as sr
from pipeline.config import DataConfig
from pipeline.data.tar import TarReadError, count_tar_samples, iter_tar_samples

N_SAMPLES = 12
# Header fields: (offset, length) in the 512-byte block (POSIX ustar layout).
FIELDS = {
    "name": (0, 100),
    "mode": (100, 8),
    "size": (124, 12),
    "chksum": (148, 8),
    "typeflag": (156, 1),
    "linkname": (157, 100),
    "magic": (257, 8),
    "prefix": (345, 155),
}


def base256(n: int) -> bytes:
    """A 12-byte GNU base-256 number field (0x80 marker; 0xff and two's complement if < 0)."""
    if n < 0:
        return n.to_bytes(12, "big", signed=True)
    return b"\x80" + n.to_bytes(11, "big")


# Size fields an attacker would try first.
HOSTILE_SIZES = [
    b"-0000001000\0",  # negative: the old reader stepped back onto the same header forever
    b"-1\0         ",
    base256(2**40),  # the old reader tried to allocate 1 TiB
    base256(2**88 - 1),  # ... and overflowed seek / read
    base256(-512),
    b"77777777777\0",  # 8 GiB - 1, octal
    b"0000000009a\0",  # not octal
    b"\x81" + bytes(11),  # a high bit that is no base-256 marker
    b"\0" * 12,
    b"            ",
]


@cache
def shard_bytes(fmt: str) -> bytes:
    """N_SAMPLES samples of (jpg, cls), member sizes from 0 to ~3 KiB. 'wds': written by
    webdataset's TarWriter as make_shards does; 'gnu' / 'pax': tarfile, with long names (a
    GNU 'L' member / a pax 'x' header before some members) and a directory entry."""
    rng = np.random.default_rng(0)
    blobs = [rng.bytes(int(rng.integers(0, 3000))) for _ in range(N_SAMPLES)]
    buf = io.BytesIO()
    if fmt == "wds":
        with wds.TarWriter(buf, mtime=0.0) as w:
            for i, data in enumerate(blobs):
                w.write({"__key__": f"s{i:03d}", "jpg": data, "cls": str(i % 10).encode()})
        return buf.getvalue()
    tar_format = tarfile.GNU_FORMAT if fmt == "gnu" else tarfile.PAX_FORMAT
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tf:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for i, data in enumerate(blobs):
            folder = "f" * 120 + "/" if i % 3 == 0 else ""  # > 100 chars: a long name
            for ext, payload in (("jpg", data), ("cls", str(i % 10).encode())):
                info = tarfile.TarInfo(f"{folder}s{i:03d}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@cache
def header_offsets(fmt: str) -> list[int]:
    """Byte offset of every header block of the clean shard (long-name headers included)."""
    blob, out, pos = shard_bytes(fmt), [], 0
    while blob[pos : pos + 512] != bytes(512):
        out.append(pos)
        size = sr._number(blob[pos + 124 : pos + 136])
        pos += 512 + -(-size // 512) * 512
    return out


def member_offsets(fmt: str) -> list[int]:
    """Header offsets of the regular files only (TarWriter puts a pax header before each)."""
    blob = shard_bytes(fmt)
    return [h for h in header_offsets(fmt) if blob[h + 156] in b"0\0"]


def with_checksum(hdr: bytearray) -> None:
    """Set the header's checksum to match its bytes, as a forger would."""
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)


def forge(blob: bytes, header: int, field: str, value: bytes, fix: bool = True) -> bytes:
    out = bytearray(blob)
    start, length = FIELDS[field]
    hdr = out[header : header + 512]
    hdr[start : start + length] = value.ljust(length, b"\0")[:length]
    if fix and field != "chksum":
        with_checksum(hdr)
    out[header : header + 512] = hdr
    return bytes(out)


class Pipe(io.RawIOBase):
    """A stream that can neither seek nor tell its size (a `pipe:` shard): skipped members are
    read and dropped."""

    def __init__(self, data: bytes):
        super().__init__()
        self._f = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)


def read_all(stream, wanted=lambda _: True, **kw) -> tuple[list, str | None]:
    """(the (index, key, sample) the reader yields, its TarReadError message or None)."""
    got = []
    try:
        for item in iter_tar_samples(stream, wanted, **kw):
            got.append(item)
    except TarReadError as e:
        return got, str(e)
    return got, None


def check_consistent(blob: bytes, max_member: int = sr.MAX_MEMBER_BYTES) -> tuple[list, str | None]:
    """Read and count the blob (sized, and as a pipe of unknown size) under a hard timeout;
    anything but TarReadError propagates. Asserts that counting and reading agree."""
    with hard_timeout(2.0):
        n, count_err = count_tar_samples(io.BytesIO(blob), shard="x.tar", max_member=max_member)
        got, read_err = read_all(io.BytesIO(blob), shard="x.tar", max_member=max_member)
        evens, _ = read_all(io.BytesIO(blob), lambda i: i % 2 == 0, max_member=max_member)
        n_pipe, pipe_err = count_tar_samples(Pipe(blob), max_member=max_member)
        got_pipe, pipe_read_err = read_all(Pipe(blob), max_member=max_member)
    # Same header stops both, with the same message; the indices are 0, 1, ... in order; a
    # sample cut by the error is dropped by the reader but known to the count.
    assert count_err == read_err
    assert [i for i, _, _ in got] == list(range(len(got)))
    assert len(got) == n if read_err is None else len(got) in (n - 1, n)
    assert evens == [g for g in got if g[0] % 2 == 0]
    # A stream of unknown size meets a past-the-end size as a truncation instead: other words,
    # the same samples.
    assert (n_pipe, got_pipe) == (n, got)
    assert (pipe_err is None) == (pipe_read_err is None) == (read_err is None)
    for err in (count_err, read_err, pipe_err, pipe_read_err):
        assert err is None or "\n" not in err
    return got, read_err


# ---- the faults named in the issue, one by one ---------------------------------------------


@pytest.mark.parametrize("fmt", ["wds", "gnu", "pax"])
def test_clean_shards_agree_with_tarfile(fmt: str) -> None:
    blob = shard_bytes(fmt)
    got, err = check_consistent(blob)
    assert err is None and len(got) == N_SAMPLES
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        want = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
    assert {f"{k}.{ext}": v for _, k, s in got for ext, v in s.items()} == want


@pytest.mark.parametrize("value", HOSTILE_SIZES, ids=lambda v: repr(v)[:20])
@pytest.mark.parametrize("member", [0, 5, 6])  # first member, a sample's jpg, its cls
def test_hostile_size_fields_are_a_tar_read_error(value: bytes, member: int) -> None:
    blob = shard_bytes("wds")
    at = member_offsets("wds")[member]
    got, err = check_consistent(forge(blob, at, "size", value))
    if value in (b"\0" * 12, b"            "):  # an empty size field means 0: a valid header
        return
    assert err is not None and err.startswith(f"x.tar: byte {at}: bad tar header: ")
    assert len(got) == member // 2  # every sample before the forged header arrives
    problem = err.rsplit(": ", 1)[1]
    assert any(
        word in problem for word in ("negative", "max_member_bytes", "past the end", "number")
    ), problem


def test_the_issue_s_forged_headers_name_their_problem() -> None:
    blob, at = shard_bytes("wds"), member_offsets("wds")[4]
    cases = {
        b"-0000001000\0": "negative member size -512",
        base256(2**40): f"member size {2**40} is over data.max_member_bytes={64 << 20}",
        base256(2**88 - 1): "is over data.max_member_bytes",
        b"0000000009a\0": "is not a number",
    }
    for value, problem in cases.items():
        _, err = check_consistent(forge(blob, at, "size", value))
        assert err is not None and problem in err
    # The checksum not fixed: the forged header fails it before its size is looked at.
    _, err = check_consistent(forge(blob, at, "size", b"-0000001000\0", fix=False))
    assert err == f"x.tar: byte {at}: bad tar header: bad header checksum"


def test_cap_and_end_of_shard() -> None:
    blob = shard_bytes("wds")
    sizes = [sr._number(blob[h + 124 : h + 136]) for h in member_offsets("wds")]
    # A cap below the largest member: the shard stops at the first member over it.
    cap = sorted(sizes)[-3]
    first_big = next(k for k, s in enumerate(sizes) if s > cap)
    got, err = check_consistent(blob, max_member=cap)
    assert err and f"over data.max_member_bytes={cap}" in err
    assert len(got) == first_big // 2
    # A size past the end of the shard (the sized stream knows it before reading).
    at = member_offsets("wds")[7]
    got, err = check_consistent(forge(blob, at, "size", b"%011o\0" % len(blob)))
    assert err and "runs past the end of the" in err and len(got) == 3


def test_truncation_anywhere_is_a_tar_read_error() -> None:
    blob = shard_bytes("pax")
    for cut in [0, 1, 511, 512, 513, 1024, len(blob) // 2, len(blob) - 1024, len(blob) - 1]:
        got, err = check_consistent(blob[:cut])
        if cut < len(blob) - 1024:  # the last 1 KiB holds the end marker: cut there, all intact
            assert err is not None, cut


def test_zero_block_in_the_middle_and_names_without_nul() -> None:
    blob = shard_bytes("wds")
    at = header_offsets("wds")[12]  # sample 3's first header (a pax header)
    got, err = check_consistent(blob[:at] + bytes(512) + blob[at:])
    assert err == f"x.tar: byte {at}: a zero block in the middle of the archive"
    # Whether sample 2 had more members after the zero block is unknown: it is dropped.
    assert len(got) == 2
    # A 100-byte name without NUL is a valid header: the key is all 100 bytes.
    name = b"k" * 96 + b".jpg"
    got, err = check_consistent(forge(blob, member_offsets("wds")[0], "name", name))
    assert err is None and got[0][1] == "k" * 96 and "jpg" in got[0][2]


def test_data_config_default_is_the_reader_default() -> None:
    assert DataConfig().max_member_bytes == sr.MAX_MEMBER_BYTES


# ---- fuzzing ---------------------------------------------------------------------------------


def field_value(field: str) -> st.SearchStrategy[bytes]:
    length = FIELDS[field][1]
    raw = st.binary(min_size=0, max_size=length)
    if field == "size":
        octal = st.integers(-(8**11), 8**11).map(lambda n: (b"%011o" % n)[-12:] + b"\0")
        return st.one_of(raw, st.sampled_from(HOSTILE_SIZES), octal)
    if field == "typeflag":
        return st.sampled_from([b"0", b"\0", b"5", b"L", b"x", b"g", b"K", b"2", b"S", b"\xff"])
    if field == "magic":
        return st.sampled_from([b"ustar\x0000", b"ustar  \0", b"", b"USTAR"]) | raw
    return raw


mutation = st.one_of(
    st.tuples(st.just("field"), st.sampled_from(list(FIELDS)), st.booleans()).flatmap(
        lambda t: st.tuples(st.just(t[0]), st.just(t[1]), field_value(t[1]), st.just(t[2]))
    ),
    st.tuples(
        st.just("raw"), st.integers(0, 511), st.binary(min_size=1, max_size=16), st.booleans()
    ),
    st.tuples(st.just("cut"), st.floats(0, 1), st.just(b""), st.just(False)),
)


def mutate(blob: bytes, fmt: str, member: int, how: tuple) -> bytes:
    kind, where, value, fix = how
    heads = header_offsets(fmt)
    at = heads[member % len(heads)]
    if kind == "field":
        return forge(blob, at, where, value, fix)
    if kind == "raw":
        out = bytearray(blob)
        hdr = out[at : at + 512]
        hdr[where : where + len(value)] = value
        del hdr[512:]
        if fix:
            with_checksum(hdr)
        out[at : at + 512] = hdr
        return bytes(out)
    return blob[: int(where * len(blob))]


@settings(
    max_examples=200,
    deadline=1000,
    database=None,  # no .hypothesis folder in the repository
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    fmt=st.sampled_from(["wds", "gnu", "pax"]),
    chunk=st.sampled_from([512, 1536, 1 << 20]),
    edits=st.lists(st.tuples(st.integers(0, 40), mutation), min_size=1, max_size=3),
)
def test_fuzzed_headers_never_hang_and_raise_only_tar_read_error(
    fmt: str, chunk: int, edits: list
) -> None:
    blob = shard_bytes(fmt)
    for member, how in edits:
        blob = mutate(blob, fmt, member, how)
    before = sr.CHUNK
    sr.CHUNK = chunk  # members straddling the read-ahead window, or all inside it
    try:
        _, err = check_consistent(blob)
    finally:
        sr.CHUNK = before
    # What the examples hit (pytest --hypothesis-show-statistics): clean, or which problem.
    event("clean" if err is None else re.sub(r"-?\d+", "N", err.split(": ", 2)[-1])[:48])
