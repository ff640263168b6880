"""Scores: correct / total over a loader's valid rows, and Wilson's score interval for a
binomial proportion (the test top-1's 95 % interval; Wilson 1927, as in Brown, Cai & DasGupta
2001), which unlike the normal approximation stays inside [0, 1] near 0 % and 100 %.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for correct / total, as fractions."""
    if total <= 0:
        raise ValueError("wilson_interval: total must be > 0")
    p = correct / total
    denom = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def count_correct(
    model: nn.Module, batches: Iterable[dict[str, Any]], device: torch.device | None = None
) -> tuple[int, int]:
    """(correct, total) of the argmax over the valid rows (padding repeats excluded), in eval
    mode (BatchNorm's running statistics); the caller restores train mode."""
    model.eval()
    correct = total = 0
    for batch in batches:
        valid = batch["valid"].bool()
        if not valid.any():
            continue
        logits = model(batch["image"][valid].to(device or "cpu"))
        correct += int((logits.argmax(1).cpu() == batch["label"][valid]).sum())
        total += int(valid.sum())
    return correct, total
