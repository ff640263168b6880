"""The loader: `build_loader` and the two streams behind it turn WebDataset shards into masked
batches for one epoch of one rank (pixels and masks are pipeline.data.samples' business; this
module decides which raw samples go into which batch, in which process). No Ray, no MLflow
here: the same loader runs in a plain process and inside Ray Train workers (rank and world size
are arguments, never read from the environment).

Epoch mode (exactly once, equal steps): pipeline.data.plan lays the epoch's samples out and
cuts this rank's share into batches; batch j goes to loader worker j % num_workers, which the
DataLoader's round-robin returns in order. A worker reads only the shards its batches touch and
reads (never decodes) the members of samples that are not its own.

Bad samples (undecodable image, no image, bad label, samples lost to a truncated or corrupt
tar) shrink their batch instead of shifting later ones, and are counted in `batch["skipped"]`.
A batch that loses every sample is refilled with repeats of the worker's last good samples,
valid=False, so step counts stay equal.

Resampled mode: each loader worker draws shards with replacement (WebDataset's
ResampledShards, seeded by seed, epoch, rank, worker and start_batch), streams their samples
through WebDataset's shuffle buffer, and the rank yields exactly `data.steps_per_epoch` full
batches. A resumed epoch gets a fresh draw, not the same samples (they were random draws
anyway).
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import utils as wds_utils

from pipeline.config import DataConfig, MaskConfig
from pipeline.data.counts import shard_bytes, shard_sample_counts
from pipeline.data.open import open_url
from pipeline.data.plan import epoch_shard_order, plan_rank_batches, worker_batches
from pipeline.data.samples import Raw, SampleSpec, collate, decode_many
from pipeline.data.tar import TarReadError, iter_tar_samples
from pipeline.data.urls import expand_urls
from pipeline.retry import RetryPolicy

__all__ = ["Loader", "build_loader"]

log = logging.getLogger(__name__)


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _read_retry(data: DataConfig) -> RetryPolicy:
    return RetryPolicy(retries=data.read_retries, backoff_s=data.retry_backoff_s)


def _my_batches(n_batches: int, start_batch: int) -> list[int]:
    return worker_batches(n_batches, start_batch, *_worker_slot())


def _shard_samples(
    url: str, data: DataConfig, wanted: Callable[[int], bool]
) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """iter_tar_samples over one shard, with the run's retries and member size bound."""
    with open_url(url, _read_retry(data)) as f:
        yield from iter_tar_samples(
            f, wanted, shard=url, max_member=data.max_member_bytes, size=shard_bytes(url)
        )


def _broken(url: str, e: OSError) -> str:
    """A shard's failure as one log line (a TarReadError names the shard, byte and problem)."""
    return str(e) if isinstance(e, TarReadError) else f"shard {url}: {e}"


# ---- epoch mode ------------------------------------------------------------------------------


