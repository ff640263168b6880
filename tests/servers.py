"""Real servers the tests start on loopback (and `benchmarks/bench_tracking_outage.py` reuses)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_uri() -> str:
    """A loopback URL nothing listens on: a connection to it is refused at once."""
    return f"http://127.0.0.1:{free_port()}"


def wait_for(predicate, timeout_s: float) -> bool:
    """Poll `predicate` every 50 ms until it holds or `timeout_s` passes; its last value."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Until `url` answers at all (any HTTP status); raises when `proc` exits or time runs out."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[0]} exited with {proc.returncode} before {url} answered"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # answered, with an error status: up
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL a server started with start_new_session=True, children included."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


class MotoS3:
    """`moto_server` on a free loopback port (with `bucket` made, if given): an S3 endpoint for
    boto3, s3fs, pyarrow and MLflow, which all find it through `env` (AWS_ENDPOINT_URL plus dummy
    keys)."""

    def __init__(self, home: Path, bucket: str = "") -> None:
        self.port, self.bucket = free_port(), bucket
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            # no profile, config or credentials file of this machine's user leaks in
            "AWS_CONFIG_FILE": str(home / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
        }
        self.proc = subprocess.Popen(
            ["moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        if bucket:
            self.client().create_bucket(Bucket=bucket)

    def client(self):
        import boto3

        wait_http(self.endpoint, 60, self.proc)
        keys = {k.lower(): self.env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **keys)

    def stop(self) -> None:
        stop_group(self.proc)


def postgres_bin() -> Path | None:
    """The folder of the distribution's PostgreSQL server binaries (initdb, pg_ctl): Debian puts
    them in /usr/lib/postgresql/<version>/bin, off PATH; the newest version wins."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)  # fmt: skip
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A throwaway PostgreSQL cluster: `initdb` in a fresh folder, `pg_ctl start` on a free
    loopback port (no Unix socket outside that folder), password authentication. PostgreSQL
    refuses to run as root, so under root the server runs as the `postgres` user the Debian
    package creates."""

    def __init__(self, bin_dir: Path, user: str, password: str, database: str) -> None:
        self.bin, self.user, self.password, self.database = bin_dir, user, password, database
        self.port = free_port()
        # Not under pytest's tmp_path: it is private to root (0700), and the server's user
        # must own its data folder.
        self.root = Path(tempfile.mkdtemp(prefix="ce-postgres-"))
        self.data = self.root / "data"
        self.run_as = "postgres" if os.geteuid() == 0 else None

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI MLflow takes (`--backend-store-uri`)."""
        return (f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/"
                f"{self.database}")  # fmt: skip

    def _run(self, *cmd: str) -> None:
        done = subprocess.run(cmd, user=self.run_as, cwd=self.root, capture_output=True, text=True,
                              env=os.environ | {"PGPASSWORD": self.password})  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed ({done.returncode}): {done.stderr}")

    def start(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.run_as:
            shutil.chown(self.root, self.run_as)
            shutil.chown(pwfile, self.run_as)
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        )
        opts = f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off"  # throwaway: no fsync
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "-l",
            str(self.root / "log"),
            "start",
        )
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                  "-U", self.user, self.database)  # fmt: skip

    def query(self, sql: str, *params: object) -> list[tuple]:
        import psycopg

        dsn = self.uri.replace("postgresql+psycopg://", "postgresql://")  # libpq's form
        with psycopg.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


NODE_PORT_FLAGS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


class RayCluster:
    """A Ray cluster of real `ray start --block` processes on loopback, 1+ CPUs per node: a head
    and worker raylets, each node in its own process group (its own session) and its own temp
    dir, so that one node can be killed whole, as a machine that dies. `env` is every node's
    environment (a cluster's nodes share credentials and endpoints)."""

    def __init__(self, temp_root: Path, env: dict[str, str]) -> None:
        self.temp_root, self.env = temp_root, env
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: list[subprocess.Popen] = []

    def _start(self, args: list[str], num_cpus: int) -> subprocess.Popen:
        # Every port of the node its own: other Rays on this machine hold the default ones.
        ports = [f"--{flag}={free_port()}" for flag in NODE_PORT_FLAGS]
        temp = self.temp_root / f"node{len(self.nodes)}"
        cmd = ["ray", "start", "--block", f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1",
               f"--temp-dir={temp}", *ports, *args]  # fmt: skip
        self.temp_root.mkdir(parents=True, exist_ok=True)
        with (self.temp_root / f"node{len(self.nodes)}.log").open("w") as out:
            proc = subprocess.Popen(cmd, env=self.env, start_new_session=True, stdout=out,
                                    stderr=subprocess.STDOUT)  # fmt: skip
        proc.log = Path(out.name)  # type: ignore[attr-defined]
        self.nodes.append(proc)
        return proc

    def start_head(self, num_cpus: int = 1) -> subprocess.Popen:
        return self._start(["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                            f"--dashboard-port={self.dashboard_port}"], num_cpus)  # fmt: skip

    def add_worker(self, num_cpus: int = 1, timeout_s: float = 180) -> str:
        """Start a worker raylet; returns its node id once the cluster lists it alive. A start
        that fails (a port taken between choosing and binding it: other Rays share this
        machine) is tried once more with fresh ports."""
        for attempt in (1, 2):
            before = {n["node_id"] for n in self.alive_nodes()}
            proc = self._start([f"--address={self.address}"], num_cpus)
            deadline = time.time() + timeout_s
            while time.time() < deadline and proc.poll() is None:
                new = [n["node_id"] for n in self.alive_nodes() if n["node_id"] not in before]
                if new:
                    return new[0]
                time.sleep(0.5)
            if proc.poll() is None:
                raise TimeoutError(f"worker node did not join {self.address} in {timeout_s}s")
            tail = proc.log.read_text()[-2000:]  # type: ignore[attr-defined]
            if attempt == 2:
                raise RuntimeError(f"worker raylet exited with {proc.returncode}:\n{tail}")
        raise AssertionError("unreachable")

    def alive_nodes(self) -> list[dict]:
        """The dashboard's node list (`ray list nodes`): node_id, is_head_node, state, ..."""
        import json

        try:
            url = f"{self.dashboard}/api/v0/nodes?limit=100"
            with urllib.request.urlopen(url, timeout=10) as r:
                nodes = json.loads(r.read())["data"]["result"]["result"]
        except OSError:
            return []
        return [n for n in nodes if n["state"] == "ALIVE"]

    def wait_ready(self, nodes: int, timeout_s: float = 180) -> None:
        deadline = time.time() + timeout_s
        while len(self.alive_nodes()) < nodes:
            if time.time() > deadline:
                raise TimeoutError(f"fewer than {nodes} Ray nodes alive after {timeout_s}s")
            time.sleep(0.5)

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL every process of the node at once, as a machine that dies: its session (the
        node was started with setsid). Not only its process group: Ray puts each worker process
        in a group of its own, and a worker that outlives its raylet trains on for seconds."""
        for pid in _session_members(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in reversed(self.nodes):
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its node
                proc.wait(timeout=30)
            for pid in _session_members(proc.pid):  # what SIGTERM left behind
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _session_members(sid: int) -> list[int]:
    """PIDs of the live processes in session `sid` (field 6 of /proc/PID/stat)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[3]) == sid and fields[0] != "Z":  # state, ppid, pgrp, session
            pids.append(int(d.name))
    return pids
