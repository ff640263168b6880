"""Inpainting quality over the dropped region, as the paper's Table 1, and a sample grid.

Images arrive in [-1, 1] and are mapped to [0, 1] first, so the numbers are comparable to the
paper's percentages. Over the pixels where mask == 1 (all three channels):
- mean L1 = sum |pred - truth| / (3 * dropped pixels), pooled over the whole split;
- mean L2 = sum (pred - truth)^2 / (3 * dropped pixels), pooled the same way;
- PSNR = mean over images of 10 * log10(1 / MSE_i), MSE_i that image's mean L2 over its own
  dropped pixels (peak value 1). Images with no dropped pixels are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from pipeline.sample_grid import inpainting_grid

# A perfect prediction has MSE 0 and infinite PSNR; cap it so means stay finite.
_MIN_MSE = 1e-10


@dataclass
class InpaintTotals:
    """Running sums, so the split streams batch by batch and never sits in memory."""

    abs_sum: float = 0.0
    sq_sum: float = 0.0
    count: float = 0.0  # dropped pixel-channels
    psnr_sum: float = 0.0
    images: int = 0

    def add(self, pred: Tensor, truth: Tensor, mask: Tensor) -> None:
        """pred, truth (B,3,S,S) in [-1,1]; mask (B,1,S,S), 1 = dropped."""
        p, t = (pred.double() + 1) / 2, (truth.double() + 1) / 2
        m = mask.double().expand_as(p)
        diff = (p - t) * m
        per_count = m.flatten(1).sum(1)
        per_sq = diff.pow(2).flatten(1).sum(1)
        self.abs_sum += float(diff.abs().sum())
        self.sq_sum += float(per_sq.sum())
        self.count += float(per_count.sum())
        has = per_count > 0
        mse = (per_sq[has] / per_count[has]).clamp_min(_MIN_MSE)
        self.psnr_sum += float((10 * torch.log10(1 / mse)).sum())
        self.images += int(has.sum())

    def metrics(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("inpainting metrics: no dropped pixels in the evaluated split")
        return {
            "inpaint_l1": self.abs_sum / self.count,
            "inpaint_l2": self.sq_sum / self.count,
            "inpaint_psnr": self.psnr_sum / self.images,
        }


def inpainting_metrics(pred: Tensor, truth: Tensor, mask: Tensor) -> dict[str, float]:
    """Mean L1, mean L2 and PSNR over the dropped region of one batch (see module doc)."""
    totals = InpaintTotals()
    totals.add(pred, truth, mask)
    return totals.metrics()


def evaluate_inpainting(
    batches: Iterable[dict],
    predict: Callable[[dict], Tensor],
    *,
    grid_rows: int = 8,
    grid_scale: int = 1,
) -> tuple[dict[str, float], dict[str, float], Image.Image]:
    """Stream held-out batches through `predict` (batch -> (B,3,S,S) in [-1,1]).

    Returns (model metrics, mean-fill baseline metrics (the masked input itself scored the same
    way), a sample grid masked input | prediction | truth of the first `grid_rows` samples).
    Padding rows (batch["valid"] False) are dropped.
    """
    model, fill = InpaintTotals(), InpaintTotals()
    shown: list[tuple[Tensor, Tensor, Tensor]] = []
    with torch.no_grad():
        for batch in batches:
            keep = batch["valid"].bool() if "valid" in batch else slice(None)
            pred = predict(batch)[keep]
            truth, inp, mask = batch["image"][keep], batch["input"][keep], batch["mask"][keep]
            model.add(pred, truth, mask)
            fill.add(inp, truth, mask)
            if sum(len(t[0]) for t in shown) < grid_rows:
                shown.append((inp, pred, truth))
    if not shown:
        raise ValueError("inpainting evaluation saw no batches")
    masked, pred, truth = (torch.cat([t[i] for t in shown]) for i in range(3))
    grid = inpainting_grid(masked, pred, truth, max_rows=grid_rows, scale=grid_scale)
    return model.metrics(), fill.metrics(), grid
