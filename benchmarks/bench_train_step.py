"""Training-step throughput of the Context Encoder trainer against a plain reference step.

    python benchmarks/bench_train_step.py --quick --threads 2   # paper config only, 2-3 min
    python benchmarks/bench_train_step.py                 # CPU, paper + CIFAR configs, batch 64
    python benchmarks/bench_train_step.py --device cuda   # the same on a GPU

Reference = the recipe of the popular PyTorch ports, on the same architecture: fp32, NCHW,
a Sigmoid at the end of D + nn.BCELoss, default torch.optim.Adam(betas=(0.5, 0.999)), D
gradients computed (and thrown away) during the G step. Ours = pipeline.trainer.Trainer in
several settings (fp32 / bf16 autocast, NCHW / channels_last, optional torch.compile), and
with the SHIPPED config's settings (jobs/configs/paper128.yaml, cifar10.yaml: `auto`, resolved
for this machine by pipeline.precision). Both run one G forward, a D step on real then fake, and
a G step through the updated D. The verdict lines check that the shipped setting is within 10 %
of the best one and at least 2x the reference.

GFLOP/s is the reference step's FLOPs (counted once with torch.utils.flop_counter) times the
images/s of each row, so every row is measured in the same useful-work unit; the matmul
ceiling is a square matmul in fp32 and bf16 measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from machine import describe as machine
from pipeline.config import Config, DataConfig, ModelConfig, TrainConfig, load_config
from pipeline.model import (
    DenseConv2d,
    DenseConvTranspose2d,
    build_discriminator,
    build_generator,
)
from pipeline.objective import region
from pipeline.precision import resolve_for
from pipeline.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
PAPER_YAML, CIFAR_YAML = CONFIGS / "paper128.yaml", CONFIGS / "cifar10.yaml"
REFERENCE = "reference (fp32 NCHW, BCELoss, Adam)"
SHIPPED = "ours shipped"  # prefix of the row timed with the shipped config's train settings


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_call(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call, synchronised on a GPU."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """Best of several square matmuls (best-of: the machine is shared, spikes are others')."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = min(one_call(lambda: a @ b, device) for _ in range(8 if device.type == "cpu" else 50))
    return 2 * n**3 / best / 1e9


def make_batch(model: ModelConfig, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Synthetic centre-masked batch: images in [-1, 1], mean-filled interior."""
    s, t = model.image_size, model.image_size // 2
    ring = max(1, round(4 * s / 128))
    image = torch.rand(batch, 3, s, s, device=device) * 2 - 1
    mask = torch.zeros(batch, 1, s, s, device=device)
    lo, hi = (s - t) // 2 + ring, (s + t) // 2 - ring
    mask[..., lo:hi, lo:hi] = 1
    return {"image": image, "input": image * (1 - mask), "mask": mask}


def plain(module: nn.Module) -> nn.Module:
    """The same network with the matmul-computed bottleneck layers turned back into the plain
    nn.Conv2d / nn.ConvTranspose2d the ports use (same weights, same math, stock kernels)."""
    for m in module.modules():
        if isinstance(m, DenseConv2d):
            m.__class__ = nn.Conv2d
        elif isinstance(m, DenseConvTranspose2d):
            m.__class__ = nn.ConvTranspose2d
    return module


class ReferenceStep:
    """The popular ports' step: sigmoid D + BCELoss, default Adam, fp32 NCHW, plain convs."""

    def __init__(self, model: ModelConfig, device: torch.device):
        self.model = model
        self.g = plain(build_generator(model)).to(device)
        self.d = nn.Sequential(plain(build_discriminator(model)), nn.Sigmoid()).to(device)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=2e-3, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.bce = nn.BCELoss()

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        target, mask = region(batch["image"], self.model), region(batch["mask"], self.model)
        self.d.zero_grad()
        out = self.d(target)
        self.bce(out, torch.ones_like(out)).backward()
        fake = self.g(batch["input"])
        out = self.d(fake.detach())
        self.bce(out, torch.zeros_like(out)).backward()
        self.opt_d.step()
        self.g.zero_grad()
        out = self.d(fake)
        err_adv = self.bce(out, torch.ones_like(out))
        w = mask + 10.0 * (1 - mask)
        err_rec = (w * (fake - target).pow(2)).mean()
        (0.001 * err_adv + 0.999 * err_rec).backward()
        self.opt_g.step()


def step_gflop_per_image(model: ModelConfig, device: torch.device) -> float:
    """FLOPs of one reference training step per image (forward + backward, all matmuls)."""
    ref, batch = ReferenceStep(model, device), make_batch(model, 4, device)
    with FlopCounterMode(display=False) as counter:
        ref(batch)
    return counter.get_total_flops() / 4 / 1e9


def ours(model: ModelConfig, device: torch.device, batch: int, **train) -> Callable:
    cfg = Config(
        data=DataConfig(image_size=model.image_size, batch_size=batch),
        model=model,
        train=TrainConfig(**train),
    )
    trainer = Trainer(cfg, device)
    return trainer.train_step


def shipped_variant(path: Path, device: torch.device) -> tuple[str, dict]:
    """The row for a shipped YAML: its precision / channels_last / compile, as given (auto is
    resolved by the Trainer, as in a real run); the label says what they resolved to."""
    train = load_config(path).train if path.is_file() else TrainConfig()
    r = resolve_for(train.precision, train.channels_last, device)
    layout = "channels_last" if r.channels_last else "NCHW"
    settings = {
        "precision": train.precision,
        "channels_last": train.channels_last,
        "compile": train.compile,
    }
    return f"{SHIPPED} ({train.precision} -> {r.precision} {layout})", settings


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    print(machine(device))

    def ceiling() -> tuple[float, float]:
        # An emulated bf16 matmul of this size takes minutes: no bf16 ceiling with --fp32-only.
        bf16 = float("nan") if args.fp32_only else matmul_gflops(device, torch.bfloat16)
        return matmul_gflops(device, torch.float32), bf16

    ceilings = [ceiling()]
    configs = [] if args.skip_paper else [("paper 128px", ModelConfig(), args.batch, PAPER_YAML)]
    if not args.skip_cifar:
        cifar = load_config(CIFAR_YAML).model if CIFAR_YAML.is_file() else ModelConfig(32)
        name = f"cifar 32px w{cifar.width} b{cifar.bottleneck}"
        configs.append((name, cifar, args.batch, CIFAR_YAML))
    variants = [
        ("ours fp32 NCHW", {"precision": "fp32", "channels_last": False}),
        ("ours fp32 channels_last", {"precision": "fp32", "channels_last": True}),
        ("ours bf16 NCHW", {"precision": "bf16", "channels_last": False}),
        ("ours bf16 channels_last", {"precision": "bf16", "channels_last": True}),
    ]
    if args.fp32_only:
        # On a CPU that emulates bf16 (AVX2 only) a bf16 step takes minutes: time what auto
        # would run there. ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 gives such a CPU's
        # kernels on a newer one.
        variants = [v for v in variants if v[1]["precision"] == "fp32"]
    if args.compile:
        variants.append(
            (
                "ours bf16 cl + compile",
                {"precision": "bf16", "channels_last": True, "compile": True},
            )
        )
    rows = []
    for name, model, b, yaml in configs:
        shipped = shipped_variant(yaml, device)
        keep_shipped = not args.fp32_only or " -> fp32 " in shipped[0]
        here = [*variants, shipped] if keep_shipped else variants
        rows += time_config(name, model, b, here, device, args)
        # Ceilings again after each config: a spike from another process at one moment must
        # not set the yardstick; the best of all measurements is the machine's ceiling.
        ceilings.append(ceiling())
    ceil32, ceil16 = max(c[0] for c in ceilings), max(c[1] for c in ceilings)
    print(
        f"matmul ceiling (best of {len(ceilings)} measurements): fp32 {ceil32:.0f} GFLOP/s, "
        f"bf16 {ceil16:.0f} GFLOP/s"
    )
    print_table(rows, ceil32, ceil16, args)
    print_verdicts(rows)


def print_verdicts(rows: list[tuple]) -> None:
    """Per config: ours / reference for the best setting and the shipped one, and whether the
    shipped one is within 10 % of the best and at least 2x the reference."""
    print()
    for cfg in dict.fromkeys(r[0] for r in rows):
        mine = {r[1]: r[2] for r in rows if r[0] == cfg}
        ref = mine.pop(REFERENCE)
        best = max((k for k in mine if not k.startswith(SHIPPED)), key=mine.get)
        shipped = next((k for k in mine if k.startswith(SHIPPED)), None)
        if shipped is None:  # --fp32-only where the shipped config resolves to bf16
            print(f"{cfg}: best '{best}' {mine[best] / ref:.2f}x reference (shipped row skipped)")
            continue
        near = mine[shipped] >= 0.9 * mine[best]
        fast = mine[shipped] >= 2.0 * ref
        print(
            f"{cfg}: best '{best}' {mine[best] / ref:.2f}x reference; "
            f"'{shipped}' {mine[shipped] / ref:.2f}x reference, "
            f"{100 * mine[shipped] / mine[best]:.0f}% of best -> "
            f"within 10% of best: {'yes' if near else 'NO'}, >= 2x reference: "
            f"{'yes' if fast else 'NO'}"
        )


def time_config(
    name: str,
    model: ModelConfig,
    b: int,
    variants: list[tuple[str, dict]],
    device: torch.device,
    args: argparse.Namespace,
) -> list[tuple]:
    """Rows (config, variant, img/s best, img/s median, vs ref, GFLOP/image). All variants are
    built first and timed round-robin, one step each per round, so a load spike from another
    process hits every variant alike; the best step of each is its rate."""
    gflop = step_gflop_per_image(model, device)
    batch = make_batch(model, b, device)
    steps = {REFERENCE: ReferenceStep(model, device)}
    steps.update({vname: ours(model, device, b, **train) for vname, train in variants})
    for vname, step in steps.items():
        for _ in range(args.warmup + ("compile" in vname)):  # compile: trace + recompile
            step(batch)
    times: dict[str, list[float]] = {k: [] for k in steps}
    # At least --iters rounds, and more until --min-time has passed: at 32 px a step is ~50 ms,
    # and a handful of them is too few for the best-of to miss other processes' load bursts.
    t0, rounds = time.perf_counter(), 0
    while rounds < args.iters or (time.perf_counter() - t0 < args.min_time and rounds < 100):
        for vname, step in steps.items():
            times[vname].append(one_call(partial(step, batch), device))
        rounds += 1
    base = b / min(next(iter(times.values())))
    return [
        (name, k, b / min(v), b / statistics.median(v), b / min(v) / base, gflop)
        for k, v in times.items()
    ]


def print_table(rows: list, ceil32: float, ceil16: float, args: argparse.Namespace) -> None:
    print(
        f"\nbatch {args.batch}, warm-up {args.warmup}, >= {args.iters} timed steps each "
        f"(>= {args.min_time:g} s per config), round-robin; "
        "img/s from the best step (median beside it); GFLOP/s = reference FLOPs per image x "
        "best img/s"
    )
    head = (
        f"{'config':<24} {'variant':<42} {'img/s':>8} {'median':>8} {'vs ref':>7} {'GFLOP/s':>8} "
        f"{'% fp32':>7} {'% bf16':>7}"
    )
    print(head)
    print("-" * len(head))
    for cfg, variant, ips, med, ratio, gflop in rows:
        rate = ips * gflop
        print(
            f"{cfg:<24} {variant:<42} {ips:8.1f} {med:8.1f} {ratio:6.2f}x {rate:8.1f} "
            f"{100 * rate / ceil32:6.0f}% {100 * rate / ceil16:6.0f}%"
        )
    gflops = {row[0]: row[-1] for row in rows}
    print(
        "\nGFLOP per image per step (counted): "
        + ", ".join(f"{k} {v:.2f}" for k, v in gflops.items())
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=4, help="timed rounds at least")
    p.add_argument("--min-time", type=float, default=20.0, help="seconds of timed rounds at least")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow start)")
    p.add_argument("--skip-cifar", action="store_true")
    p.add_argument("--skip-paper", action="store_true")
    p.add_argument("--quick", action="store_true", help="the paper config only (2-3 minutes)")
    p.add_argument("--fp32-only", action="store_true", help="fp32 rows only (no native bf16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    if args.quick:
        args.skip_cifar = True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run(args)


if __name__ == "__main__":
    main()
