"""Features of one encoder on one split: from the Parquet cache, or one streaming pass.

The pass reads the shards once for all missing layers together (single process), or fans out
over Ray tasks, each one "rank" of the shard list; rows are sorted by key afterwards, so both
give identical arrays. Ray is imported only when asked for.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evaluation import cache
from evaluation.cache import CacheKey, Features
from evaluation.features import Encoder, extract, merge
from pipeline.config import DataConfig, MaskConfig
from pipeline.progress import tracked

log = logging.getLogger(__name__)


def shards_digest(urls: str) -> str:
    """sha256 of the expanded shard URLs, the manifest.json beside them (the shard writer's
    names, counts and byte sizes) and, for local shards, each file's size and mtime: a shard set
    rewritten in place gets a new digest even without a manifest. Remote shards without a
    manifest are known by their URLs alone."""
    from pipeline.data import expand_urls
    from pipeline.data.manifest import MANIFEST
    from pipeline.data.open import is_local, local_path, read_beside

    expanded = expand_urls(urls)
    h = hashlib.sha256("\n".join(expanded).encode())
    for folder in sorted({u.rsplit("/", 1)[0] if "/" in u else "." for u in expanded}):
        h.update(read_beside(f"{folder}/x", MANIFEST) or b"no manifest")
    for url in expanded:
        if is_local(url):
            st = Path(local_path(url)).stat()
            h.update(f"{url}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class SplitSpec:
    """Which images to read and how: the split's shards and the eval transform."""

    name: str  # "train" / "test"
    urls: str  # shard pattern for pipeline.data
    image_size: int
    batch_size: int = 256
    max_dim: int = 4096  # pooled feature size per layer (see features.pool)
    # Shorter side before the centre crop: the encoder's own training `data.resize`, so it sees
    # images at the scale it learned on (0 = image_size: the whole image).
    resize: int = 0

    def split_key(self) -> str:
        # The shard list and what is in the shards are part of the key: other shards under the
        # same split name never hit, nor shards rewritten at the same paths (`shards_digest`).
        return f"{self.name}-{shards_digest(self.urls)[:10]}"

    def transform_key(self) -> str:
        resize = f"-resize{self.resize}" if self.resize not in (0, self.image_size) else ""
        return f"eval{self.image_size}{resize}-pool{self.max_dim}"

    def data_config(self) -> DataConfig:
        return DataConfig(image_size=self.image_size, resize=self.resize,
                          batch_size=self.batch_size, num_workers=0)  # fmt: skip


def _loader(spec: SplitSpec, rank: int, world_size: int):
    from pipeline.data import build_loader

    # train=False: the deterministic eval transform (resize + centre crop), no flips, no shuffle.
    return build_loader(
        spec.data_config(), MaskConfig(), urls=spec.urls, train=False, rank=rank,
        world_size=world_size,
    )  # fmt: skip


def extract_local(encoder: Encoder, layers: Sequence[str], spec: SplitSpec) -> dict[str, Features]:
    """One process, one pass over all of the split's shards."""
    batches = tracked(_loader(spec, 0, 1), desc=f"extract {encoder.name} {spec.name}", unit="batch")
    return extract(encoder.module, layers, batches, spec.max_dim)


def extract_pooled(
    encoder: Encoder, wanted: dict[int, list[str]], spec: SplitSpec
) -> dict[int, dict[str, Features]]:
    """One pass over the split for several poolings: max_dim -> {layer: Features}. The encoder
    runs once per batch; each map is pooled to every size asked of it (the benchmark's `gap`
    and `spatial` protocols share the pass). spec.max_dim is ignored."""
    import numpy as np
    import torch

    from evaluation.features import _finish, extraction_device, pool

    layers = sorted({lay for lays in wanted.values() for lay in lays})
    device = extraction_device()
    module = encoder.module
    home = next(module.parameters(), torch.empty(0)).device
    module.eval().to(device)
    keys: list[str] = []
    labels: list[np.ndarray] = []
    parts = {(d, lay): [] for d, lays in wanted.items() for lay in lays}
    batches = tracked(_loader(spec, 0, 1), desc=f"extract {encoder.name} {spec.name}", unit="batch")
    try:
        with torch.inference_mode():
            for batch in batches:
                n = len(batch["key"])
                valid = batch["valid"].bool() if "valid" in batch else torch.ones(n, dtype=bool)
                if not valid.any():
                    continue
                if "label" not in batch:
                    raise ValueError(f"batch without labels (keys {batch['key'][:3]}...): "
                                     "probing needs a `cls` member in every sample")  # fmt: skip
                out = module.encode(batch["image"][valid].to(device), layers)
                for d, lay in parts:
                    parts[d, lay].append(pool(out[lay], d).cpu().numpy())
                keys.extend(k for k, v in zip(batch["key"], valid.tolist(), strict=True) if v)
                labels.append(batch["label"][valid].numpy().astype(np.int64))
    finally:
        module.to(home)
    if not keys:
        raise ValueError(f"feature extraction saw no valid samples in {spec.urls}")
    out_: dict[int, dict[str, Features]] = {}
    for (d, lay), chunks in parts.items():
        out_.setdefault(d, {})[lay] = _finish(keys, labels, chunks)
    return out_


def _extract_part(module, layers, spec: SplitSpec, rank: int, world_size: int):
    desc = f"extract {spec.name} part {rank + 1}/{world_size}"  # printed by the Ray task
    batches = tracked(_loader(spec, rank, world_size), desc=desc, unit="batch")
    return extract(module, layers, batches, spec.max_dim)


def extract_ray(
    encoder: Encoder, layers: Sequence[str], spec: SplitSpec, num_tasks: int
) -> dict[str, Features]:
    """Fan out over `num_tasks` Ray tasks (at most one per shard), each its part of the shards;
    needs a running Ray (ray.init or RAY_ADDRESS). Result identical to `extract_local`."""
    import ray

    from pipeline.data import expand_urls

    n = max(1, min(num_tasks, len(expand_urls(spec.urls))))
    module_ref = ray.put(encoder.module)
    task = ray.remote(num_cpus=1)(_extract_part)
    parts = ray.get([task.remote(module_ref, list(layers), spec, r, n) for r in range(n)])
    return merge(parts)


def split_features(
    encoder: Encoder,
    layers: Sequence[str],
    spec: SplitSpec,
    cache_dir: str | Path,
    *,
    use_ray: bool = False,
    ray_tasks: int = 2,
) -> dict[str, Features]:
    """Each layer's features on the split: cached files that read back intact are reused; the
    others are extracted together in one pass and written to the cache."""
    keys = {
        layer: CacheKey(encoder.weights, spec.split_key(), spec.transform_key(), layer)
        for layer in layers
    }
    out: dict[str, Features] = {}
    for layer, key in keys.items():
        hit = cache.load(key.path(cache_dir))
        if hit is not None:
            out[layer] = hit
    missing = [layer for layer in layers if layer not in out]
    if missing:
        log.info("extracting %s %s layers %s", encoder.name, spec.name, missing)
        fresh = (
            extract_ray(encoder, missing, spec, ray_tasks)
            if use_ray
            else extract_local(encoder, missing, spec)
        )
        for layer in missing:
            cache.save(fresh[layer], keys[layer].path(cache_dir))
            out[layer] = fresh[layer]
    return out
