"""The trained encoder as an MLflow Model: logged (and optionally registered) at the end of a
pretraining run, loaded back by `models:/` URI.

    log_encoder_model(state, cfg, tracking_uri, run_id, register_as="")  -> ModelInfo
    load_encoder_model("models:/NAME@alias", tracking_uri)                -> FrozenEncoder

The model is `pipeline.encoder_model.FrozenEncoder` logged with `mlflow.pytorch.log_model`: a
signature, an input example, the preprocessing and the layers' pooled shapes in its metadata,
and the modules it needs shipped as `code_paths`, so any project loads it with plain
`mlflow.pytorch.load_model(uri)`; see docs/encoder_model.md.

MLflow's model logging and loading read the global tracking URI (there is no `tracking_uri`
argument on `log_model` / `load_model`), so both run inside `tracking_uri_scope`, which sets it
and restores the previous value on the way out. Everything else in this project passes explicit
URIs to `MlflowClient`s, which the scope does not touch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, flatten, to_dict
from pipeline.encoder_model import (
    PREPROCESSING,
    SHIPPED_MODULES,
    FrozenEncoder,
    freeze_encoder,
)

MODEL_NAME = "encoder_model"  # the logged model's name in its run


@contextlib.contextmanager
def tracking_uri_scope(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to `uri` inside the block; the previous one (and the
    MLFLOW_TRACKING_URI variable, which set_tracking_uri rewrites) restored on the way out."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None: back to "not set" (env var or default)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def shipped_code(dst: Path) -> Path:
    """`dst/pipeline/` holding SHIPPED_MODULES (an empty __init__.py): the code the model needs.

    Not the whole package: the rest imports Ray, WebDataset and more that loading never uses."""
    src = Path(__file__).resolve().parent
    pkg = dst / "pipeline"
    pkg.mkdir(parents=True)
    for name in SHIPPED_MODULES:
        if name == "__init__.py":
            (pkg / name).write_text('"""The modules a logged FrozenEncoder needs to load."""\n')
        else:
            shutil.copy2(src / name, pkg / name)
    return pkg


def input_example(image_size: int) -> np.ndarray:
    """One (1, 3, S, S) float32 image in [-1, 1], fixed (a smooth gradient, not noise)."""
    ramp = np.linspace(-1.0, 1.0, image_size, dtype=np.float32)
    img = np.stack([ramp[None, :].repeat(image_size, 0), ramp[:, None].repeat(image_size, 1),
                    -ramp[None, :].repeat(image_size, 0)])  # fmt: skip
    return img[None]


def model_metadata(enc: FrozenEncoder, cfg: Config) -> dict[str, Any]:
    """What a user needs to feed the model and read its output (stored in the MLmodel file)."""
    return {
        "image_size": enc.image_size,
        "resize": cfg.data.resize or enc.image_size,
        "preprocessing": PREPROCESSING,
        "layers": list(enc.layers),
        "layer_slices": enc.layer_slices(),
        "max_dim": enc.max_dim,
        "arch": cfg.model.arch,
    }


def _signature(enc: FrozenEncoder, example: np.ndarray):
    from mlflow.models import infer_signature

    with torch.no_grad():
        out = enc(torch.from_numpy(example)).numpy()
    return infer_signature(example, out)


def _pip_requirements() -> list[str]:
    # Given explicitly: MLflow would otherwise infer them by loading the model in a subprocess
    # at the end of every training run (seconds, and it imports this whole project).
    import yaml

    return [f"torch=={torch.__version__.split('+')[0]}", f"pyyaml=={yaml.__version__}"]


def log_encoder_model(
    generator_state: dict[str, torch.Tensor],
    cfg: Config,
    tracking_uri: str,
    run_id: str,
    register_as: str = "",
):
    """Log the frozen encoder of `generator_state` (a Generator state dict for `cfg.model`) to
    MLflow run `run_id` as the model `encoder_model`; register it as a new version of
    `register_as` when given. Returns MLflow's ModelInfo (`model_uri` is `models:/m-...`)."""
    import mlflow.pytorch
    from mlflow import MlflowClient

    from pipeline.model import Generator

    # A fresh Generator, as evaluation builds one from generator.pt: plain BatchNorm (not the
    # SyncBatchNorm of a DDP run) and contiguous weights, whatever the training run used.
    g = Generator(cfg.model)
    g.load_state_dict(generator_state)
    enc = freeze_encoder(g, to_dict(cfg))
    example = input_example(enc.image_size)
    # The logged model is created here, in the run's experiment: log_model alone would put it
    # in the active (else the default) experiment, under ./mlruns of the current directory.
    client = MlflowClient(tracking_uri)
    model = client.create_logged_model(
        experiment_id=client.get_run(run_id).info.experiment_id,
        name=MODEL_NAME,
        source_run_id=run_id,
        params={k: str(v) for k, v in flatten(to_dict(cfg)).items()},
    )
    with tempfile.TemporaryDirectory() as tmp, tracking_uri_scope(tracking_uri):
        return mlflow.pytorch.log_model(
            enc,
            name=MODEL_NAME,
            run_id=run_id,
            model_id=model.model_id,
            # pickle, not MLflow 3's default "pt2" (torch.export): a traced graph has only
            # forward, and loses encode / features / layer_slices / run_config.
            serialization_format="pickle",
            signature=_signature(enc, example),
            input_example=example,
            code_paths=[str(shipped_code(Path(tmp)))],
            pip_requirements=_pip_requirements(),
            metadata=model_metadata(enc, cfg),
            registered_model_name=register_as or None,
        )


def load_encoder_model(uri: str, tracking_uri: str | None = None) -> FrozenEncoder:
    """A logged FrozenEncoder from `models:/NAME@alias`, `models:/NAME/VERSION`, `models:/m-ID`
    or `runs:/RUN_ID/encoder_model`, through MLflow's own loader."""
    import mlflow.pytorch

    scope = tracking_uri_scope(tracking_uri) if tracking_uri else contextlib.nullcontext()
    with scope:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    if not isinstance(model, FrozenEncoder):
        raise TypeError(f"{uri}: expected a logged FrozenEncoder, got {type(model).__name__}")
    return model
