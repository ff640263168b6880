"""Checkpoint files: written atomically, read with `torch.load(weights_only=True)`.

A training checkpoint is `Trainer.state_dict()`: {"generator", "discriminator", "opt_g",
"opt_d", "step", "epoch", "batch_in_epoch", "config", "rng"}. An encoder file (for evaluation)
is {"config", "generator"}. Both hold only tensors, numbers, strings, lists and dicts, so the
safe unpickler loads them; configs are stored as `pipeline.config.to_dict` dicts.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, from_dict, to_dict
from pipeline.model import Generator, build_generator


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: a temp file in the same directory, fsync, then
    os.replace, so a crash mid-write never leaves a truncated file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The dict `save_checkpoint` wrote, on CPU, via the safe (weights_only) unpickler."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def save_encoder(path: str | Path, g: Generator, cfg: Config) -> None:
    """The generator (encoder + decoder) and the run config, for evaluation and inpainting."""
    save_checkpoint(path, {"config": to_dict(cfg), "generator": g.state_dict()})


def load_generator(path: str | Path) -> tuple[Generator, Config]:
    """(generator in eval mode, its run config) from a training checkpoint or an encoder file.
    Raises naming the file and the config when the weights do not fit the architecture."""
    state = load_checkpoint(path)
    missing = [k for k in ("config", "generator") if k not in state]
    if missing:
        raise KeyError(f"{path}: not a checkpoint or encoder file (missing {missing})")
    cfg = from_dict(state["config"])
    g = build_generator(cfg.model)
    try:
        g.load_state_dict(state["generator"])
    except RuntimeError as err:
        raise RuntimeError(
            f"{path}: generator weights do not match the architecture its config describes "
            f"({cfg.model}): {err}"
        ) from err
    return g.eval(), cfg
