"""System metrics from every node of a run, tagged by node: `system/node<i>/<metric>`.

Only rank 0 writes to MLflow (one writer for the sqlite store, the outage spool and the ordered
queue: pipeline/tracking.py), so the other nodes' figures travel to it through the process group
the run already has: the first rank on each node samples its machine on a thread (MLflow's own
monitors: CPU, memory, disk, network and, with nvidia-ml-py, GPU; no MLflow calls), and at each
log step every rank joins one all_gather_object of those samples (a few hundred bytes, every
`train.log_every` steps; fit calls on_log on every rank at the same steps, so the collective is
always matched). The names follow MLflow's multi-node layout, `system/<node_id>/...`. Rank 0's
own `system/*` series (pipeline.tracking.SystemMetrics) is unchanged: one node's figures, also
for single-process runs.
"""

from __future__ import annotations

import threading
from typing import Any


class NodeSampler:
    """This machine's system metrics, sampled every `interval_s` on a daemon thread; `take()`
    returns the mean of the samples since the previous take (MLflow's aggregation)."""

    def __init__(self, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"NodeSampler: interval_s must be > 0, got {interval_s}")
        self._monitors = _monitors()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._collect()  # CPU percentages are measured between two samples
        self._thread = threading.Thread(target=self._loop, args=(interval_s,),
                                        name="node-metrics", daemon=True)  # fmt: skip
        self._thread.start()

    def _collect(self) -> None:
        with self._lock:
            for m in self._monitors:
                m.collect_metrics()

    def _loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self._collect()

    def take(self) -> dict[str, float]:
        self._collect()  # at least one sample in every window, however short
        with self._lock:
            out: dict[str, float] = {}
            for m in self._monitors:
                out.update({k: float(v) for k, v in m.aggregate_metrics().items()})
                m.clear_metrics()
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _monitors() -> list[Any]:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:  # needs nvidia-ml-py (the `gpu` extra) and an NVIDIA driver
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())
    except Exception:  # no pynvml or no GPU: CPU-side figures only, as MLflow does
        pass
    return monitors


def gather_node_metrics(sampler: NodeSampler | None, node: str) -> dict[str, float]:
    """Every rank calls this at the same step; `sampler` is set on one rank per node (None on
    the others). Returns {system/<node>/<metric>: value} for every node, on every rank (the
    caller logs it from rank 0). Without a process group: this process's node alone."""
    import torch.distributed as dist

    mine = (node, sampler.take()) if sampler is not None else None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    else:
        every = [mine]
    return {f"system/{n}/{k}": v for item in every if item for n, m in [item] for k, v in m.items()}
