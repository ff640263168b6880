"""Start or join Ray: the one place a job decides where it runs."""

from __future__ import annotations

import os
import socket


def start_local_ray(num_cpus: int, **kwargs) -> None:
    """A fresh local Ray (never an older cluster found on this machine) whose dashboard listens
    on loopback only.

    The dashboard is not optional: Ray Train's PlacementGroupCleaner asks its state API whether
    a controller is still alive, and without an answer the placement group of a Tune trial that
    ASHA stopped is never released (later trials then wait forever for its CPUs). The cleaner
    finds the API through RAY_API_SERVER_ADDRESS, else through the machine-wide "current
    cluster" file, which names whichever Ray started last; so the port is chosen here and
    exported before Ray starts, and Ray's processes inherit it."""
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=port, **kwargs)  # fmt: skip


def connect_ray(address: str = "", num_cpus: int | None = None) -> str:
    """Join `address` (or $RAY_ADDRESS, set by `ray job submit`), else start a local Ray sized to
    this machine. Idempotent: an already-initialised Ray (a test's, a Tune driver's) is reused.
    Returns a short description for the log."""
    import ray

    if ray.is_initialized():
        return "existing Ray session"
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        return f"Ray cluster at {address}"
    start_local_ray(num_cpus or os.cpu_count() or 1)
    return f"local Ray with {ray.cluster_resources().get('CPU', 0):.0f} CPUs"
