"""Stream throughput: the full pipeline (tar read + decode + crop/flip + mask + batch) against a
bare loop that only decodes and resizes the same bytes with PIL, both on one core in one run.

    python benchmarks/bench_stream.py [--cifar-dir ../shared/datasets/cifar10] [--repeats 3]

Cases: CIFAR-10 JPEG shards at 32 px (no resize), and real photographs (256-px crops of
scikit-learn's bundled sample images, and the same crops upscaled 2x to 512 px) written as
JPEG shards in a temp dir, output 128 px. Targets: >= 90 % of the bare loop at 32 px; faster
than the bare loop at 128 px thanks to JPEG draft decoding. Best of `--repeats` runs each (the
machine may be shared).
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from machine import describe
from pipeline.config import DataConfig, MaskConfig
from pipeline.data import build_loader

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    return f"{describe()} | Pillow {Image.__version__} | Python {sys.version.split()[0]}"


def image_bytes(urls: list[str]) -> list[bytes]:
    out = []
    for url in urls:
        with tarfile.open(url) as tf:
            out += [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")]
    return out


def bare_rate(blobs: list[bytes], size: int) -> float:
    """Images/s of decode + resize (shorter side to `size`) with PIL, nothing else."""
    t = time.perf_counter()
    for b in blobs:
        img = Image.open(io.BytesIO(b)).convert("RGB")
        w, h = img.size
        s = size / min(w, h)
        img.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR)
    return len(blobs) / (time.perf_counter() - t)


def pipeline_rate(urls: str, size: int, workers: int = 0, kind: str = "center") -> float:
    """Images/s of the whole loader for one epoch (train transform, masks, batches)."""
    data = DataConfig(image_size=size, batch_size=64, num_workers=workers)
    loader = build_loader(data, MaskConfig(kind=kind), urls=urls, train=True)
    t, n = time.perf_counter(), 0
    for b in loader:
        n += len(b["key"])
    return n / (time.perf_counter() - t)


def photo_shards(folder: Path, n: int, side: int) -> str:
    """n JPEG crops (256 px, upscaled to `side`) of the bundled photos as shards of 100."""
    from sklearn.datasets import load_sample_images

    photos, rng = load_sample_images().images, np.random.default_rng(0)
    with wds.ShardWriter(str(folder / f"photo{side}-%06d.tar"), maxcount=100, verbose=0) as w:
        for i in range(n):
            img = photos[i % len(photos)]
            y, x = rng.integers(0, img.shape[0] - 256), rng.integers(0, img.shape[1] - 256)
            crop = Image.fromarray(img[y : y + 256, x : x + 256])
            if side != 256:
                crop = crop.resize((side, side), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=90)
            w.write({"__key__": f"p{i:05d}", "jpg": buf.getvalue(), "cls": b"0"})
    shards = sorted(folder.glob(f"photo{side}-*.tar"))
    return str(folder / f"photo{side}-{{000000..{len(shards) - 1:06d}}}.tar")


def best_pair(bare, pipe, repeats: int) -> tuple[float, float]:
    """Best rate of each, runs alternated so both sides see the same background load."""
    runs = [(bare(), pipe()) for _ in range(repeats)]
    return max(r[0] for r in runs), max(r[1] for r in runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cifar-dir", default=str(REPO.parent / "shared/datasets/cifar10"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--photos", type=int, default=600, help="photo crops per case")
    args = p.parse_args()
    torch.set_num_threads(1)  # one core for both sides of every comparison
    rows = []
    cifar = f"{args.cifar_dir}/cifar10-test-000000.tar"
    if Path(cifar).is_file():
        blobs = image_bytes([cifar])
        for kind in ("center", "random_region"):
            bare, pipe = best_pair(
                lambda: bare_rate(blobs, 32),
                lambda k=kind: pipeline_rate(cifar, 32, kind=k),
                args.repeats,
            )
            rows.append((f"CIFAR-10 32px -> 32, mask {kind}", bare, pipe, ">= 0.90"))
    with tempfile.TemporaryDirectory() as tmp:
        for side in (256, 512):
            pattern = photo_shards(Path(tmp), args.photos, side)
            blobs = image_bytes(sorted(str(u) for u in Path(tmp).glob(f"photo{side}-*.tar")))
            bare, pipe = best_pair(
                lambda b=blobs: bare_rate(b, 128),
                lambda u=pattern: pipeline_rate(u, 128),
                args.repeats,
            )
            label = "photos 256px -> 128" if side == 256 else "photos 512px (2x up) -> 128"
            rows.append((f"{label}, mask center", bare, pipe, "> 1.00"))
    print(f"machine: {machine()}")
    print(f"one process, num_workers=0, batch 64; images/s per core, best of {args.repeats}")
    print("| case | bare PIL decode+resize | pipeline | ratio | target |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, bare, pipe, target in rows:
        print(f"| {name} | {bare:,.0f} | {pipe:,.0f} | {pipe / bare:.2f} | {target} |")


if __name__ == "__main__":
    main()
