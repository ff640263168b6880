"""The machine line every benchmark prints beside its table (numbers mean little without it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe(device: torch.device | None = None) -> str:
    """CPU model and ISA, cores, torch version and threads, and the GPU when one is used."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    isa = "avx512_bf16" if "avx512_bf16" in flags else torch.backends.cpu.get_cpu_capability()
    # The load average says how much else ran: on a shared machine it explains odd numbers.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    desc = (
        f"CPU {cpu_model()} ({isa}), {os.cpu_count()} cores, load avg {load:.1f}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if device is not None and device.type == "cuda":
        desc += f"; GPU {torch.cuda.get_device_name(device)}"
    return desc
