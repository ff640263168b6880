"""The GPU check: one table, with the machine line, of what a GPU run depends on.

    python benchmarks/gpu_check.py                          # on a GPU machine: <= 8 minutes
    python benchmarks/gpu_check.py --device cpu --quick     # CI and this CPU machine: ~1-2 min

Rows, each reusing the benchmark that owns the measurement:
- train step at the paper config (128 px, 4000-d bottleneck, batch 64): the port-style
  reference (bench_train_step.ReferenceStep) vs ours in fp32 NCHW and bf16 autocast +
  channels_last (bench_train_step.time_config: round-robin, best step). bf16 rows are left out
  where bf16 is emulated (AVX2-only CPUs: ~30x slower, docs/precision.md);
- Ray Train with `use_gpu` (1 worker; TorchTrainer's backend is NCCL on GPUs, gloo on CPU): the
  project's own trainer (pipeline.ray_train.build_trainer) on the CIFAR-10 shards at 128 px,
  steady images/s between its two checkpoints (start-up excluded) and the wall time with it;
- feature extraction (evaluation.features.extract, all encoder layers pooled, on the device)
  and the streaming probe (bench_streaming_probe: synthetic features, one head, one epoch);
- the input path: images/s of the default loader at the paper's transform (500x375 JPEGs ->
  shorter side 350 -> random 128 crop, bench_input_paths), with 0 and N decode workers, against
  the images/s the best training step consumes: below 1x, decoding starves the GPU (add
  data.num_workers, or data.input: ray_data; docs/input_paths.md).

It needs the CIFAR-10 shards (--cifar-dir; default ../shared/datasets/cifar10). Scratch files go
to a temporary folder, deleted at the end. tests/test_gpu_check.py runs `--device cpu --quick`
so that the script never rots. No GPU was lent to the session that wrote it: the GPU run and its
figures are still to be done (README "GPU check").
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# This checkout's packages and the sibling benchmarks, whichever copy is installed.
sys.path[:0] = [str(REPO), str(HERE)]

import bench_train_step as steps  # noqa: E402
import torch  # noqa: E402
from bench_input_paths import default_rate, photo_shards  # noqa: E402
from bench_streaming_probe import fit_one_head, write_synthetic  # noqa: E402

from machine import describe  # noqa: E402
from pipeline.config import DataConfig, MaskConfig, ModelConfig, load_config  # noqa: E402
from pipeline.precision import capabilities  # noqa: E402

Row = tuple[str, str, float, str, str]  # section, measurement, value, unit, note


@dataclass(frozen=True)
class Plan:
    """How much each section measures: the full check on a GPU, a small one for CI."""

    batch: int = 64  # training step and Ray Train, per rank
    min_time: float = 20.0  # seconds of timed round-robin steps at least
    ray_every: int = 100  # Ray Train: steps between its two checkpoints
    extract_images: int = 4096
    probe_rows: int = 200_000
    probe_dim: int = 1024
    probe_classes: int = 100
    photos: int = 1000
    workers: int = 8  # decode workers of the input path's second row


FULL = Plan()
QUICK = Plan(batch=4, min_time=0.0, ray_every=2, extract_images=64, probe_rows=8192,
             probe_dim=256, probe_classes=10, photos=64, workers=2)  # fmt: skip


def train_step_rows(device: torch.device, plan: Plan) -> tuple[list[Row], float]:
    """Reference vs ours at the paper config; returns the rows and the best images/s of ours."""
    variants = [("ours fp32 NCHW", {"precision": "fp32", "channels_last": False})]
    bf16 = capabilities(device).native_bf16()
    if bf16:
        variants.append(("ours bf16 channels_last", {"precision": "bf16", "channels_last": True}))
    args = argparse.Namespace(warmup=1, iters=2, min_time=plan.min_time)
    timed = steps.time_config("paper 128px", ModelConfig(), plan.batch, variants, device, args)
    rows = [("train step", variant, ips, "img/s", f"{ratio:.2f}x reference, median {med:.1f}")
            for _, variant, ips, med, ratio, _ in timed]  # fmt: skip
    if not bf16:
        rows.append(("train step", "ours bf16 channels_last", math.nan, "img/s",
                     "skipped: bf16 is emulated here"))  # fmt: skip
    best = max(r[2] for r in rows if r[1].startswith("ours") and math.isfinite(r[2]))
    return rows, best


def ray_train_rows(device: torch.device, plan: Plan, cifar: Path, tmp: Path) -> list[Row]:
    """The project's TorchTrainer, 1 worker, `use_gpu` on a GPU: images/s between its two
    checkpoints (the report's `time`), and the whole fit's wall time (Ray start excluded)."""
    import os

    import ray

    from pipeline.ray_train import build_trainer
    from pipeline.runtime import start_local_ray

    gpu = device.type == "cuda"
    cpus = min(8, os.cpu_count() or 1) if gpu else 1
    every = plan.ray_every
    cfg = load_config(steps.PAPER_YAML, [
        f"data.train_shards={cifar / 'cifar10-train-000000.tar'}",
        f"data.val_shards={cifar / 'cifar10-test-000000.tar'}",
        "data.resize=0", f"data.batch_size={plan.batch}", f"data.num_workers={cpus - 1}",
        "data.shuffle_buffer=256", f"train.max_steps={2 * every}",
        f"train.checkpoint_every={every}", f"train.log_every={every}",
        f"train.sample_every={10 * every}", "train.eval_batches=1", "run.num_workers=1",
        f"run.use_gpu={str(gpu).lower()}", f"run.cpus_per_worker={cpus}",
        f"run.output_root={tmp / 'ray'}", "run.num_to_keep=2",
    ])  # fmt: skip
    start_local_ray(cpus, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        result = build_trainer(cfg, run_name="gpu-check").fit()
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    times = sorted(m["time"] for _, m in result.best_checkpoints)
    rate = every * plan.batch / (times[-1] - times[0])
    backend = "NCCL" if gpu else "gloo"
    return [
        ("ray train", f"1 worker, use_gpu={gpu} ({backend})", rate, "img/s",
         f"steps {every}..{2 * every}, between checkpoints"),
        ("ray train", "fit wall time", wall, "s", f"{2 * every} steps, worker start included"),
    ]  # fmt: skip


def extraction_rows(device: torch.device, plan: Plan, cifar: Path) -> list[Row]:
    """Every layer of a paper-config encoder, pooled, on `device`; the batches are decoded
    first, so the rate is the device's (the loader's own is the input path's row)."""
    from evaluation.features import check_layers, extract, random_init_encoder
    from pipeline.config import Config
    from pipeline.data import build_loader
    from pipeline.passes import take_batches

    encoder = random_init_encoder(Config(model=ModelConfig()))
    data = DataConfig(image_size=128, batch_size=min(256, plan.extract_images), num_workers=0)
    loader = build_loader(data, MaskConfig(), urls=str(cifar / "cifar10-test-000000.tar"),
                          train=False)  # fmt: skip
    batches = list(take_batches(loader, n_images=plan.extract_images))
    layers = check_layers(encoder, None)
    extract(encoder.module, layers, batches[:1], 4096, device)  # warm-up (cuDNN autotune)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    feats = extract(encoder.module, layers, batches, 4096, device)
    sync()
    n = len(feats[layers[0]].keys)
    rate = n / (time.perf_counter() - t0)
    return [("features", f"extract {len(layers)} layers, 128 px", rate, "img/s",
             f"{n} images, pooled to <= 4096 values per layer")]  # fmt: skip


def probe_rows(device: torch.device, plan: Plan, tmp: Path) -> list[Row]:
    """One head of the streaming probe, one epoch over synthetic class-structured features."""
    from evaluation.streaming_probe import StreamingSettings

    train, test = tmp / "probe-train.parquet", tmp / "probe-test.parquet"
    rows, dim, k = plan.probe_rows, plan.probe_dim, plan.probe_classes
    group = min(65536, rows)
    write_synthetic(train, rows, dim, k, group, seed=1)
    write_synthetic(test, max(rows // 10, 1024), dim, k, min(group, 8192), seed=2)
    s = StreamingSettings(epochs=1, device=device.type)
    r = fit_one_head(train, test, s, c=1.0, max_steps=None)
    return [
        ("streaming probe", f"train 1 head, {rows} x {dim}", rows / r["train_s"], "rows/s",
         f"1 epoch, batch {s.batch_size}"),
        ("streaming probe", "test top-1", r["top1"], "fraction",
         f"{k} classes (chance {1 / k:.3f})"),
    ]  # fmt: skip


def input_rows(plan: Plan, cifar: Path, tmp: Path, step_rate: float) -> list[Row]:
    """The default loader at the paper transform, with 0 and `plan.workers` decode workers,
    against what the fastest training step consumes."""
    urls = photo_shards(str(cifar / "cifar10-train-000000.tar"), tmp / "photos", plan.photos)
    data = DataConfig(image_size=128, resize=350, batch_size=min(64, plan.photos))
    mask = MaskConfig(kind="center")
    rows, best = [], 0.0
    for w in (0, plan.workers):
        rate = default_rate(urls, data, mask, w)[0]
        best = max(best, rate)
        rows.append(("input path", f"webdataset, {w} decode workers", rate, "img/s",
                     f"{plan.photos} 500x375 JPEGs -> 128 px"))  # fmt: skip
    rows.append(("input path", "best input / best step", best / step_rate, "x",
                 f"step takes {step_rate:.1f} img/s; < 1: decoding starves it"))  # fmt: skip
    return rows


def print_table(device: torch.device, rows: list[Row], seconds: float) -> None:
    print(f"machine: {describe(device)}")
    print(f"gpu check on {device}, {seconds:.0f} s")
    print("| section | measurement | value | unit | note |")
    print("| --- | --- | ---: | --- | --- |")
    for section, what, value, unit, note in rows:
        shown = (
            "-" if not math.isfinite(value) else f"{value:,.4g}" if value < 10 else f"{value:,.0f}"
        )
        print(f"| {section} | {what} | {shown} | {unit} | {note} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (its CI run)")
    p.add_argument("--quick", action="store_true", help="small sizes: a minute or two on a CPU")
    p.add_argument("--cifar-dir", default=str(REPO.parent / "shared" / "datasets" / "cifar10"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --quick for the CI run)")
    cifar = Path(args.cifar_dir)
    if not (cifar / "cifar10-train-000000.tar").is_file():
        p.error(f"CIFAR-10 shards not found in {cifar} (--cifar-dir)")
    plan = QUICK if args.quick else FULL
    if device.type == "cpu":
        plan = replace(plan, workers=min(plan.workers, 2))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        rows, step_rate = train_step_rows(device, plan)
        rows += ray_train_rows(device, plan, cifar, tmp)
        rows += extraction_rows(device, plan, cifar)
        rows += probe_rows(device, plan, tmp)
        rows += input_rows(plan, cifar, tmp, step_rate)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(device, rows, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
