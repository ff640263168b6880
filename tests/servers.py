"""Real servers the tests start on loopback (and `benchmarks/bench_tracking_outage.py` reuses)."""

from __future__ import annotations

import contextlib
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """`moto_server` on a loopback port with one bucket; `env` is the AWS environment that
    s3fs, pyarrow and boto3 read (no profile or credentials file of this machine leaks in)."""

    def __init__(self, root: Path, bucket: str) -> None:
        self.port, self.bucket = free_port(), bucket
        self.env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(root / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(root / "aws-credentials"),
        }
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> None:
        self.proc = subprocess.Popen(
            ["moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.time() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.env["AWS_ENDPOINT_URL"], timeout=2):
                    break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise TimeoutError(f"moto_server on port {self.port} did not start") from None
                time.sleep(0.3)
        self.client().create_bucket(Bucket=self.bucket)

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip

    def kill(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None


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
