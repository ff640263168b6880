"""A search scales out: started on a real one-CPU Ray head, it runs trials side by side once a
second node joins (the default `max_concurrent_trials: 0`, no cap sized at start)."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# `ray start` clusters expect a token unless told otherwise; loopback needs none. A raylet
# waits a bounded time for its dashboard agent's port file and dies after it: on a machine
# shared by many jobs the agent took longer than that, so the bound is raised.
NO_TOKEN = {"RAY_AUTH_MODE": "disabled", "RAY_agent_register_timeout_ms": "180000"}
STEPS = 4000  # per trial: ~40 s of training on a quiet 2-core machine, longer than the
# start-up skew between trials (a node joining and a worker starting take 30 s under load)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ray_node(env: dict[str, str], address: str = "", gcs_port: int = 0,
             dashboard_port: int = 0) -> subprocess.Popen:  # fmt: skip
    """One 1-CPU raylet (`ray start --block`) in its own process group, every port its own
    so that it can share this machine with other nodes (and other tests' clusters)."""
    agent, grpc, env_agent, metrics, client = free_ports(5)
    role = [f"--address={address}"] if address else [
        "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={client}",
    ]  # fmt: skip
    cmd = ["ray", "start", *role, "--num-cpus=1", "--node-ip-address=127.0.0.1",
           "--object-store-memory=100000000", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={grpc}", f"--runtime-env-agent-port={env_agent}",
           f"--metrics-export-port={metrics}", "--block"]  # fmt: skip
    return subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the node's whole group (raylet, GCS, workers), SIGKILL what outlives 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def write_configs(tmp_path: Path, cifar_dir: Path) -> Path:
    pretrain = {
        "data": {"train_shards": str(cifar_dir / "cifar10-train-000000.tar"),
                 "val_shards": str(cifar_dir / "cifar10-train-000001.tar"),
                 "image_size": 32, "batch_size": 8, "shuffle_buffer": 64},
        "model": {"image_size": 32, "width": 8, "bottleneck": 32},
        "train": {"max_steps": STEPS, "checkpoint_every": STEPS, "log_every": 100,
                  "eval_batches": 1},
        "run": {"name": "scale-out", "output_root": str(tmp_path / "out"), "num_workers": 1,
                "max_failures": 0, "system_metrics_every_s": 0,
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }  # fmt: skip
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(pretrain))
    tune = {
        "name": "search", "pretrain_config": "pretrain.yaml", "num_samples": 3,
        "objective": "val_rec_l2", "probe": {"train_samples": 64, "val_samples": 32},
        "asha": {"grace_period": 10},  # never stop a trial: each one's interval is measured
        "space": {"train.lr_g": {"loguniform": [1.0e-4, 3.0e-3]}},
    }  # fmt: skip
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(tune))
    return tmp_path / "tune.yaml"


def training_intervals(tracking_uri: str) -> dict[str, tuple[float, float]]:
    """Each trial's first and last logged training step, wall-clock seconds (MLflow's
    timestamps, taken by rank 0 when it logs)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=tracking_uri)
    exp = c.get_experiment_by_name("scale-out")
    out = {}
    for run in c.search_runs([exp.experiment_id], filter_string="tags.`ce.trial_id` != ''"):
        history = c.get_metric_history(run.info.run_id, "loss_g")
        times = sorted(m.timestamp / 1000 for m in history)
        out[run.data.tags["ce.trial_id"]] = (times[0], times[-1])
    return out


@pytest.mark.slow
@pytest.mark.integration
def test_search_runs_trials_side_by_side_after_a_node_joins(tmp_path, cifar_dir):
    gcs_port, dashboard = free_ports(2)
    address = f"127.0.0.1:{gcs_port}"
    # Ray Train's PlacementGroupCleaner finds the state API through RAY_API_SERVER_ADDRESS, else
    # through whichever Ray started last on this machine (pipeline.runtime.start_local_ray).
    env = os.environ | NO_TOKEN | {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}"}
    nodes = [ray_node(env, gcs_port=gcs_port, dashboard_port=dashboard)]
    search = None
    try:
        env |= {"RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
        search = subprocess.Popen(
            [sys.executable, "-m", "jobs.tune", "--config", str(write_configs(tmp_path, cifar_dir)),
             "--address", address],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        lines: queue.Queue[str] = queue.Queue()
        log: list[str] = []
        threading.Thread(target=lambda: [lines.put(x) for x in search.stdout], daemon=True).start()
        # The search has started and its first trial holds the head's only CPU: add a node.
        deadline = time.time() + 480  # minutes only on a machine shared by many jobs
        while time.time() < deadline:
            try:
                log.append(lines.get(timeout=1))
            except queue.Empty:
                assert search.poll() is None, "".join(log)[-3000:]
                continue
            if "[train] step" in log[-1]:
                break
        else:
            pytest.fail("no trial started training:\n" + "".join(log)[-3000:])
        joined = time.time()
        nodes.append(ray_node(env, address=address))
        rc = search.wait(timeout=600)
        while not lines.empty():
            log.append(lines.get())
        assert rc == 0, "".join(log)[-3000:]
        # A node that died never ran anything: say so rather than fail on the overlap below.
        assert nodes[1].poll() is None, "the joined node exited (its raylet.1.out says why)"
    finally:
        for p in ([search] if search else []) + nodes[::-1]:
            stop(p)

    spans = training_intervals(f"sqlite:///{tmp_path / 'mlflow.db'}")
    t0 = min(start for start, _ in spans.values())
    print(f"node joined at {joined - t0:.1f} s;", {t: (round(a - t0, 1), round(b - t0, 1))
                                                  for t, (a, b) in spans.items()})  # fmt: skip
    assert len(spans) == 3
    before = [t for t, (start, _) in spans.items() if start < joined]
    assert len(before) == 1  # one CPU at start: one trial trained, the others waited
    pairs = [(a, b) for a in spans for b in spans if a < b]
    overlap = {(a, b): min(spans[a][1], spans[b][1]) - max(spans[a][0], spans[b][0])
               for a, b in pairs}  # fmt: skip
    assert max(overlap.values()) > 1.0, (joined, spans)  # two trials trained at once, after
