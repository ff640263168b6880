"""Frozen features: load an encoder, pool named layers to a fixed size, extract in one pass.

An "encoder" here is anything with `feature_layers` and `encode(x, layers) -> {name: (B,C,h,w)}`:
the pretrained Generator, the same architecture at random init, or `RawPixels` (the image itself
as the one layer "pixels"), so every baseline goes through the identical path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from evaluation.cache import Features
from pipeline.config import Config, ModelConfig
from pipeline.encoder_model import pool, pooled_side  # noqa: F401  (re-exported: one pooling)
from pipeline.storage import is_uri


class RawPixels(nn.Module):
    """The raw-pixel baseline: one layer, "pixels", the (B,3,S,S) image in [-1, 1]."""

    feature_layers: tuple[str, ...] = ("pixels",)

    def encode(self, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        return {"pixels": x}


@dataclass
class Encoder:
    """A loaded encoder: the module, its run config (None for raw pixels), a weights hash."""

    name: str
    module: nn.Module
    config: Config | None
    weights: str  # sha256 of the state dict (+ kind), the feature-cache key
    source: str  # where it came from, for messages and the MLflow params

    @property
    def can_inpaint(self) -> bool:
        """A whole generator (decoder included); an encoder-only MLflow Model is not one."""
        return self.config is not None and hasattr(self.module, "decoder")


def weights_hash(module: nn.Module, salt: str = "") -> str:
    """sha256 over every state-dict entry's name, dtype, shape and bytes (BN buffers too)."""
    h = hashlib.sha256(salt.encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolve_checkpoint(uri: str, download_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """A local checkpoint file for a path, an MLflow `runs:/<id>/encoder[/generator.pt]` URI, or
    an object-storage URI (s3://.../checkpoint.pt, through fsspec).

    A folder (local or downloaded) must hold `generator.pt`. Raises FileNotFoundError naming the
    URI and the path it resolved to.
    """
    if uri.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import tempfile

        import mlflow.artifacts  # only when asked: the library never imports MLflow eagerly

        # A folder of its own per download: two probe jobs sharing an output root would
        # otherwise write the same generator.pt at once and read each other's half-written file.
        Path(download_dir).mkdir(parents=True, exist_ok=True)
        dst = tempfile.mkdtemp(prefix="encoder-", dir=download_dir)
        path = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=dst, tracking_uri=tracking_uri
            )
        )
    elif is_uri(uri):
        path = _download_uri(uri, Path(download_dir))
    else:
        path = Path(uri).expanduser()
    if path.is_dir():
        path = path / "generator.pt"
    if not path.is_file():
        raise FileNotFoundError(f"encoder checkpoint {uri!r} not found (looked for {path})")
    return path


def _download_uri(uri: str, download_dir: Path) -> Path:
    """Copy an s3:// gs:// checkpoint file (or a folder's generator.pt) into a private folder
    under `download_dir` (removed again once loaded: `_discard_download`)."""
    import tempfile

    import fsspec

    fs, remote = fsspec.core.url_to_fs(uri)
    if fs.isdir(remote):
        remote = remote.rstrip("/") + "/generator.pt"
    download_dir.mkdir(parents=True, exist_ok=True)
    dst = Path(tempfile.mkdtemp(prefix="encoder-", dir=download_dir)) / Path(remote).name
    try:
        fs.get(remote, str(dst))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"encoder checkpoint {uri!r} not found ({remote})") from e
    return dst


def _discard_download(path: Path, download_dir: Path) -> None:
    """Remove the private folder a download landed in (its weights are loaded): one folder per
    download would otherwise pile up a checkpoint copy per probe run."""
    import shutil

    try:
        rel = path.resolve().relative_to(download_dir.resolve())
    except ValueError:
        return  # a user's own checkpoint path: never touched
    if rel.parts and rel.parts[0].startswith("encoder-"):
        shutil.rmtree(download_dir / rel.parts[0], ignore_errors=True)


def load_encoder(
    name: str,
    uri: str,
    download_dir: str | Path,
    tracking_uri: str | None = None,
    allow_pickle: bool | None = None,
) -> Encoder:
    """Load a pretrained encoder (frozen, eval mode): a generator from a checkpoint path or a
    `runs:/` URI, or the encoder-only MLflow Model behind a `models:/` URI
    (models:/NAME@alias, models:/NAME/VERSION, models:/m-ID). Nothing is unpickled but tensors:
    a model is rebuilt from its weights-only copy, and one without is refused unless
    `allow_pickle` (default: CE_ALLOW_PICKLE_MODELS=1), see pipeline.mlflow_encoder."""
    if uri.startswith("models:/"):
        return _load_mlflow_model(name, uri, tracking_uri, allow_pickle)
    from pipeline.checkpoint import load_generator

    path = resolve_checkpoint(uri, download_dir, tracking_uri)
    g, cfg = load_generator(path)
    _discard_download(path, Path(download_dir))
    g.eval().requires_grad_(False)
    return Encoder(name=name, module=g, config=cfg, weights=weights_hash(g), source=uri)


