"""Flaky storage under the loader: a real HTTP server (http.server in a thread) serves real tar
shards, and its first K answers for one shard are a 503 or a body cut off mid-way. Below the
retry limit every sample arrives exactly once; above it the shard's lost samples are counted as
skipped, the other shards are read in full, and the epoch ends in bounded time."""

from __future__ import annotations

import collections
import http.client
import io
import json
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.config import DataConfig, MaskConfig
from pipeline.data import build_loader
from pipeline.retry import (
    Retrier,
    RetriesExhaustedError,
    RetryPolicy,
    TransientHTTPError,
    is_transient,
)

SHARDS, PER_SHARD = 3, 20
FLAKY = "flaky-000001.tar"


def write_shards(folder: Path) -> set[str]:
    """3 shards of 20 noise JPEGs (32 px) with a manifest.json; returns every key."""
    rng, keys, entries = np.random.default_rng(0), set(), []
    for s in range(SHARDS):
        name = f"flaky-{s:06d}.tar"
        with wds.TarWriter(str(folder / name)) as w:
            for i in range(PER_SHARD):
                buf = io.BytesIO()
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                key = f"s{s}-{i:03d}"
                w.write({"__key__": key, "jpg": buf.getvalue(), "cls": b"1"})
                keys.add(key)
        entries.append({"name": name, "count": PER_SHARD, "bytes": (folder / name).stat().st_size})
    (folder / "manifest.json").write_text(json.dumps({"shards": entries}))
    return keys


class FlakyServer(ThreadingHTTPServer):
    """Serves `root`; the first `faults` GETs of FLAKY fail the way `mode` says."""

    daemon_threads = True

    def __init__(self, root: Path, mode: str, faults: int):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.mode, self.faults = root, mode, faults
        self.requests: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()


class _Handler(SimpleHTTPRequestHandler):
    server: FlakyServer

    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=str(args[2].root), **kwargs)

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        with self.server.lock:
            self.server.requests[name] += 1
            fail = name == FLAKY and self.server.faults > 0
            self.server.faults -= fail
        if not fail:
            return super().do_GET()
        if self.server.mode == "503":
            return self.send_error(503, "busy")
        body = (self.server.root / name).read_bytes()  # "drop": half the body, then hang up
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def serve(tmp_path: Path):
    keys = write_shards(tmp_path)
    servers = []

    def start(mode: str, faults: int) -> tuple[FlakyServer, str, set[str]]:
        server = FlakyServer(tmp_path, mode, faults)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        host, port = server.server_address[:2]
        return server, f"http://{host}:{port}/flaky-{{000000..{SHARDS - 1:06d}}}.tar", keys

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def read_epoch(urls: str, retries: int) -> tuple[collections.Counter, int]:
    data = DataConfig(
        image_size=32, batch_size=8, shuffle_buffer=16,
        read_retries=retries, retry_backoff_s=0.01,
    )  # fmt: skip
    loader = build_loader(data, MaskConfig(), urls=urls, train=False)
    seen: collections.Counter[str] = collections.Counter()
    for batch in loader:
        seen.update(k for k, v in zip(batch["key"], batch["valid"].tolist(), strict=True) if v)
    return seen, loader.skipped


@pytest.mark.parametrize("mode", ["drop", "503"])
def test_faults_below_the_limit_lose_nothing(serve, mode: str) -> None:
    server, urls, keys = serve(mode, faults=2)
    seen, skipped = read_epoch(urls, retries=3)
    assert set(seen) == keys and max(seen.values()) == 1  # every sample, exactly once
    assert skipped == 0
    assert server.requests[FLAKY] == 3  # two failures, one good answer
    assert server.faults == 0


@pytest.mark.parametrize("mode", ["drop", "503"])
def test_faults_above_the_limit_skip_the_shard_and_count_it(serve, mode: str) -> None:
    server, urls, keys = serve(mode, faults=100)
    t0 = time.perf_counter()
    seen, skipped = read_epoch(urls, retries=2)
    assert time.perf_counter() - t0 < 20  # bounded: no hang, no minute of hidden retries
    assert max(seen.values()) == 1  # nothing twice
    assert {k for k in keys if not k.startswith("s1-")} <= set(seen)  # the other shards whole
    flaky_read = {k for k in seen if k.startswith("s1-")}
    if mode == "503":
        assert not flaky_read
    assert len(flaky_read) < PER_SHARD
    assert skipped == PER_SHARD - len(flaky_read)  # what was not read is counted, exactly
    assert server.requests[FLAKY] == 3  # the first try and two retries, then give up


def test_missing_shard_is_not_retried(serve) -> None:
    from pipeline.data.open import open_url

    server, urls, _ = serve("503", faults=0)
    missing = urls.split("flaky-")[0] + "nope.tar"
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        open_url(missing, RetryPolicy(retries=3, backoff_s=0.01))
    assert server.requests["nope.tar"] == 1


@pytest.mark.parametrize(
    ("err", "transient"),
    [
        (ConnectionResetError("reset"), True),
        (TimeoutError("slow"), True),
        (http.client.IncompleteRead(b"", 10), True),
        (TransientHTTPError("HTTP 503"), True),
        (OSError(104, "Connection reset by peer"), True),
        (FileNotFoundError("gone"), False),
        (PermissionError("no"), False),
        (OSError("tar truncated"), False),
        (ValueError("bad"), False),
        (RetriesExhaustedError("gave up"), False),
    ],
)
def test_transient_errors_are_classified(err: BaseException, transient: bool) -> None:
    assert is_transient(err) is transient


def test_one_budget_for_the_whole_stream_with_growing_waits() -> None:
    slept: list[float] = []
    retrier = Retrier(RetryPolicy(retries=3, backoff_s=0.1), "shard x.tar", sleep=slept.append)
    fails = iter([ConnectionResetError("a"), TimeoutError("b")])

    def flaky() -> str:
        err = next(fails, None)
        if err:
            raise err
        return "ok"

    assert retrier.call(flaky) == "ok"
    assert retrier.call(flaky) == "ok"
    with pytest.raises(RetriesExhaustedError, match=r"shard x.tar: gave up after 3 retries"):
        for _ in range(3):  # the 3rd and 4th failure of this budget
            retrier.call(lambda: (_ for _ in ()).throw(ConnectionResetError("c")))
    assert slept == pytest.approx([0.1, 0.2, 0.4])
