"""Where a job runs: starting or joining Ray, and the paths and checks it needs first.

    connect_ray / start_local_ray   join $RAY_ADDRESS or a given cluster, else a fresh local Ray
    resolve_paths                   local relative paths made absolute (workers run elsewhere);
                                    s3:// gs:// URIs kept as they are (pipeline.storage); the
                                    tracking URI resolved once (pipeline.tracking.server)
    preflight                       tracking store (a real API call to a server), shards and
                                    output root checked before Ray starts

The one place a job decides where it runs; pretraining, the search, the probe and the tests
all go through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from pathlib import Path

from pipeline.config import Config, ConfigError, tracking_uri
from pipeline.data.urls import expand_urls, split_urls, url_scheme
from pipeline.storage import absolute, check_output_root, require_filesystem
from pipeline.tracking.server import check_tracking_uri


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


def _absolute_urls(urls: str) -> str:
    parts = split_urls(urls)
    return ",".join(str(Path(p).resolve()) if url_scheme(p) == "" else p for p in parts)


def resolve_paths(cfg: Config) -> Config:
    """Local relative paths made absolute: Ray workers (and `ray job submit`) run in other
    directories; object-storage URIs are kept verbatim. This is the resolved config that is
    logged and handed to the workers, its tracking URI resolved (pipeline.tracking.server)."""
    data = dataclasses.replace(
        cfg.data,
        train_shards=_absolute_urls(cfg.data.train_shards),
        val_shards=_absolute_urls(cfg.data.val_shards),
    )
    run = dataclasses.replace(cfg.run, output_root=absolute(cfg.run.output_root))
    # Resolved here, on the driver, from the config or $MLFLOW_TRACKING_URI: Ray workers may
    # not see the driver's environment, and the logged config then names the store it used.
    # None to be had (a bucket output root and no URI): left unset, for preflight to refuse.
    with contextlib.suppress(ConfigError):
        run = dataclasses.replace(run, tracking_uri=tracking_uri(run))
    return dataclasses.replace(cfg, data=data, run=run)


def preflight(cfg: Config) -> str:
    """Everything that can fail cheaply, checked before Ray starts. Returns the tracking URI."""
    uri = tracking_uri(cfg.run)
    check_tracking_uri(uri, experiment=cfg.run.name)
    for key, urls in (("data.train_shards", cfg.data.train_shards),
                      ("data.val_shards", cfg.data.val_shards)):  # fmt: skip
        for part in split_urls(urls):
            require_filesystem(part, key)  # s3fs / gcsfs missing: say which extra
    expand_urls(cfg.data.train_shards)  # raises naming the pattern when nothing matches
    if cfg.data.val_shards:
        expand_urls(cfg.data.val_shards)
    check_output_root(cfg.run.output_root)
    return uri
