"""The encoder a fine-tune starts from, as `pipeline.finetune.EncoderInit`: loaded through
evaluation.features (a checkpoint path, runs:/..., models:/..., s3://...) or `random`, the same
architecture at its docs/method.md initialisation from a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config, ModelConfig
from pipeline.finetune import EncoderInit

RANDOM = "random"


def split_encoder_arg(text: str) -> tuple[str, str]:
    """`NAME=URI` -> (NAME, URI); a bare URI is named context_encoder (random: random_init)."""
    name, sep, uri = text.partition("=")
    if sep and name and "/" not in name and ":" not in name:
        return name, uri
    return ("random_init" if text == RANDOM else "context_encoder"), text


def encoder_init(
    name: str,
    uri: str,
    *,
    model: ModelConfig,
    seed: int,
    download_dir: str | Path,
    tracking_uri: str | None = None,
) -> EncoderInit:
    """`uri` loaded (or `random`: `model` at random init from `seed`) as fine-tuning's start."""
    from evaluation.features import load_encoder, random_init_encoder

    if uri == RANDOM:
        enc = random_init_encoder(Config(model=model), seed=seed, name=name)
        kind = "random_init"
    else:
        enc = load_encoder(name, uri, download_dir, tracking_uri)
        kind = "context_encoder"
    if enc.config is None:
        raise ValueError(f"encoder {name!r} ({uri}) has no architecture to fine-tune")
    state = {k: v.detach().clone() for k, v in enc.module.encoder.state_dict().items()}
    return EncoderInit(name, kind, enc.source, enc.config.model, state)