def _load_mlflow_model(
    name: str, uri: str, tracking_uri: str | None, allow_pickle: bool | None = None
) -> Encoder:
    from mlflow.exceptions import MlflowException

    from pipeline.config import from_dict
    from pipeline.mlflow_encoder import load_encoder_model

    try:
        enc = load_encoder_model(uri, tracking_uri, allow_pickle)
    except MlflowException as err:
        msg = f"encoder model {uri!r} not found (tracking URI {tracking_uri}): {err}"
        raise FileNotFoundError(msg) from err
    cfg = from_dict(enc.run_config)
    return Encoder(name, enc, cfg, weights_hash(enc, "frozen_encoder"), uri)


def random_init_encoder(config: Config, seed: int = 0, name: str = "random_init") -> Encoder:
    """The same architecture at its docs/method.md initialisation, from a fixed seed."""
    from pipeline.model import build_generator

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        g = build_generator(config.model)
    g.eval().requires_grad_(False)
    return Encoder(name, g, config, weights_hash(g, f"random_init/{seed}"), f"random_init:{seed}")


def raw_pixels_encoder(name: str = "raw_pixels") -> Encoder:
    return Encoder(name, RawPixels(), None, hashlib.sha256(b"raw_pixels").hexdigest(), "pixels")


def check_layers(encoder: Encoder, layers: Sequence[str] | None) -> tuple[str, ...]:
    """The layers to extract: `layers` (all must exist) or all of the encoder's layers."""
    available = tuple(encoder.module.feature_layers)
    if isinstance(encoder.module, RawPixels) or not layers:
        return available
    missing = [layer for layer in layers if layer not in available]
    if missing:
        raise ValueError(
            f"encoder {encoder.name!r} ({encoder.source}) has no layer(s) {missing}; "
            f"requested {list(layers)}, available {list(available)}"
        )
    return tuple(layers)


def check_image_size(encoder: Encoder, image_size: int) -> None:
    """An encoder trained at one input size cannot be probed at another."""
    if encoder.config is not None and encoder.config.model.image_size != image_size:
        raise ValueError(
            f"encoder {encoder.name!r} ({encoder.source}) expects image_size "
            f"{encoder.config.model.image_size}, but the evaluation uses {image_size}"
        )


def _finish(keys: list[str], labels: list[np.ndarray], parts: list[np.ndarray]) -> Features:
    """Concatenate, sort by key and drop repeated keys, so any split of the work gives the same
    rows in the same order."""
    k = np.asarray(keys, dtype=object)
    order = np.argsort(k.astype(str), kind="stable")
    k = k[order]
    first = np.ones(len(k), dtype=bool)
    first[1:] = k[1:] != k[:-1]
    return Features(
        keys=k[first],
        labels=np.concatenate(labels)[order][first],
        x=np.concatenate(parts)[order][first],
    )


def extraction_device() -> torch.device:
    """Where features are computed: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def extract(
    module: nn.Module,
    layers: Sequence[str],
    batches: Iterable[dict],
    max_dim: int,
    device: torch.device | None = None,
) -> dict[str, Features]:
    """One pass over `batches`: every layer in `layers`, pooled, for the clean images.

    Rows where batch["valid"] is False (padding repeats) are dropped; rows come back sorted by
    key. Eval mode, no gradients. Runs on `device` (default: `extraction_device()`); the module
    is moved back to the device it came from afterwards, since inpainting then uses it on CPU
    batches.
    """
    device = device or extraction_device()
    home = next(module.parameters(), torch.empty(0)).device
    module.eval().to(device)
    try:
        return _extract(module, layers, batches, max_dim, device)
    finally:
        module.to(home)


def _extract(
    module: nn.Module,
    layers: Sequence[str],
    batches: Iterable[dict],
    max_dim: int,
    device: torch.device,
) -> dict[str, Features]:
    keys: list[str] = []
    labels: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    with torch.inference_mode():
        for batch in batches:
            valid = (
                batch["valid"].bool()
                if "valid" in batch
                else torch.ones(len(batch["key"]), dtype=torch.bool)
            )
            if not valid.any():
                continue
            if "label" not in batch:
                raise ValueError(f"batch without labels (sample keys {batch['key'][:3]}...): "
                                 "probing needs a `cls` member in every sample")  # fmt: skip
            out = module.encode(batch["image"][valid].to(device), list(layers))
            for layer in layers:
                parts[layer].append(pool(out[layer], max_dim).cpu().numpy())
            keys.extend(k for k, v in zip(batch["key"], valid.tolist(), strict=True) if v)
            labels.append(batch["label"][valid].numpy().astype(np.int64))
    if not keys:
        raise ValueError("feature extraction saw no valid samples (empty shards?)")
    return {layer: _finish(keys, labels, parts[layer]) for layer in layers}


def merge(parts: Sequence[dict[str, Features]]) -> dict[str, Features]:
    """Join per-worker extractions (each sorted) into the single-process result."""
    layers = parts[0].keys()
    out = {}
    for layer in layers:
        chosen = [p[layer] for p in parts if len(p[layer].keys)]
        out[layer] = _finish(
            [k for f in chosen for k in f.keys], [f.labels for f in chosen], [f.x for f in chosen]
        )
    return out


def model_config_of(encoders: Sequence[Encoder], image_size: int) -> Config:
    """The run config the random-init baseline copies: the first pretrained encoder's, or the
    default architecture at `image_size` when only baselines are evaluated."""
    for e in encoders:
        if e.config is not None:
            return e.config
    return Config(model=ModelConfig(image_size=image_size))
