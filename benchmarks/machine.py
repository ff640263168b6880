"""The machine line every benchmark prints beside its table (numbers mean little without it)."""

from __future__ import annotations

import os

import torch

from pipeline.precision import Capabilities, capabilities, cpu_model, resolve


def describe(device: torch.device | None = None) -> str:
    """CPU model, the instruction sets that decide bf16 (avx2, avx512_f, avx512_bf16, amx_bf16,
    amx_tile) and torch's dispatch level, cores, load, torch version and threads, the GPU when
    one is used, and what `train.precision: auto` / `channels_last: auto` resolve to here."""
    device = torch.device(device or "cpu")
    caps = capabilities(device)
    auto = resolve("auto", "auto", caps)
    # The load average says how much else ran: on a shared machine it explains odd numbers.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    isa = Capabilities("cpu", caps.cpu_isa, caps.cpu_capability).describe()
    desc = (
        f"CPU {cpu_model()} ({isa}), {os.cpu_count()} cores, load avg {load:.1f}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if device.type == "cuda":
        desc += f"; GPU {caps.describe()}"
    return desc + f"; auto -> {auto.precision}, channels_last {str(auto.channels_last).lower()}"
