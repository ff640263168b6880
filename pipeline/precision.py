"""Which precision and memory format a run actually uses on the machine it lands on.

`train.precision: auto` (the default) means bf16 autocast where the device computes bf16
natively and fp32 everywhere else: on a CPU without AVX512-BF16 / AMX (AVX2-only EPYCs, older
Xeons) bf16 is emulated through fp32 conversions and a step runs ~30x slower than fp32, so a
config must never pick it silently. `train.channels_last: auto` is on with bf16 (measured to
win) and on CUDA (see `resolve`). Explicit values are obeyed as given; bf16 on a machine that
emulates it warns once, naming the machine's instruction sets.

`resolve` is pure (capabilities in, choice out) so every branch is testable without the
hardware; `capabilities` and `resolve_for` are the thin layer that reads the real machine.
"""

from __future__ import annotations

import functools
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

# CPU feature names as torch.cpu.get_capabilities() spells them, reported on machine lines.
X86_ISA = ("avx2", "avx512_f", "avx512_bf16", "amx_bf16", "amx_tile")
# Any one of these runs bf16 matmuls/convs natively through oneDNN: AVX512-BF16 (VDPBF16PS,
# Cooper Lake, Zen 4+), AMX (Sapphire Rapids+), or the Arm BF16 extension (BFMMLA; Graviton3+).
NATIVE_BF16_CPU = frozenset({"avx512_bf16", "amx_bf16", "bf16", "sve_bf16"})


@dataclass(frozen=True)
class Capabilities:
    """What the resolution needs to know about one device."""

    device_type: str  # torch.device.type: "cpu", "cuda", ...
    cpu_isa: frozenset[str] = frozenset()  # CPU features present (torch.cpu.get_capabilities)
    cpu_capability: str = ""  # torch's kernel dispatch level: "AVX2", "AVX512", "DEFAULT", ...
    cuda_bf16: bool = False  # torch.cuda.is_bf16_supported(including_emulation=False)
    cuda_name: str = ""

    def native_bf16(self) -> bool:
        if self.device_type == "cuda":
            return self.cuda_bf16
        if self.device_type == "cpu":
            return bool(self.cpu_isa & NATIVE_BF16_CPU)
        return False  # MPS, XPU, ...: not measured here, fp32 is the safe choice

    def describe(self) -> str:
        """The ISA in words, for machine lines and warnings: `avx2 avx512_f, torch AVX512`."""
        if self.device_type == "cuda":
            return f"{self.cuda_name or 'CUDA'} (native bf16: {'yes' if self.cuda_bf16 else 'no'})"
        present = [f for f in X86_ISA if f in self.cpu_isa]
        present += sorted((self.cpu_isa & NATIVE_BF16_CPU) - set(present))
        return f"{' '.join(present) or 'no avx2'}, torch {self.cpu_capability or '?'}"


@dataclass(frozen=True)
class Resolved:
    """The settings a trainer runs with, and why."""

    precision: str  # "fp32" | "bf16"
    channels_last: bool
    reason: str

    def as_tags(self) -> dict[str, str]:
        return {
            "resolved.precision": self.precision,
            "resolved.channels_last": str(self.channels_last).lower(),
        }


def resolve(precision: str, channels_last: bool | str, caps: Capabilities) -> Resolved:
    """Resolve `train.precision` ("auto" | "fp32" | "bf16") and `train.channels_last` (bool or
    "auto") for a device with capabilities `caps`.

    auto precision: bf16 where `caps.native_bf16()`, else fp32. auto channels_last: on with
    bf16 and on CUDA, off for fp32 elsewhere. Measured with benchmarks/bench_train_step.py (see
    docs/precision.md): on this project's CPU channels_last was +5 % to +150 % with bf16
    (oneDNN's bf16 convolutions want NHWC; NCHW pays a reorder per layer) and within noise with
    fp32, so fp32 on a CPU keeps the NCHW layout it always had; GPU tensor cores prefer NHWC."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"train.precision: {precision!r} is not one of auto, fp32, bf16")
    native = caps.native_bf16()
    if precision == "auto":
        chosen = "bf16" if native else "fp32"
        why = f"auto: {'native' if native else 'no native'} bf16 on {caps.describe()}"
    else:
        chosen, why = precision, f"set explicitly (native bf16: {'yes' if native else 'no'})"
    if channels_last == "auto":
        cl = chosen == "bf16" or caps.device_type == "cuda"
    elif isinstance(channels_last, bool):
        cl = channels_last
    else:
        raise ValueError(f"train.channels_last: {channels_last!r} is not true, false or auto")
    return Resolved(chosen, cl, why)


def capabilities(device: torch.device | str = "cpu") -> Capabilities:
    """The real machine's capabilities for `device`."""
    device = torch.device(device)
    caps = torch.cpu.get_capabilities()
    isa = frozenset(k for k, v in caps.items() if v is True)
    cuda_bf16, cuda_name = False, ""
    if device.type == "cuda":
        # including_emulation=False: pre-Ampere GPUs report bf16 "supported" through emulation.
        cuda_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        cuda_name = torch.cuda.get_device_name(device)
    return Capabilities(
        device_type=device.type,
        cpu_isa=isa,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cuda_bf16=cuda_bf16,
        cuda_name=cuda_name,
    )


def cpu_model() -> str:
    """The CPU's model name (machine lines of benchmarks: the ISA alone does not name it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def resolve_for(precision: str, channels_last: bool | str, device: torch.device | str) -> Resolved:
    """`resolve` on the real machine; warns once when bf16 is asked for on emulating hardware."""
    caps = capabilities(device)
    out = resolve(precision, channels_last, caps)
    if out.precision == "bf16" and not caps.native_bf16():
        _warn_emulated(caps.describe())
    return out


@functools.cache  # once per process and machine: every trainer in a test run or sweep asks
def _warn_emulated(isa: str) -> None:
    warnings.warn(
        f"train.precision=bf16 on a device without native bf16 ({isa}): it is emulated and can "
        "run ~30x slower than fp32; use train.precision=auto or fp32",
        RuntimeWarning,
        stacklevel=3,
    )
