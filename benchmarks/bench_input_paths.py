"""Input paths: images/s of the default loader (data.input=webdataset, decode in the rank's own
DataLoader workers) against the Ray Data path (data.input=ray_data, decode in Ray Data tasks),
each with 1 and 2 decode workers, measured in one run, as one rank would consume them.

    python benchmarks/bench_input_paths.py [--cifar-dir ../shared/datasets/cifar10]
        [--photos 1000] [--repeats 2] [--tmp /work/tmp_bench/input_paths]

Cases: CIFAR-10 at 32 px (one train shard, 5,000 JPEGs of 32x32, resize 36 as cifar10.yaml),
and the paper's 128 px from larger JPEGs: CIFAR images upscaled to 500x375 (ImageNet's typical
size), written as shards with pipeline.data.writer under --tmp (deleted after), read with the
paper128.yaml transform (shorter side 350, random 128 crop, centre mask).

Workers: the default path's data.num_workers (DataLoader processes, forkserver); the Ray Data
path's CPU budget (DataContext resource_limits.cpu) on a local Ray of 2 CPUs. The baseline row
is the default path with 0 workers (decode in the consuming process), measured in the same run;
each rate is the best of --repeats full epochs, the Ray Data path after one warm-up pass (Ray's
worker processes start once per cluster, the DataLoader's once per epoch: both are what an
epoch costs). The consumer (this process) also turns each batch into float tensors, as a rank
does. On a 2-core machine both paths share the cores with the consumer: read the ratios.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from machine import describe
from pipeline.config import DataConfig, MaskConfig
from pipeline.data import build_loader
from pipeline.data.ray_data import build_dataset, epoch_batches
from pipeline.data.writer import folder_source, write_shards

REPO = Path(__file__).resolve().parents[1]
PHOTO_SIZE = (500, 375)


def machine() -> str:
    return f"{describe()} | Pillow {Image.__version__} | Python {sys.version.split()[0]}"


def photo_shards(cifar: str, out: Path, n: int) -> str:
    """n CIFAR JPEGs upscaled to 500x375 (bicubic, quality 90) in class folders, then
    shards of 100 written by pipeline.data.writer; returns their brace pattern."""
    tree = out / "tree"
    with tarfile.open(cifar) as tf:
        jpgs = [m for m in tf if m.name.endswith(".jpg")][:n]
        for m in jpgs:
            img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
            folder = tree / "c0"
            folder.mkdir(parents=True, exist_ok=True)
            img.resize(PHOTO_SIZE, Image.Resampling.BICUBIC).save(
                folder / f"{m.name.split('.')[0]}.jpg", quality=90
            )
    manifest = write_shards(folder_source(tree), out / "shards", prefix="up",
                            shard_size=100, seed=0, progress=False)  # fmt: skip
    return manifest["splits"]["all"]["pattern"]


def drain(batches) -> tuple[float, float]:
    """(images/s wall, this process's CPU us per image). The CPU figure does not depend on how
    loaded the machine is: with 0 workers it is the whole per-image cost on one core, with
    workers (either path) the share left to the consuming rank."""
    t, c, n = time.perf_counter(), time.process_time(), 0
    for b in batches:
        n += int(b["valid"].sum())
    return n / (time.perf_counter() - t), (time.process_time() - c) / n * 1e6


def default_rate(
    urls: str, data: DataConfig, mask: MaskConfig, workers: int
) -> tuple[float, float]:
    loader = build_loader(replace(data, num_workers=workers), mask, urls=urls, train=True)
    return drain(loader)


def ray_rate(
    urls: str, data: DataConfig, mask: MaskConfig, workers: int, epochs: int
) -> tuple[float, float]:
    """Best epoch after a warm-up pass, with Ray Data held to `workers` CPUs."""
    import ray.data
    from ray.data import ExecutionResources

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.resource_limits = ExecutionResources(cpu=workers)
    shard = build_dataset(data, mask, urls=urls, seed=0).iterator()
    rates = []
    for epoch in range(epochs + 1):
        rates.append(drain(epoch_batches(shard, data, mask, urls=urls, rank=0, world_size=1,
                                         epoch=epoch, seed=0)))  # fmt: skip
    return max(rates[1:])


def measure(name: str, urls: str, data: DataConfig, repeats: int) -> list[tuple]:
    """Rows (case, path, workers, images/s, consumer CPU us/img, ratio to the 0-worker rate);
    best of `repeats` by images/s."""
    mask = MaskConfig(kind="center")
    rows = []
    for w in (0, 1, 2):
        rate = max(default_rate(urls, data, mask, w) for _ in range(repeats))
        rows.append((name, "webdataset", w, *rate))
    for w in (1, 2):
        rows.append((name, "ray_data", w, *ray_rate(urls, data, mask, w, repeats)))
    return [(*r, r[3] / rows[0][3]) for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cifar-dir", default=str(REPO.parent / "shared/datasets/cifar10"))
    p.add_argument("--photos", type=int, default=1000, help="500x375 JPEGs in the 128-px case")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tmp", default="/work/tmp_bench/input_paths", help="scratch (deleted after)")
    args = p.parse_args()
    torch.set_num_threads(1)
    from pipeline.runtime import start_local_ray

    start_local_ray(2, log_to_driver=False)
    cifar = f"{args.cifar_dir}/cifar10-train-000000.tar"
    tmp = Path(args.tmp)
    if tmp.exists():
        raise SystemExit(f"{tmp} exists; remove it or pass --tmp")
    try:
        photos = photo_shards(cifar, tmp, args.photos)
        rows = measure(
            "CIFAR-10 32 px (resize 36)",
            cifar,
            DataConfig(image_size=32, resize=36, batch_size=64),
            args.repeats,
        )
        rows += measure(
            f"500x375 JPEG -> 128 px (resize 350), {args.photos} imgs",
            photos,
            DataConfig(image_size=128, resize=350, batch_size=64),
            args.repeats,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"machine: {machine()}")
    print(f"one consumer process, batch 64, centre mask; images/s, best of {args.repeats}")
    print("| case | path | decode workers | images/s | vs 0 workers | consumer CPU us/img |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, path, w, rate, cpu, ratio in rows:
        print(f"| {name} | {path} | {w} | {rate:,.0f} | {ratio:.2f}x | {cpu:,.0f} |")


if __name__ == "__main__":
    main()
