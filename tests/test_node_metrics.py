"""pipeline.node_metrics: every node's system metrics reach rank 0, tagged by node, through a
real gloo process group (3 processes: two on "node0", one on "node1"), sampled by MLflow's
own monitors on this machine."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.node_metrics import NodeSampler, gather_node_metrics

NODES = ["node0", "node0", "node1"]  # rank -> node; the first rank on a node samples it


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(NODES))
    try:
        sampler = NodeSampler(0.05) if NODES.index(NODES[rank]) == rank else None
        time.sleep(0.3)  # a few samples in the window
        got = gather_node_metrics(sampler, NODES[rank])
        if sampler is not None:
            sampler.stop()
        Path(out, f"{rank}.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration  # three processes importing torch: seconds each on a busy machine
def test_every_node_reaches_every_rank_once_tagged_by_node(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=len(NODES), join=True)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(len(NODES))]
    assert got[0] == got[1] == got[2]  # one all-gather: every rank holds the same figures
    keys = set(got[0])
    for node in ("node0", "node1"):
        cpu = got[0][f"system/{node}/cpu_utilization_percentage"]
        assert 0 <= cpu <= 100 * os.cpu_count()
        assert got[0][f"system/{node}/system_memory_usage_megabytes"] > 0
    # Nothing but the two nodes, each once (rank 1 shares node0 and sends nothing).
    assert {k.split("/")[1] for k in keys} == {"node0", "node1"}
    assert len(keys) == 2 * len({k.split("/", 2)[2] for k in keys})


def test_without_a_process_group_it_is_this_node_alone():
    sampler = NodeSampler(0.05)
    try:
        time.sleep(0.15)
        got = gather_node_metrics(sampler, "node3")
        again = gather_node_metrics(sampler, "node3")  # a new window: sampled again, not empty
    finally:
        sampler.stop()
    assert got and all(k.startswith("system/node3/") for k in got)
    assert set(again) == set(got)
    assert gather_node_metrics(None, "node3") == {}  # a rank that does not sample sends nothing


@pytest.mark.parametrize("interval", [0.0, -1.0])
def test_a_sampler_needs_a_positive_interval(interval):
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        NodeSampler(interval)
