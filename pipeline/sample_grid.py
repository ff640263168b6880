"""Inpainting sample grids: one row per image, columns masked input | prediction | truth."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def inpainting_grid(
    masked: torch.Tensor,
    predicted: torch.Tensor,
    truth: torch.Tensor,
    max_rows: int = 8,
    pad: int = 2,
    scale: int = 1,
) -> Image.Image:
    """A PNG-ready grid of the first `max_rows` samples; all inputs (B, 3, H, W) in [-1, 1].

    `scale` enlarges small images (CIFAR's 32 px) with nearest-neighbour so pixels stay honest.
    """
    cols = [to_uint8(t[:max_rows]) for t in (masked, predicted, truth)]
    n, h, w, _ = cols[0].shape
    grid = np.full((n * (h + pad) + pad, 3 * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r in range(n):
        for c, col in enumerate(cols):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y : y + h, x : x + w] = col[r]
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img
