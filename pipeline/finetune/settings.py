"""The fine-tune YAML: frozen dataclasses read with the pretrain config's strict loader
(unknown keys and wrong types are errors naming the key). `run` is the pretrain RunConfig
itself: the same output root, tracking store, Ray address and worker settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config import ConfigError, ModelConfig, RunConfig, apply_overrides, from_dict

Optimizer = Literal["sgd", "adamw"]


@dataclass(frozen=True)
class FinetuneData:
    # The labelled pool: the label fraction and the val carve are both drawn from it.
    train_shards: str = ""
    test_shards: str = ""  # read once, after the choice, to score
    image_size: int = 32
    label_fraction: float = 0.1  # of the pool, stratified by class (0.1 of 50,000 = 5,000)
    val_images: int = 5000  # the val carve: stratified, disjoint from the labelled images
    carve_seed: int = 0  # the same seed carves the same images in every run
    batch_size: int = 64  # per rank; the global batch is batch_size x run.num_workers
    pad: int = 4  # random crop of the image padded by this many px (0 = no crop)
    flip: bool = True  # random horizontal flip p = 0.5


@dataclass(frozen=True)
class FinetuneOptim:
    optimizer: Optimizer = "sgd"
    lr: float = 0.05  # peak rate at the configured global batch (not rescaled with it)
    momentum: float = 0.9  # SGD momentum (AdamW: beta1)
    weight_decay: float = 5e-4  # on conv / linear weights only, never on BN or biases
    warmup_epochs: float = 1.0  # linear warm-up from 0, then cosine to 0 at the last step
    epochs: int = 30


@dataclass(frozen=True)
class FinetuneConfig:
    # A checkpoint path, runs:/..., models:/... or `random` (model: at random init, seed below).
    encoder: str = "random"
    seed: int = 0  # random init, head init, shuffling and crops
    data: FinetuneData = field(default_factory=FinetuneData)
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    # The architecture of `encoder: random`; a loaded encoder brings its own.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(image_size=32, bottleneck=512))
    run: RunConfig = field(default_factory=lambda: RunConfig(name="finetune", num_workers=2))


def validate_finetune(cfg: FinetuneConfig) -> FinetuneConfig:
    d, o = cfg.data, cfg.optim
    checks = [
        (bool(d.train_shards), "data.train_shards is required"),
        (bool(d.test_shards), "data.test_shards is required"),
        (0 < d.label_fraction <= 1, "data.label_fraction must be in (0, 1]"),
        (d.val_images > 0, "data.val_images must be > 0"),
        (d.batch_size > 1, "data.batch_size must be > 1 (BatchNorm trains on the batch)"),
        (0 <= d.pad < d.image_size, "data.pad must be in [0, data.image_size)"),
        (cfg.model.image_size == d.image_size, "model.image_size must equal data.image_size"),
        (o.lr > 0 and o.weight_decay >= 0, "optim.lr must be > 0, weight_decay >= 0"),
        (0 <= o.momentum < 1, "optim.momentum must be in [0, 1)"),
        (o.epochs >= 1 and 0 <= o.warmup_epochs < o.epochs, "need epochs >= 1 > warmup"),
        (cfg.run.num_workers >= 1, "run.num_workers must be >= 1"),
    ]
    errors = [msg for ok, msg in checks if not ok]
    if errors:
        raise ConfigError("invalid finetune config: " + "; ".join(errors))
    return cfg


def load_finetune_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> FinetuneConfig:
    """YAML (or the defaults) + `section.key=value` overrides, validated."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from e
    return validate_finetune(from_dict(apply_overrides(d, overrides or []), FinetuneConfig))
