"""Masks: the region shapes of Context Encoders (docs/method.md), one mask per sample, and the
registry `MASKS` that says, for each `mask.kind`, how to draw it and what it implies. Adding a
mask kind is one entry there: config validation, the loader's seed policy and the search
space's implied model.full_image_output (pipeline/search/space.py) all read it.

A mask is a (S, S) bool array, True = dropped (filled with the mean colour, to be predicted).
Random masks are a function of a per-sample seed that the caller derives from (seed, epoch,
key): random blocks draw from a numpy Generator per sample, random regions (vectorised over
the batch) from a counter-based hash of the seed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

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


# splitmix64 constants: a counter-based generator, so a batch draws all its masks' random numbers
# in a few array operations while each mask stays a function of its own sample seed only.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def hashed_uniforms(seeds: list[int], n: int, salt: int) -> np.ndarray:
    """(B, n) float32 uniforms in (0, 1), 24 bits each: draw i of sample b is
    splitmix64(seeds[b] + (salt + i + 1) * gamma), so row b depends on seeds[b] alone (not on
    the batch it lands in)."""
    s = np.asarray(seeds, dtype=np.uint64).reshape(-1, 1)
    x = s + (np.arange(n, dtype=np.uint64) + np.uint64(salt + 1)) * _GAMMA  # wraps mod 2**64
    x ^= x >> np.uint64(30)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return ((x >> np.uint64(40)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)


def _normals(u: np.ndarray) -> np.ndarray:
    """Box-Muller: (B, 2m) float32 uniforms -> (B, 2m) float32 standard normals."""
    u1, u2 = u[:, 0::2], u[:, 1::2]
    r, a = np.sqrt(np.float32(-2.0) * np.log(u1)), np.float32(2.0 * np.pi) * u2
    return np.concatenate([r * np.cos(a), r * np.sin(a)], axis=1)


def _region_fields(cells: np.ndarray, grids: np.ndarray, size: int) -> np.ndarray:
    """(B, S, S) smooth fields: a cells x cells octave plus 0.35 x a 2*cells octave, both
    upsampled with `W @ grid @ W.T`, batched over the samples that share a cell count.
    grids (B, 180): the first 36 fill a 6 x 6 grid, the next 144 a 12 x 12 one; a sample
    with c cells uses their top-left c x c and 2c x 2c corners."""
    fine_all = grids[:, 36:].reshape(-1, 12, 12)
    coarse_all = grids[:, :36].reshape(-1, 6, 6)
    field = np.empty((len(cells), size, size), dtype=np.float32)
    for c in np.unique(cells).tolist():
        rows = np.flatnonzero(cells == c)
        w1, w2 = _smoothing_matrix(c, size), _smoothing_matrix(2 * c, size)
        coarse = w1 @ coarse_all[rows, :c, :c] @ w1.T
        fine = w2 @ fine_all[rows, : 2 * c, : 2 * c] @ w2.T
        field[rows] = coarse + np.float32(0.35) * fine
    return field


def _top_k(field: np.ndarray, k: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """(B, S, S) bool, about the k[b] largest pixels of each field: thresholds come from a
    strided subsample (cheap, and the fields are smooth), accepted where the cover lands in
    [lo, hi]; the other rows get exactly k[b] from a full sort."""
    b, size = len(field), field.shape[-1]
    step = max(2, size // 32)
    sub = np.sort(field[:, ::step, ::step].reshape(b, -1), axis=1)
    n = sub.shape[1]
    j = np.clip(np.rint(n * (1 - k / size**2)).astype(np.int64), 0, n - 1)
    masks = field >= sub[np.arange(b), j][:, None, None]
    cover = np.count_nonzero(masks.reshape(b, -1), axis=1)
    bad = np.flatnonzero((cover < lo) | (cover > hi))
    if len(bad):
        flat = np.sort(field[bad].reshape(len(bad), -1), axis=1)
        thr = flat[np.arange(len(bad)), size * size - k[bad]]
        masks[bad] = field[bad] >= thr[:, None, None]
    return masks


def random_region_masks(
    seeds: list[int], size: int, min_cover: float, max_cover: float
) -> np.ndarray:
    """(B, S, S) bool free-form blobs, one per sample seed: smooth noise (two octaves of
    Gaussian noise, smoothly interpolated) thresholded so that a share drawn in [min_cover,
    max_cover] of the pixels drop. A procedural stand-in for the paper's pasted PASCAL
    segmentation shapes. All draws come from `hashed_uniforms`: vectorised over the batch,
    ~10x cheaper than a numpy Generator per sample at 32 px."""
    lo, hi = _cover_bounds(size, min_cover, max_cover)
    u = hashed_uniforms(seeds, 2 + 180, salt=0x5E6)
    cells = 3 + np.minimum((u[:, 0] * 4).astype(np.int64), 3)
    k = lo + np.minimum((u[:, 1] * (hi - lo + 1)).astype(np.int64), hi - lo)
    return _top_k(_region_fields(cells, _normals(u[:, 2:]), size), k, lo, hi)


@functools.lru_cache(maxsize=16)
def _center_mask_f32(size: int, overlap: int) -> np.ndarray:
    m = center_mask(size, overlap).astype(np.float32)
    m.flags.writeable = False  # shared by every batch
    return m


def _center_batch(cfg: MaskConfig, size: int, seeds: list[int]) -> np.ndarray:
    m = _center_mask_f32(size, scaled_overlap(cfg, size))
    return np.broadcast_to(m, (len(seeds), 1, size, size)).copy()


def _region_batch(cfg: MaskConfig, size: int, seeds: list[int]) -> np.ndarray:
    masks = random_region_masks(seeds, size, cfg.min_cover, cfg.max_cover)
    return masks[:, None].astype(np.float32)


def _block_batch(cfg: MaskConfig, size: int, seeds: list[int]) -> np.ndarray:
    out = np.empty((len(seeds), 1, size, size), dtype=np.float32)
    for i, s in enumerate(seeds):
        rng = np.random.default_rng(s)
        out[i, 0] = random_block_mask(rng, size, cfg.min_cover, cfg.max_cover, cfg.max_blocks)
    return out


def _center_fill(images: np.ndarray, fill: np.ndarray, cfg: MaskConfig) -> np.ndarray:
    # A slice assignment is ~4x cheaper than a masked select.
    lo, hi = _center_bounds(images.shape[-1], scaled_overlap(cfg, images.shape[-1]))
    out = images.copy()
    out[:, :, lo:hi, lo:hi] = fill
    return out


@dataclass(frozen=True)
class MaskSpec:
    """One mask kind. generate(cfg, size, seeds) -> (B, 1, S, S) float32, 1 = dropped, each
    mask a function of its sample's seed alone. seeded: the masks draw from the per-sample seed
    (so evaluation samples get a sample_seed too, not only training ones). full_image_output:
    the dropped pixels are not the centre square, so the generator must predict the whole
    image (model.full_image_output=true). fill(images, fill, cfg): a faster fill than the
    generic masked select, or None."""

    generate: Callable[[MaskConfig, int, list[int]], np.ndarray]
    seeded: bool
    full_image_output: bool
    fill: Callable[[np.ndarray, np.ndarray, MaskConfig], np.ndarray] | None = None


MASKS: dict[str, MaskSpec] = {
    "center": MaskSpec(_center_batch, seeded=False, full_image_output=False, fill=_center_fill),
    "random_block": MaskSpec(_block_batch, seeded=True, full_image_output=True),
    "random_region": MaskSpec(_region_batch, seeded=True, full_image_output=True),
}


def mask_spec(kind: str) -> MaskSpec:
    """The registry entry of a mask kind; ValueError for an unknown one."""
    spec = MASKS.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise ValueError(f"unknown mask.kind {kind!r}")
    return spec


def needs_full_image_output(kind: object) -> bool:
    """Whether this mask kind needs model.full_image_output=true (False for an unknown kind,
    which validation reports on its own)."""
    spec = MASKS.get(kind) if isinstance(kind, str) else None
    return spec is not None and spec.full_image_output


def batch_masks(cfg: MaskConfig, size: int, seeds: list[int]) -> np.ndarray:
    """(B, 1, S, S) float32 masks, 1 = dropped, one per sample seed (a function of the seed
    alone; the centre mask ignores it)."""
    return mask_spec(cfg.kind).generate(cfg, size, seeds)


def fill_value(fill_rgb: tuple[int, ...]) -> np.ndarray:
    """The fill colour in [-1, 1] as (1, 3, 1, 1) float32."""
    return (np.asarray(fill_rgb, dtype=np.float32) / 127.5 - 1.0).reshape(1, 3, 1, 1)


def fill_masked(images: np.ndarray, masks: np.ndarray, cfg: MaskConfig) -> np.ndarray:
    """Images (B, 3, S, S) in [-1, 1] with the dropped pixels set to the fill colour."""
    fill = fill_value(cfg.fill_rgb)
    spec = MASKS.get(cfg.kind)
    if spec is not None and spec.fill is not None:
        return spec.fill(images, fill, cfg)
    return np.where(masks > 0, fill, images)
