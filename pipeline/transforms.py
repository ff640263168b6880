"""Image decoding and the train / eval crops, as functions of the sample's bytes and a seed.

Every random choice for a sample (crop offset, flip, mask) comes from `sample_seed(seed, epoch,
key)`, so it does not depend on which rank or loader worker decoded the sample, an evaluation
pass sees the same thing each time, and a resumed run sees the same data.
"""

from __future__ import annotations

import hashlib
import io
import math
from typing import Any

import numpy as np
from PIL import Image, JpegImagePlugin

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
