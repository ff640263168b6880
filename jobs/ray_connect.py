"""Start or join Ray: the one place a job decides where it runs."""

from __future__ import annotations

import os

# A laptop run gets a local Ray whose dashboard listens on loopback only. The dashboard is not
# optional: Ray Train's PlacementGroupCleaner asks its state API whether a controller is alive,
# and without it the placement group of a Tune trial that ASHA stopped is never released (the
# next trials then wait forever for its CPUs).
LOCAL_RAY = {"include_dashboard": True, "dashboard_host": "127.0.0.1"}


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
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **LOCAL_RAY)
    return f"local Ray with {ray.cluster_resources().get('CPU', 0):.0f} CPUs"
