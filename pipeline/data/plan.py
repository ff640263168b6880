"""The exact-epoch batch plan: which samples each rank's batches hold, and which loader worker
builds each batch. Pure numpy on per-shard counts; no I/O.

Epoch mode (exactly once, equal steps). The epoch's shard order is shuffled with (seed, epoch),
the same on every rank, which lays all N samples (counts from `shard_sample_counts`) on one
index line. Rank r owns the contiguous range [r*N//W, (r+1)*N//W) and runs
S = ceil(ceil(N/W) / B) steps. Its range is cut into S batches whose sizes differ by at most
one (so the per-rank remainder is spread over all steps: no batch of 1 at the end, which
BatchNorm on a 1x1 bottleneck cannot train on, and every batch is <= B). Only when a rank owns
fewer than S samples (N < W, or B = 1) does a batch start empty; it is padded with repeats of
real samples marked valid=False. Before batching, each window of ~shuffle_buffer samples is
permuted (seed, epoch, rank, window), so batches mix samples from across the window.
Batch j goes to loader worker j % num_workers, which the DataLoader's round-robin returns in
order; a worker reads only the shards its batches touch and reads (never decodes) the members
of samples that are not its own. A batch's composition therefore depends on neither the number
of loader workers nor `start_batch`, which makes resuming exact.
"""

from __future__ import annotations

import math

import numpy as np


def epoch_shard_order(n_shards: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shard order, the same on every rank: shuffled with (seed, epoch) in
    training, the given order otherwise."""
    if not shuffle:
        return np.arange(n_shards)
    return np.random.default_rng([seed, epoch, 3]).permutation(n_shards)


def worker_batches(n_batches: int, start_batch: int, worker: int, num_workers: int) -> list[int]:
    """The batches loader worker `worker` of `num_workers` builds, from start_batch on: j with
    (j - start_batch) % num_workers == worker, the order DataLoader's round-robin returns."""
    return [j for j in range(start_batch, n_batches) if (j - start_batch) % num_workers == worker]


def _balanced_sizes(n: int, steps: int) -> np.ndarray:
    return np.full(steps, n // steps) + (np.arange(steps) < n % steps)


def plan_rank_batches(
    counts: list[int],
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    shuffle_buffer: int,
    shuffle: bool,
    seed: int,
    epoch: int,
) -> list[np.ndarray]:
    """Global sample indices of each of this rank's S batches (same S on every rank). Indices
    refer to the epoch's shard order; a padded batch holds -1 - i for a repeat of index i."""
    n_total = sum(counts)
    if n_total == 0:
        raise ValueError("the shards hold no samples")
    steps = math.ceil(math.ceil(n_total / world_size) / batch_size)
    lo, hi = rank * n_total // world_size, (rank + 1) * n_total // world_size
    idx = np.arange(lo, hi)
    sizes = _balanced_sizes(hi - lo, steps)
    per_window = max(1, math.ceil(shuffle_buffer / batch_size))
    batches, pos = [], 0
    for w0 in range(0, steps, per_window):
        wsizes = sizes[w0 : w0 + per_window]
        window = idx[pos : pos + wsizes.sum()]
        pos += wsizes.sum()
        if shuffle:
            window = np.random.default_rng([seed, epoch, rank, w0, 7]).permutation(window)
        batches += np.split(window, np.cumsum(wsizes)[:-1])
    # Empty batches (only when the rank has < S samples) repeat real samples, marked invalid.
    source = idx if len(idx) else np.arange(n_total)
    pad = min(batch_size, len(source))
    for j, b in enumerate(batches):
        if len(b) == 0:
            batches[j] = -1 - source[(j * pad + np.arange(pad)) % len(source)]
    return batches
