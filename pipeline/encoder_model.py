"""The frozen-feature encoder: what `jobs.pretrain` logs as an MLflow Model.

A `FrozenEncoder` is the generator's encoder stages (no decoder), always in eval mode, with the
evaluation's pooling built in:

    forward(x)     (B, 3, S, S) float32 in [-1, 1] -> (B, D) float32: the pooled features of
                   `layers`, concatenated in that order (`layer_slices` says where each sits)
    features(x)    {layer: (B, D_layer)} pooled, as the probe sees them
    encode(x, ls)  {layer: (B, C, h, w)} raw maps: `Generator.encode` itself, not a copy

Preprocessing is the caller's: RGB, resized so the shorter side is the training `data.resize`
(0 = the image size), centre-cropped to S x S, scaled to [-1, 1] (x / 127.5 - 1), channels
first. Pooling: adaptive average pooling of each map to p x p with the largest p such that
C * p * p <= max_dim (the probe's fixed-size pooling).

Shipped as code: MLflow pickles the module by reference to its class, so the model carries
this file, `pipeline/model.py`, `pipeline/config.py` and an empty `pipeline/__init__.py`
(`SHIPPED_MODULES`) and `mlflow.pytorch.load_model` works without this repository. Only torch
and PyYAML (which MLflow itself needs) are imported here and in those modules.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.model import Generator

# The probe's default pooled size per layer (evaluation.run.ProbeRunConfig.max_dim).
FEATURE_MAX_DIM = 4096
# The files of `pipeline/` an MLflow Model of a FrozenEncoder carries (see the docstring).
SHIPPED_MODULES = ("__init__.py", "config.py", "storage.py", "model.py", "encoder_model.py")
PREPROCESSING = (
    "RGB; shorter side resized to `resize` (0 = image_size), centre crop image_size x "
    "image_size; float32 x / 127.5 - 1 in [-1, 1]; shape (B, 3, image_size, image_size)"
)


def pooled_side(channels: int, side: int, max_dim: int) -> int:
    """The largest p <= side with channels * p * p <= max_dim (at least 1)."""
    p = side
    while p > 1 and channels * p * p > max_dim:
        p -= 1
    return p


def pool(t: Tensor, max_dim: int) -> Tensor:
    """(B,C,h,w) -> (B, C*p*p) float32: adaptive average pooling to p x p, as VISSL's
    fixed-size pooling, so every layer's feature has at most max_dim dimensions (unless C alone
    exceeds it)."""
    if t.ndim == 2:
        return t.float()
    p = pooled_side(t.shape[1], min(t.shape[2], t.shape[3]), max_dim)
    return nn.functional.adaptive_avg_pool2d(t.float(), p).flatten(1)


class FrozenEncoder(nn.Module):
    """A trained generator's encoder as a feature extractor; see the module docstring."""

    # The training code's own method (it reads only `encoder` and `feature_layers`), so the
    # features a loaded model gives cannot drift from what evaluation extracted.
    encode = Generator.encode

    def __init__(
        self,
        encoder: nn.ModuleDict,
        image_size: int,
        run_config: dict[str, Any],
        layers: Sequence[str] = (),
        max_dim: int = FEATURE_MAX_DIM,
    ):
        super().__init__()
        self.encoder = encoder
        self.feature_layers: tuple[str, ...] = tuple(encoder.keys())
        self.layers: tuple[str, ...] = tuple(layers) or self.feature_layers
        unknown = [name for name in self.layers if name not in self.feature_layers]
        if unknown:
            raise ValueError(f"unknown encoder layer(s) {unknown}; known: {self.feature_layers}")
        self.image_size = image_size
        self.max_dim = max_dim
        self.run_config = run_config  # pipeline.config.to_dict of the training run: plain data
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenEncoder:
        # Frozen means BatchNorm uses its running statistics, whatever a caller asks for:
        # batch statistics would make a sample's features depend on its batch.
        return super().train(False)

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """{layer: (B, D_layer)} pooled features of `self.layers`."""
        return {name: pool(t, self.max_dim) for name, t in self.encode(x, self.layers).items()}

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, D): `features` concatenated in `self.layers` order."""
        if x.ndim != 4 or x.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"expected input (B, 3, {self.image_size}, {self.image_size}) in [-1, 1], "
                f"got {tuple(x.shape)}"
            )
        feats = self.features(x)
        return torch.cat([feats[name] for name in self.layers], dim=1)

    @torch.no_grad()
    def layer_slices(self) -> dict[str, dict[str, Any]]:
        """{layer: {"map": [C, h, w], "pooled": [C, p, p], "start": i, "stop": j}}: where each
        layer's pooled features sit in `forward`'s output."""
        x = torch.zeros(1, 3, self.image_size, self.image_size)
        maps = self.encode(x, self.layers)
        out, start = {}, 0
        for name in self.layers:
            c, h, w = maps[name].shape[1:]
            p = pooled_side(c, min(h, w), self.max_dim)
            out[name] = {"map": [c, h, w], "pooled": [c, p, p], "start": start,
                         "stop": start + c * p * p}  # fmt: skip
            start += c * p * p
        return out


def freeze_encoder(
    generator: Generator,
    run_config: dict[str, Any],
    layers: Sequence[str] = (),
    max_dim: int = FEATURE_MAX_DIM,
) -> FrozenEncoder:
    """A FrozenEncoder holding a copy of `generator`'s encoder stages (on CPU): the generator
    itself keeps training or inpainting untouched."""
    stages = copy.deepcopy(generator.encoder).cpu().float()
    return FrozenEncoder(stages, generator.cfg.image_size, run_config, layers, max_dim)
