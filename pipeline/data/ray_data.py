"""The Ray Data input path (`data.input: ray_data`): shards are read and decoded by Ray Data
tasks on any CPU node of the cluster, and each rank takes its share of the epoch through
`ray.train.get_dataset_shard("train")`. The default path (pipeline.data.loader) decodes inside
each rank, so one GPU's input rate is capped by the cores beside it; this one is not.

    build_dataset       shard URLs -> read (our tar reader) -> decode/crop/flip/mask, as one
                        lazy Ray Dataset, built once by the driver (pipeline.ray_train)
    epoch_batches       one rank's epoch from its DataIterator: len() steps, every rank equal
    steps_per_epoch     floor(floor(N / world) / batch): the step count of every rank

Why not `ray.data.read_webdataset`: it reads through pyarrow filesystems (no `pipe:`, no brace
patterns, no fsspec-only schemes), a truncated or corrupt tar fails the whole dataset (it uses
`tarfile` in stream mode, which raises), and its sample grouping is not the one the sample
counts come from. Reading with pipeline.data.tar gives the default path's URLs, keys, counts
and losses; Ray Data still schedules the reads and decodes wherever there are CPUs.

Same samples, same pixels: each sample's crop, flip and mask come from
`sample_seed(seed, epoch, key)` through pipeline.data.samples and masks, exactly as in the
default path, so a given (seed, epoch, key) gives bit-identical tensors on both. The epoch a
decode task works for is the dataset's pass number (Ray Data's execution index, which Ray's own
per-epoch file shuffles use) plus `first_epoch`. A run restarted from a checkpoint in epoch
E > 0 builds a fresh dataset whose first pass draws with epoch `first_epoch`'s seeds: its
random crops repeat an earlier epoch's draws (a warning says so); nothing else changes.

What differs from the default path: which rank sees which sample is decided by Ray Data's
streaming split at run time (balanced, not reproducible), the per-rank shuffle is a local
buffer, the epoch drops its last < world * batch samples (no padded steps), and resuming
mid-epoch starts a fresh pass and hands out its remaining steps. Wire format: tasks ship uint8
pixels and masks (a quarter of float32's bytes); each rank turns them into the float batch.

Ray is imported inside functions: pipeline.data imports no Ray at module import.
"""

from __future__ import annotations

import logging
import pickle
import sys
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.config import DataConfig, MaskConfig
from pipeline.data.counts import shard_bytes, shard_sample_counts
from pipeline.data.masks import batch_masks, fill_masked
from pipeline.data.open import open_url
from pipeline.data.samples import SampleSpec, decode_many, flip_rows, stack_images
from pipeline.data.tar import MAX_MEMBER_BYTES, TarReadError, iter_tar_samples
from pipeline.data.urls import expand_urls

if TYPE_CHECKING:
    import ray.data

__all__ = ["RayDataEpoch", "build_dataset", "epoch_batches", "steps_per_epoch"]

log = logging.getLogger(__name__)

READ_CHUNK = 64  # raw samples per block out of the reader: small blocks keep decode tasks short


# ---- inside Ray Data tasks ----------------------------------------------------------------


