"""95 % intervals for test accuracies and for the gap between two encoders.

* One accuracy (k correct of n test images): the Wilson score interval. Unlike the normal
  approximation it stays inside [0, 1] and keeps close to its nominal coverage at accuracies
  near 0 or 1 and at small n (Brown, Cai & DasGupta 2001).
* A mean over seeds, or the gap between two encoders' means, when every encoder was scored on
  the SAME test images: a bootstrap over test images (paired: one resample of image indices
  serves both sides, so what the two encoders share - easy and hard images - cancels), nested
  with a resample of the seeds on each side when there are several, so the interval holds seed
  variation too (a two-level bootstrap). With one seed per side it is the plain paired bootstrap.
  Percentile interval; the resample count and seed are arguments, so it repeats exactly.
* Two accuracies on different images (no per-image results, e.g. an ingested fine-tune score):
  Newcombe's hybrid score interval for a difference of independent proportions (method 10 of
  Newcombe 1998), built from the two Wilson intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (fractions in [0, 1])."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_diff(k_a: int, n_a: int, k_b: int, n_b: int, z: float = Z95) -> tuple[float, float]:
    """Interval for p_a - p_b of two independent samples (Newcombe's hybrid score method)."""
    pa, pb = k_a / n_a, k_b / n_b
    la, ua = wilson(k_a, n_a, z)
    lb, ub = wilson(k_b, n_b, z)
    d = pa - pb
    low = d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2)
    high = d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)
    return low, high


@dataclass(frozen=True)
class Estimate:
    """A mean (or a gap of means) over seeds, with its bootstrap interval and the spread of the
    per-seed values (sd with ddof 1; 0 for one seed)."""

    value: float
    low: float
    high: float
    sd_a: float
    sd_b: float = 0.0
    n_seeds_a: int = 1
    n_seeds_b: int = 0


def _as_matrix(correct: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(correct, dtype=np.float64)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"{name}: expected (seeds, images) correctness, got shape {m.shape}")
    return m


def _sd(per_seed: np.ndarray) -> float:
    return float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0


def bootstrap_replicates(
    a: np.ndarray,
    b: np.ndarray | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    block: int = 250,
) -> np.ndarray:
    """(n_boot,) bootstrap replicates of mean_seeds(acc(a)) - mean_seeds(acc(b)).

    `a`, `b`: (seeds, images) 0/1 correctness on the same test images, in the same image order
    (b None: replicates of a's own mean). Each replicate draws image weights (a multinomial
    resample of the images, shared by both sides) and, on a side with several seeds, a resample
    of its seeds."""
    ma = _as_matrix(a, "a")
    mb = _as_matrix(b, "b") if b is not None else None
    n = ma.shape[1]
    if mb is not None and mb.shape[1] != n:
        raise ValueError(f"a and b must score the same images: {n} vs {mb.shape[1]}")
    rng = np.random.default_rng(seed)
    reps = []
    for start in range(0, n_boot, block):
        m = min(block, n_boot - start)
        w = _image_weights(rng, n, m)
        reps.append(_side(ma, w, rng) - (_side(mb, w, rng) if mb is not None else 0.0))
    return np.concatenate(reps)


def bootstrap_gap(
    a: np.ndarray,
    b: np.ndarray | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    conf: float = 0.95,
) -> Estimate:
    """mean_seeds(acc(a)) - mean_seeds(acc(b)) with a percentile interval of
    `bootstrap_replicates`; b None: a's own mean and its interval."""
    dist = bootstrap_replicates(a, b, n_boot=n_boot, seed=seed)
    acc_a = _as_matrix(a, "a").mean(axis=1)
    acc_b = _as_matrix(b, "b").mean(axis=1) if b is not None else np.zeros(0)
    alpha = (1 - conf) / 2
    low, high = np.quantile(dist, [alpha, 1 - alpha])
    return Estimate(
        value=float(acc_a.mean() - (acc_b.mean() if len(acc_b) else 0.0)),
        low=float(low),
        high=float(high),
        sd_a=_sd(acc_a),
        sd_b=_sd(acc_b),
        n_seeds_a=len(acc_a),
        n_seeds_b=len(acc_b),
    )


def _image_weights(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """(n, m): column j counts how often each image was drawn in resample j, over n.
    (A bincount of drawn indices: rng.multinomial over n categories is ~100x slower.)"""
    idx = rng.integers(0, n, size=(m, n)) + (np.arange(m) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=m * n).reshape(m, n).T / n


def _side(m: np.ndarray, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per replicate: the mean over (resampled) seeds of the image-weighted accuracy."""
    per_seed = m @ w  # (seeds, reps)
    s = len(m)
    if s == 1:
        return per_seed[0]
    pick = rng.integers(0, s, size=(s, w.shape[1]))  # seeds drawn with replacement
    return np.take_along_axis(per_seed, pick, axis=0).mean(axis=0)
