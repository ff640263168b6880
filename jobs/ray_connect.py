"""Start or join Ray: the one place a job decides where it runs."""

from __future__ import annotations

import os


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
    # A laptop run: local Ray bound to this machine, dashboard off (nothing listens beyond it).
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False)
    return f"local Ray with {ray.cluster_resources().get('CPU', 0):.0f} CPUs"
