"""Real servers the tests start on loopback (and `benchmarks/bench_tracking_outage.py` reuses)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


class MlflowServer:
    """One `mlflow server` process group on a fixed loopback port, stopped and started again."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root, self.uri = root, f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> None:
        cmd = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]  # fmt: skip
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # starts faster
        self.proc = subprocess.Popen(
            cmd, cwd=self.root, env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"mlflow server on {self.uri} not up after {timeout_s}s")

    def kill(self) -> None:
        """SIGKILL the whole group: `mlflow server` runs uvicorn workers as children."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None


class MotoServer:
    """`moto_server` (an S3 API) on a free loopback port, with one bucket; `stop()` kills it."""

    def __init__(self, bucket: str, timeout_s: float = 120) -> None:
        import boto3

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint, self.bucket = f"http://127.0.0.1:{self.port}", bucket
        self.proc = subprocess.Popen(
            ["moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        keys = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
        self.client = boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", **keys
        )
        deadline = time.time() + timeout_s
        while True:
            try:
                self.client.create_bucket(Bucket=bucket)
                return
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


class ResettingProxy:
    """A loopback TCP proxy in front of `upstream_port` that answers the first `resets` GET
    requests whose request line contains `match` with a TCP reset (SO_LINGER 0), as a dropped
    connection to object storage does; everything else is forwarded byte for byte. `gets`
    lists every GET request line seen, `reset_lines` those it reset."""

    def __init__(self, upstream_port: int, match: bytes = b"", resets: int = 1) -> None:
        import threading

        self.upstream = ("127.0.0.1", upstream_port)
        self.match, self.resets_left = match, resets
        self.gets: list[str] = []
        self.reset_lines: list[str] = []
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._threads = threading
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:  # closed
                return
            up = socket.create_connection(self.upstream)
            for src, dst, inbound in ((client, up, True), (up, client, False)):
                self._threads.Thread(target=self._pump, args=(src, dst, inbound),
                                     daemon=True).start()  # fmt: skip

    def _should_reset(self, data: bytes) -> bool:
        if not data.startswith(b"GET "):
            return False
        line = data.split(b"\r\n", 1)[0]
        with self._lock:
            self.gets.append(line.decode())
            if self.match in line and self.resets_left > 0:
                self.resets_left -= 1
                self.reset_lines.append(line.decode())
                return True
        return False

    def _pump(self, src: socket.socket, dst: socket.socket, inbound: bool) -> None:
        import struct

        try:
            while data := src.recv(65536):
                # A request's head arrives in one recv on loopback (small, sent at once).
                if inbound and self._should_reset(data):
                    for s in (src, dst):
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            src.close()  # never raises, even on a socket already closed
            dst.close()

    def close(self) -> None:
        self._sock.close()