def read_shards(
    batch: dict[str, np.ndarray], max_member: int = MAX_MEMBER_BYTES
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: the raw samples of the shards in batch["url"], READ_CHUNK at a time
    (pickled {ext: bytes}, since member sets differ between samples). A shard that fails to
    open or breaks midway (a bad header: TarReadError) loses its remaining samples (logged;
    the rank pads the steps)."""
    for url in batch["url"].tolist():
        rows: list[tuple[str, dict[str, bytes]]] = []
        try:
            with open_url(url) as f:
                size = shard_bytes(url)
                samples = iter_tar_samples(
                    f, lambda _: True, shard=url, max_member=max_member, size=size
                )
                for _, key, sample in samples:
                    rows.append((key, sample))
                    if len(rows) == READ_CHUNK:
                        yield _raw_block(url, rows)
                        rows = []
        except (TarReadError, OSError) as e:
            log.warning("shard %s: %s; the samples after the break are lost", url, e)
        if rows:
            yield _raw_block(url, rows)


def _raw_block(url: str, rows: list[tuple[str, dict[str, bytes]]]) -> dict[str, np.ndarray]:
    return {
        "key": np.array([k for k, _ in rows], dtype=object),
        "url": np.array([url] * len(rows), dtype=object),
        "sample": np.array([pickle.dumps(s, protocol=5) for _, s in rows], dtype=object),
    }


def _pass_index() -> int:
    """How many passes over this dataset finished before the one running this task. Ray Data
    counts them per dataset (DataContext._execution_idx, private but what its own seeded file
    shuffles read); 0 if a later Ray drops it, which makes every pass draw like the first, and
    0 outside Ray Data (a plain call: nothing has imported ray.data, and nothing should)."""
    if "ray.data" not in sys.modules:
        return 0
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0))


def decode_rows(
    batch: dict[str, np.ndarray], *, data: DataConfig, mask: MaskConfig, seed: int, first_epoch: int
) -> dict[str, np.ndarray]:
    """Ray Data UDF: raw samples -> the wire form of the batch contract (uint8 pixels, flipped;
    uint8 masks; labels, -1 = none). A bad sample's row becomes a repeat of a good one with
    valid=False and skipped=1, so the row count, and with it every rank's step count, holds."""
    epoch = first_epoch + _pass_index()
    spec = SampleSpec(data=data, mask=mask, train=True, epoch=epoch, seed=seed)
    raws = [
        (k, u, pickle.loads(b))
        for k, u, b in zip(batch["key"], batch["url"], batch["sample"], strict=True)
    ]
    good, skipped = decode_many(spec, raws)
    if not good:
        return _wire(spec, [], [])
    repeats = [good[i % len(good)] for i in range(skipped)]
    return _wire(spec, good + repeats, [True] * len(good) + [False] * len(repeats))


def _wire(spec: SampleSpec, rows: list, valid: list[bool]) -> dict[str, np.ndarray]:
    size, n = spec.data.image_size, len(rows)
    if n == 0:
        empty = np.empty((0, 3, size, size), np.uint8)
        return {"key": np.empty(0, object), "pixels": empty, "mask": empty[:, :1],
                "label": np.empty(0, np.int64), "valid": np.empty(0, bool),
                "skipped": np.empty(0, np.int64), "epoch": np.empty(0, np.int64)}  # fmt: skip
    keys, crops, flips, labels, seeds = (list(col) for col in zip(*rows, strict=True))
    pixels = np.ascontiguousarray(stack_images(crops, size).transpose(0, 3, 1, 2))
    flip_rows(pixels, flips)  # flipping uint8 before scaling gives the same floats as after
    masks = batch_masks(spec.mask, size, seeds)
    mask8 = masks.astype(np.uint8)
    if not np.array_equal(mask8, masks):
        raise ValueError(f"mask.kind={spec.mask.kind} gives non-binary masks; ray_data ships 0/1")
    return {
        "key": np.array(keys, dtype=object),
        "pixels": pixels,
        "mask": mask8,
        "label": np.array([-1 if lb is None else lb for lb in labels], dtype=np.int64),
        "valid": np.array(valid, dtype=bool),
        "skipped": np.array([0 if v else 1 for v in valid], dtype=np.int64),
        "epoch": np.full(n, spec.epoch, dtype=np.int64),
    }


# ---- the driver side ----------------------------------------------------------------------


def build_dataset(
    data: DataConfig, mask: MaskConfig, *, urls: str, seed: int, first_epoch: int = 0
) -> ray.data.Dataset:
    """The lazy training Dataset (needs a connected Ray). One block per shard URL, their order
    reshuffled every pass (seeded), read and decoded by tasks on any node with free CPUs."""
    import ray.data

    try:  # a new shard order every pass, reproducible from the seed
        from ray.data import RandomSeedConfig

        order_seed: Any = RandomSeedConfig(seed, reseed_after_execution=True)
    except ImportError:  # an older Ray: the same seeded order every pass
        order_seed = seed
    shard_urls = expand_urls(urls)
    ds = ray.data.from_items([{"url": u} for u in shard_urls], override_num_blocks=len(shard_urls))
    ds = ds.randomize_block_order(seed=order_seed)
    ds = ds.map_batches(read_shards, batch_size=1, fn_kwargs={"max_member": data.max_member_bytes})
    kwargs = {"data": data, "mask": mask, "seed": seed, "first_epoch": first_epoch}
    return ds.map_batches(decode_rows, batch_size=READ_CHUNK, fn_kwargs=kwargs)


# ---- one rank's epoch ---------------------------------------------------------------------


def steps_per_epoch(n_samples: int, world_size: int, batch_size: int) -> int:
    """Steps of every rank: the streaming split (equal=True) gives each rank floor(N / world)
    rows, and full batches only (drop_last) are taken."""
    return (n_samples // world_size) // batch_size


def to_batch(wire: dict[str, np.ndarray], mask: MaskConfig) -> dict[str, Any]:
    """The wire form -> the batch contract of build_loader (CPU tensors), plus "epoch": the
    epoch the crops were drawn for. Same float arithmetic as samples.collate."""
    image = wire["pixels"].astype(np.float32)
    image *= np.float32(1 / 127.5)
    image -= np.float32(1.0)
    masks = wire["mask"].astype(np.float32)
    batch = {
        "image": torch.from_numpy(image),
        "input": torch.from_numpy(fill_masked(image, masks, mask)),
        "mask": torch.from_numpy(masks),
        "key": [str(k) for k in wire["key"]],
        "valid": torch.from_numpy(wire["valid"].astype(bool)),
        "skipped": int(wire["skipped"].sum()),
        "epoch": int(wire["epoch"].min()),
    }
    if (wire["label"] >= 0).all():
        batch["label"] = torch.from_numpy(wire["label"].astype(np.int64))
    return batch


class RayDataEpoch:
    """One rank's epoch: exactly `steps - start_batch` batch dicts; `len()` says so. The pass
    is read to its end before the last batch is handed out, so Ray Data counts it finished (the
    next pass then draws the next epoch's crops). Samples lost to broken shards shrink every
    rank's share alike (equal split); the missing steps repeat the last batch, valid=False."""

    def __init__(self, shard: Any, data: DataConfig, mask: MaskConfig, *, steps: int,
                 epoch: int, seed: int, rank: int, start_batch: int = 0):  # fmt: skip
        if not 0 <= start_batch <= steps:
            raise ValueError(f"start_batch {start_batch} is not in [0, {steps}]")
        self.shard, self.data, self.mask = shard, data, mask
        self.steps, self.epoch, self.start_batch = steps, epoch, start_batch
        seeds = np.random.SeedSequence([seed, epoch, rank, 13])
        self.shuffle_seed = int(seeds.generate_state(1)[0])
        self.skipped, self._warned = 0, False

    def __len__(self) -> int:
        return self.steps - self.start_batch

    def _source(self) -> Iterator[dict[str, Any]]:
        return iter(
            self.shard.iter_torch_batches(
                batch_size=self.data.batch_size,
                drop_last=True,
                collate_fn=partial(to_batch, mask=self.mask),
                device="cpu",  # the contract: CPU tensors; the trainer moves them
                local_shuffle_buffer_size=self.data.shuffle_buffer or None,
                local_shuffle_seed=self.shuffle_seed,
            )
        )

    def _checked(self, batch: dict[str, Any]) -> dict[str, Any]:
        drawn = batch.pop("epoch")
        if drawn != self.epoch and not self._warned:
            self._warned = True
            log.warning("ray_data: epoch %d's crops drawn with epoch %d's seeds (the dataset "
                        "was rebuilt after a restart)", self.epoch, drawn)  # fmt: skip
        self.skipped += batch["skipped"]
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        source, n, last = self._source(), 0, None
        for batch in source:
            n += 1
            if n <= self.start_batch:
                continue
            last = self._checked(batch)
            if n == self.steps:
                extra = sum(1 for _ in source)  # finish the pass before the caller stops
                if extra:
                    log.warning("ray_data: %d batches beyond the planned %d", extra, self.steps)
                yield last
                return
            yield last
        if last is None:
            raise RuntimeError(f"ray_data: the pass yielded {n} of {self.steps} batches")
        log.warning("ray_data: %d of %d batches lost to broken shards; padding with repeats",
                    self.steps - n, self.steps)  # fmt: skip
        for _ in range(self.steps - max(n, self.start_batch)):
            yield {**last, "valid": torch.zeros_like(last["valid"]), "skipped": 0}


def epoch_batches(
    shard: Any,
    data: DataConfig,
    mask: MaskConfig,
    *,
    urls: str,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int,
    start_batch: int = 0,
) -> RayDataEpoch:
    """This rank's epoch from `shard` (ray.train.get_dataset_shard("train"), a DataIterator
    over a dataset from build_dataset): the same batch contract and the same step count on
    every rank. The sample count comes from the same place as the default path's
    (pipeline.data.counts: manifest, else a header scan)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    n = sum(shard_sample_counts(expand_urls(urls), max_member=data.max_member_bytes))
    steps = steps_per_epoch(n, world_size, data.batch_size)
    if steps <= 0:
        raise ValueError(
            f"data.input=ray_data: {n} samples give no full batch of data.batch_size="
            f"{data.batch_size} on each of {world_size} ranks"
        )
    return RayDataEpoch(shard, data, mask, steps=steps, epoch=epoch, seed=seed, rank=rank,
                        start_batch=start_batch)  # fmt: skip
