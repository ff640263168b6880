"""The fine-tuned network and its recipe's pure parts: the classifier, the pad-and-crop
augmentation, the optimiser with its parameter groups, and the learning-rate schedule.
No Ray, no MLflow, no I/O.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.finetune.settings import FinetuneOptim
from pipeline.model import build_generator


class Classifier(nn.Module):
    """Every encoder stage (conv1 .. bottleneck), then a linear head on the flattened last map:
    (B, 3, S, S) in [-1, 1] -> logits (B, num_classes). All of it trains."""

    def __init__(self, encoder: nn.ModuleDict, feature_dim: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, num_classes)
        nn.init.normal_(self.head.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.encoder.values():
            x = stage(x)
        return self.head(x.flatten(1))


def feature_dim(encoder: nn.ModuleDict, image_size: int) -> int:
    """Values of the last encoder map for one image (the head's input size)."""
    x = torch.zeros(2, 3, image_size, image_size)  # 2: BatchNorm in train mode needs a batch
    with torch.no_grad():
        for stage in encoder.values():
            x = stage(x)
    return x[0].numel()


def build_classifier(
    model: ModelConfig, encoder_state: dict[str, Tensor], num_classes: int
) -> Classifier:
    """The architecture `model` with `encoder_state` (a Generator's `encoder.*` weights, or
    those of its encoder-only MLflow Model) loaded strictly, plus a fresh head."""
    encoder = build_generator(model).encoder.eval()  # eval: the probe pass leaves BN stats be
    encoder.load_state_dict(encoder_state, strict=True)
    dim = feature_dim(encoder, model.image_size)
    return Classifier(encoder.train().requires_grad_(True), dim, num_classes)


def pad_and_crop(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Each image padded by `pad` px (zeros: mid grey in [-1, 1]) and cropped back to its size
    at a random offset, drawn from `generator`: (B, C, S, S) -> (B, C, S, S)."""
    if pad == 0:
        return x
    b, _, s, _ = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)
    return torch.stack(
        [padded[i, :, dy : dy + s, dx : dx + s] for i, (dy, dx) in enumerate(offsets.tolist())]
    )


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up from peak / warmup_steps to `peak`, then a half cosine to 0 at the last
    step (nanoGPT's get_lr without the floor)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


def build_optimizer(model: nn.Module, optim: FinetuneOptim) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov off) or AdamW; weight decay on weights of rank >= 2 only
    (conv kernels, the head's matrix, the channel-wise FC), never on BN scales or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.momentum, 0.999))
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
