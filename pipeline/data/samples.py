"""One raw sample to pixels, and a list of them to a batch: image decoding (JPEG draft mode),
resize, the train / eval crops and flips, per-sample seeds, and the batch dict of the contract
(stacking, [-1, 1] scaling, masks and fill), as functions of the sample's bytes and a seed.

Every random choice for a sample (crop offset, flip, mask) comes from `sample_seed(seed, epoch,
key)`, so it does not depend on which rank or loader worker decoded the sample, an evaluation
pass sees the same thing each time, and a resumed run sees the same data.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, JpegImagePlugin

from pipeline.config import DataConfig, MaskConfig
from pipeline.data.masks import batch_masks, fill_masked, mask_spec

log = logging.getLogger(__name__)

# Tried in order; the first one a sample has is its image.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")


class BadSample(ValueError):
    """A sample that cannot be used (no image member, undecodable image, bad label)."""


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """A 64-bit seed from (seed, epoch, key); blake2b is ~0.5 us and stable across processes
    (Python's hash() is salted per process, so it would differ between loader workers)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def image_member(sample: dict[str, bytes]) -> bytes:
    """The bytes of the sample's image member; BadSample when it has none."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise BadSample(f"no image member (has {sorted(sample)})")


def parse_label(sample: dict[str, bytes]) -> int | None:
    """The `cls` member as an int, None when absent; BadSample when it is not an integer."""
    raw = sample.get("cls")
    if raw is None:
        return None
    try:
        return int(raw)  # int() takes ASCII digits as bytes and strips whitespace
    except ValueError as e:
        raise BadSample(f"cls member {raw[:20]!r} is not an integer") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        img.load()  # decode now, inside the caller's error handling
        return img
    if img.mode == "P":
        # Palettes may carry transparency; going through RGBA avoids PIL's warning.
        img = img.convert("RGBA")
    return img.convert("RGB")


def _open_image(data: bytes) -> Image.Image:
    """Image.open, with a shortcut for JPEG: Image.open's format probing costs ~2.5 us of
    the ~60 us a 32-px CIFAR image takes, so a JPEG signature goes straight to its plugin."""
    if not data.startswith(b"\xff\xd8\xff"):
        return Image.open(io.BytesIO(data))
    img = JpegImagePlugin.JpegImageFile(io.BytesIO(data))
    limit = Image.MAX_IMAGE_PIXELS  # Image.open's decompression bomb limit
    if limit and img.size[0] * img.size[1] > 2 * limit:
        raise Image.DecompressionBombError(f"image size {img.size} exceeds {2 * limit} pixels")
    return img


def decode_resized(data: bytes, short_side: int) -> Image.Image:
    """Decode to RGB with the shorter side resized to `short_side`.

    For JPEGs at least 2x larger than needed, draft mode lets libjpeg decode at 1/2, 1/4 or
    1/8 scale directly (the DCT is truncated), which is much cheaper than a full decode plus a
    big downscale; the final resize then only corrects the remaining < 2x."""
    try:
        img = _open_image(data)
        w, h = img.size
        if img.format == "JPEG" and min(w, h) >= 2 * short_side:
            scale = short_side / min(w, h)
            img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        img = _to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadSample(f"undecodable image: {e}") from e
    w, h = img.size
    if min(w, h) != short_side:
        scale = short_side / min(w, h)
        size = (max(short_side, round(w * scale)), max(short_side, round(h * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR)
    return img


# Crops and the batch canvas use PIL's core image (`img.im`): at 32 px the Python wrappers
# of Image.crop / paste cost more than the pixel work they do.
Core = Any  # PIL's ImagingCore: an RGB image without the Python wrapper


def train_crop(img: Image.Image, size: int, rseed: int, flip: bool) -> tuple[Core, bool]:
    """Random size x size crop, and whether to flip it horizontally (if `flip`, p = 0.5), both
    drawn from bits of `rseed`. The flip is left to the caller, which does it for the whole
    batch in one numpy operation (see flip_rows); a no-op crop is skipped."""
    w, h = img.size
    core = img.im
    if (w, h) != (size, size):
        x = (rseed & 0xFFFF) % (w - size + 1)
        y = ((rseed >> 16) & 0xFFFF) % (h - size + 1)
        core = core.crop((x, y, x + size, y + size))
    return core, flip and bool((rseed >> 32) & 1)


def center_crop(img: Image.Image, size: int) -> Core:
    """The centre size x size crop."""
    w, h = img.size
    if (w, h) == (size, size):
        return img.im
    x, y = (w - size) // 2, (h - size) // 2
    return img.im.crop((x, y, x + size, y + size))


def stack_images(images: list[Core], size: int) -> np.ndarray:
    """(B, size, size, 3) uint8 from size x size RGB core images. Pasting into one tall canvas
    and exporting once is ~2.5x cheaper than np.asarray per image (PIL's per-call export
    overhead)."""
    canvas = Image.new("RGB", (size, size * len(images)))
    paste = canvas.im.paste
    for i, core in enumerate(images):
        paste(core, (0, size * i, size, size * (i + 1)))
    return np.asarray(canvas).reshape(len(images), size, size, 3)


def flip_rows(images: np.ndarray, flips: list[bool]) -> None:
    """Mirror (in place) the last axis of the rows of `images` whose flag is set."""
    rows = np.flatnonzero(flips)
    if len(rows):
        images[rows] = images[rows, ..., ::-1]


# ---- per-sample and per-batch work ------------------------------------------------------------

Raw = tuple[str, str, dict[str, bytes]]  # (key, shard url, {ext: bytes})


@dataclass(frozen=True)
class SampleSpec:
    """What turns raw samples into a batch; small and picklable for loader workers."""

    data: DataConfig
    mask: MaskConfig
    train: bool
    epoch: int
    seed: int

    @property
    def short_side(self) -> int:
        return self.data.resize or self.data.image_size


def decode_sample(spec: SampleSpec, key: str, sample: dict[str, bytes]) -> tuple:
    """(S x S RGB crop as a PIL core image (see Core), label, flip, seed) of one raw
    sample; flip: whether the crop is to be mirrored; seed: sample_seed, or 0 when neither
    the transform nor the mask draws from it. Raises BadSample."""
    label = parse_label(sample)
    img = decode_resized(image_member(sample), spec.short_side)
    size = spec.data.image_size
    seeded = spec.train or mask_spec(spec.mask.kind).seeded
    rseed = sample_seed(spec.seed, spec.epoch, key) if seeded else 0
    if spec.train:
        return (*train_crop(img, size, rseed, spec.data.flip), label, rseed)
    return center_crop(img, size), False, label, rseed


def decode_many(spec: SampleSpec, raws: list[Raw]) -> tuple[list, int]:
    """Decoded (key, pixels, flip, label, seed) of the good samples (see decode_sample), and
    how many were skipped. Samples missing `cls` in a batch where others have it count as bad
    (a label is never invented)."""
    good, skipped = [], 0
    for key, url, sample in raws:
        try:
            good.append((key, *decode_sample(spec, key, sample)))
        except BadSample as e:
            log.warning("skipping sample %s in %s: %s", key, url, e)
            skipped += 1
    labelled = sum(g[3] is not None for g in good)
    if 0 < labelled < len(good):
        keep = [g for g in good if g[3] is not None]
        log.warning("skipping %d samples without a cls label", len(good) - len(keep))
        skipped += len(good) - len(keep)
        good = keep
    return good, skipped


def collate(spec: SampleSpec, good: list, valid: list[bool], skipped: int) -> dict[str, Any]:
    """The batch dict of the contract (see build_loader). Whole-batch numpy work: one export
    of the pasted canvas, one uint8 -> float32 conversion, flips, masks and fill for all
    samples at once."""
    size = spec.data.image_size
    keys, crops, flips, labels, seeds = (list(col) for col in zip(*good, strict=True))
    # numpy, not torch: single-threaded, so N loader workers do not oversubscribe the cores.
    pixels = stack_images(crops, size)  # (B, S, S, 3) uint8
    image = pixels.transpose(0, 3, 1, 2).astype(np.float32, order="C")  # (B, 3, S, S)
    image *= np.float32(1 / 127.5)
    image -= np.float32(1.0)
    flip_rows(image, flips)
    mask = batch_masks(spec.mask, size, seeds)
    batch = {
        "image": torch.from_numpy(image),
        "input": torch.from_numpy(fill_masked(image, mask, spec.mask)),
        "mask": torch.from_numpy(mask),
        "key": keys,
        "valid": torch.from_numpy(np.array(valid, dtype=bool)),
        "skipped": skipped,
    }
    if None not in labels:
        batch["label"] = torch.from_numpy(np.array(labels, dtype=np.int64))
    return batch
