"""The three region shapes of Context Encoders (METHOD.md), one mask per sample.

A mask is a (S, S) bool array, True = dropped (filled with the mean colour, to be predicted).
Random masks take a numpy Generator, seeded per sample by the caller from (seed, epoch, key).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from pipeline.config import MaskConfig, scaled_overlap


def _center_bounds(size: int, overlap: int) -> tuple[int, int]:
    lo, hi = size // 4 + overlap, size - size // 4 - overlap
    if hi <= lo:
        raise ValueError(f"overlap {overlap} leaves nothing to drop at image size {size}")
    return lo, hi


def center_mask(size: int, overlap: int) -> np.ndarray:
    """The centre half-size square minus a visible ring of `overlap` px: at 128 px the 64x64
    target with overlap 4 drops the inner 56x56; at 32 px (overlap 1) the inner 14x14."""
    lo, hi = _center_bounds(size, overlap)
    m = np.zeros((size, size), dtype=bool)
    m[lo:hi, lo:hi] = True
    return m


def _cover_bounds(size: int, min_cover: float, max_cover: float) -> tuple[int, int]:
    """Dropped-pixel counts allowed, as whole pixels."""
    area = size * size
    lo, hi = math.ceil(min_cover * area), math.floor(max_cover * area)
    if hi < lo:
        raise ValueError(f"no pixel count within cover [{min_cover}, {max_cover}] at size {size}")
    return lo, hi


def _one_block(size: int, pixels: int, rng: np.random.Generator) -> np.ndarray:
    """A single rectangle of about `pixels` px (the fallback that always fits the bounds)."""
    h = min(size, max(1, round(math.sqrt(pixels))))
    w = min(size, max(1, round(pixels / h)))
    y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    m = np.zeros((size, size), dtype=bool)
    m[y : y + h, x : x + w] = True
    return m


def random_block_mask(
    rng: np.random.Generator, size: int, min_cover: float, max_cover: float, max_blocks: int
) -> np.ndarray:
    """1..max_blocks overlapping rectangles (aspect 1:2..2:1) added until the cover reaches a
    target drawn in [min_cover, max_cover]; a draw that overshoots max_cover is redrawn."""
    lo, hi = _cover_bounds(size, min_cover, max_cover)
    for _ in range(50):
        target = rng.integers(lo, hi + 1)
        n = int(rng.integers(1, max_blocks + 1))
        m = np.zeros((size, size), dtype=bool)
        for _ in range(n):
            # Each block a bit over its share: overlaps eat part of it.
            px = target / n * rng.uniform(0.8, 1.5)
            aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
            h = min(size, max(1, round(math.sqrt(px * aspect))))
            w = min(size, max(1, round(px / h)))
            y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            m[y : y + h, x : x + w] = True
            if m.sum() >= target:
                break
        if lo <= m.sum() <= hi:
            return m
    return _one_block(size, (lo + hi) // 2, rng)  # after 50 misses (rare): always fits


@functools.lru_cache(maxsize=64)
def _smoothing_matrix(cells: int, size: int) -> np.ndarray:
    """(size, cells) Gaussian interpolation weights: `W @ grid @ W.T` upsamples a cells x
    cells noise grid to a smooth size x size field with two tiny matmuls (PIL's bicubic resize
    of a float image costs ~10x more at 128 px)."""
    centers = (np.arange(cells) + 0.5) / cells
    xs = (np.arange(size) + 0.5) / size
    w = np.exp(-0.5 * ((xs[:, None] - centers[None, :]) * cells / 0.6) ** 2)  # sigma 0.6 cell
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    w = _smoothing_matrix(cells, size)
    return w @ rng.standard_normal((cells, cells), dtype=np.float32) @ w.T


def _top_k(field: np.ndarray, k: int, lo: int, hi: int) -> np.ndarray:
    """About the k largest pixels: the threshold comes from a strided subsample (cheap, and the
    field is smooth), accepted when the cover lands in [lo, hi]; otherwise exactly k."""
    step = max(1, field.shape[0] // 32)
    sub = field[::step, ::step].ravel()
    j = min(sub.size - 1, max(0, round(sub.size * (1 - k / field.size))))
    m = field >= np.partition(sub, j)[j]
    if lo <= np.count_nonzero(m) <= hi:
        return m
    flat = field.ravel()
    exact = np.zeros(flat.size, dtype=bool)
    exact[np.argpartition(flat, flat.size - k)[flat.size - k :]] = True
    return exact.reshape(field.shape)


def random_region_mask(
    rng: np.random.Generator, size: int, min_cover: float, max_cover: float
) -> np.ndarray:
    """Free-form blobs: smooth noise (two octaves of Gaussian noise, smoothly interpolated)
    thresholded so that a share drawn in [min_cover, max_cover] of the pixels drop. A
    procedural stand-in for the paper's pasted PASCAL segmentation shapes."""
    lo, hi = _cover_bounds(size, min_cover, max_cover)
    cells = int(rng.integers(3, 7))
    field = _smooth_noise(rng, size, cells) + 0.35 * _smooth_noise(rng, size, 2 * cells)
    return _top_k(field, int(rng.integers(lo, hi + 1)), lo, hi)


def batch_masks(cfg: MaskConfig, size: int, seeds: list[int]) -> np.ndarray:
    """(B, 1, S, S) float32 masks, 1 = dropped, one per sample seed."""
    if cfg.kind == "center":
        m = center_mask(size, scaled_overlap(cfg, size)).astype(np.float32)
        return np.broadcast_to(m, (len(seeds), 1, size, size)).copy()
    out = np.empty((len(seeds), 1, size, size), dtype=np.float32)
    for i, s in enumerate(seeds):
        rng = np.random.default_rng(s)
        if cfg.kind == "random_block":
            out[i, 0] = random_block_mask(rng, size, cfg.min_cover, cfg.max_cover, cfg.max_blocks)
        elif cfg.kind == "random_region":
            out[i, 0] = random_region_mask(rng, size, cfg.min_cover, cfg.max_cover)
        else:
            raise ValueError(f"unknown mask.kind {cfg.kind!r}")
    return out


def fill_value(fill_rgb: tuple[int, ...]) -> np.ndarray:
    """The fill colour in [-1, 1] as (1, 3, 1, 1) float32."""
    return (np.asarray(fill_rgb, dtype=np.float32) / 127.5 - 1.0).reshape(1, 3, 1, 1)


def fill_masked(images: np.ndarray, masks: np.ndarray, cfg: MaskConfig) -> np.ndarray:
    """Images (B, 3, S, S) in [-1, 1] with the dropped pixels set to the fill colour."""
    fill = fill_value(cfg.fill_rgb)
    if cfg.kind == "center":  # a slice assignment is ~4x cheaper than a masked select
        lo, hi = _center_bounds(images.shape[-1], scaled_overlap(cfg, images.shape[-1]))
        out = images.copy()
        out[:, :, lo:hi, lo:hi] = fill
        return out
    return np.where(masks > 0, fill, images)