class _EpochStream(IterableDataset):
    """This rank's planned batches; each loader worker yields batches j = wid, wid + nw, ..."""

    def __init__(
        self,
        spec: SampleSpec,
        urls: list[str],
        counts: list[int],
        batches: list[np.ndarray],
        start_batch: int,
    ):
        super().__init__()
        self.spec, self.urls, self.counts = spec, urls, counts
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.batches, self.start_batch = batches, start_batch

    def _read(self, needed: np.ndarray) -> Iterator[tuple[int, Raw]]:
        """(global index, raw sample) for the needed indices (sorted), shard by shard; a shard
        that fails to open or breaks midway loses its remaining samples (counted by caller)."""
        shard_of = np.searchsorted(self.offsets, needed, side="right") - 1
        for s in np.unique(shard_of):
            local = set((needed[shard_of == s] - self.offsets[s]).tolist())
            url, base = self.urls[s], int(self.offsets[s])
            samples = _shard_samples(url, self.spec.data, local.__contains__)
            try:
                for i, key, sample in samples:
                    yield base + i, (key, url, sample)
                    local.discard(i)
                    if not local:
                        break
            except OSError as e:  # TarReadError included: counted by the caller as lost
                log.warning("%s; %d of its samples lost", _broken(url, e), len(local))
            finally:
                samples.close()

    def _padding(self, indices: np.ndarray) -> list[Raw]:
        out = []
        for g in indices.tolist():
            out += [raw for _, raw in self._read(np.array([g]))]
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        mine = _my_batches(len(self.batches), self.start_batch)
        planned = [self.batches[j] for j in mine]
        needed = np.sort(np.concatenate([b[b >= 0] for b in planned] + [np.empty(0, int)]))
        reader, pool, top, last_good = self._read(needed), {}, -1, []
        for b in planned:
            real = b[b >= 0]
            last = int(real.max()) if len(real) else -1
            if top < last:  # read on until this batch's samples are in the pool (or lost)
                for g, raw in reader:
                    pool[g] = raw
                    if g >= last:
                        top = g
                        break
                else:
                    top = math.inf
            raws = [pool.pop(g) for g in real.tolist() if g in pool]
            lost = len(real) - len(raws)
            good, skipped = decode_many(self.spec, raws)
            valid = [True] * len(good)
            if len(real) < len(b):  # planned padding
                pads, _ = decode_many(self.spec, self._padding(-1 - b[b < 0]))
                good, valid = good + pads, valid + [False] * len(pads)
            if not good:
                if not last_good:
                    raise RuntimeError(f"no decodable sample in a batch from shards {self.urls}")
                good, valid = last_good, [False] * len(last_good)
            last_good = [g for g, v in zip(good, valid, strict=True) if v][:2] or last_good
            yield collate(self.spec, good, valid, skipped + lost)


# ---- resampled mode --------------------------------------------------------------------------


class _ResampledStream(IterableDataset):
    """Endless shard draws with replacement; this worker's share of `steps` full batches.

    The draws and the sample shuffle are WebDataset's own (`ResampledShards`, `shuffle`), seeded
    from arguments, never from the environment: WebDataset's default worker seed reads rank and
    worker from torch.distributed / the DataLoader, and its seed mixing hashes its arguments, so
    only ints go in (str hashes are salted per process). The bytes still come from our tar
    reader: WebDataset's `tarfile_to_samples` opens URLs through its own handler table (no s3
    without registering one), and on a truncated tar it either raises or, with a warning
    handler, drops the shard without a count; here a shard's losses are logged and a stream of
    nothing but failures is noticed."""

    def __init__(self, spec: SampleSpec, urls: list[str], steps: int, rank: int, start_batch: int):
        super().__init__()
        self.spec, self.urls, self.steps = spec, urls, steps
        self.rank, self.start_batch = rank, start_batch

    def _seed(self, wid: int, stage: int) -> int:
        s = self.spec
        return wds_utils.make_seed(s.seed, s.epoch, self.rank, wid, self.start_batch, stage)

    def _raw_stream(self, wid: int) -> Iterator[Raw]:
        shards = wds.ResampledShards(
            self.urls, worker_seed=lambda: self._seed(wid, 11), deterministic=True
        )
        for item in shards:
            url, n = item["url"], 0
            try:
                for _, key, sample in _shard_samples(url, self.spec.data, lambda _: True):
                    n += 1
                    yield key, url, sample
            except OSError as e:  # TarReadError included
                log.warning("%s", _broken(url, e))
            if n == 0:
                yield "", url, {}  # lets the caller notice a stream of nothing but failures

    def _shuffled(self, wid: int) -> Iterator[Raw]:
        size = max(1, self.spec.data.shuffle_buffer)
        rng = random.Random(self._seed(wid, 12))
        # initial = bufsize: nothing leaves before the buffer is full (the mixing the size buys)
        return wds.shuffle(size, initial=size, rng=rng)(self._raw_stream(wid))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, _ = _worker_slot()
        bsz = self.spec.data.batch_size
        stream, misses = self._shuffled(wid), 0
        for _ in _my_batches(self.steps, self.start_batch):
            good, skipped = [], 0
            while len(good) < bsz:
                raw = next(stream)
                got, bad = decode_many(self.spec, [raw]) if raw[2] else ([], 0)
                good, skipped = good + got, skipped + bad
                misses = 0 if got else misses + 1
                if misses > 10 * len(self.urls) + 100:
                    raise RuntimeError(f"no decodable samples in shards {self.urls}")
            yield collate(self.spec, good, [True] * len(good), skipped)


# ---- the loader ------------------------------------------------------------------------------


def _worker_init(_: int) -> None:
    # One decode thread per worker: the workers are the parallelism.
    torch.set_num_threads(1)


def _mp_context() -> mp.context.BaseContext:
    """forkserver, not fork (safe inside Ray actors and threaded parents); the server preloads
    pipeline.data (this module and its imports) so each worker starts without re-importing
    torch."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.data"])
    return ctx


class Loader:
    """Iterable of batch dicts for one epoch of one rank; `len()` is the step count, and
    `skipped` the running count of bad samples seen so far in this epoch."""

    def __init__(self, dataset: IterableDataset, steps: int, num_workers: int):
        self.dataset, self.steps, self.num_workers = dataset, steps, num_workers
        self.skipped = 0

    def __len__(self) -> int:
        return self.steps

    def _batches(self) -> Iterator[dict[str, Any]]:
        if self.num_workers == 0:
            return iter(self.dataset)
        return iter(
            DataLoader(
                self.dataset,
                batch_size=None,  # workers build whole batches
                num_workers=self.num_workers,
                multiprocessing_context=_mp_context(),
                worker_init_fn=_worker_init,
            )
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n = 0
        for batch in self._batches():
            self.skipped += batch["skipped"]
            n += 1
            yield batch
        if n != self.steps:  # a broken plan would hang DDP later; fail here instead
            raise RuntimeError(f"loader produced {n} batches, planned {self.steps}")


def build_loader(
    data: DataConfig,
    mask: MaskConfig,
    *,
    urls: str,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    start_batch: int = 0,
) -> Loader:
    """Iterable of batch dicts for one epoch of one rank. len(loader) == the number of steps in
    this epoch, identical on every rank (resampled mode: data.steps_per_epoch). start_batch skips
    the first batches (to resume mid-epoch) without decoding them where possible.
    data.num_workers DataLoader processes (multiprocessing context 'forkserver').
    train=False: eval transform (resize + centre crop, no flip), shards in the given order, no
    window shuffle; the set of samples is the same as in training.

    Batch dict (CPU tensors): image (B,3,S,S) float32 in [-1,1]; input (image with dropped
    pixels set to fill_rgb/255*2-1); mask (B,1,S,S) float32, 1 = dropped; label (B,) int64 when
    every sample has `cls`; key list[str]; valid (B,) bool, False for padding repeats;
    skipped: int, bad samples since the worker's previous batch. See the module docstring."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    shard_urls = expand_urls(urls)
    spec = SampleSpec(data=data, mask=mask, train=train, epoch=epoch, seed=seed)
    if data.resampled:
        steps = data.steps_per_epoch
        if steps <= 0:
            raise ValueError("data.steps_per_epoch must be > 0 when data.resampled is true")
        dataset: IterableDataset = _ResampledStream(spec, shard_urls, steps, rank, start_batch)
    else:
        counts = shard_sample_counts(shard_urls, _read_retry(data), data.max_member_bytes)
        order = epoch_shard_order(len(shard_urls), shuffle=train, seed=seed, epoch=epoch)
        shard_urls, counts = [shard_urls[i] for i in order], [counts[i] for i in order]
        batches = plan_rank_batches(
            counts,
            rank=rank,
            world_size=world_size,
            batch_size=data.batch_size,
            shuffle_buffer=data.shuffle_buffer,
            shuffle=train,
            seed=seed,
            epoch=epoch,
        )
        steps = len(batches)
        dataset = _EpochStream(spec, shard_urls, counts, batches, start_batch)
    if not 0 <= start_batch <= steps:
        raise ValueError(f"start_batch {start_batch} is not in [0, {steps}]")
    return Loader(dataset, steps - start_batch, data.num_workers)
