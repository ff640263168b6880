"""The trained encoder as an MLflow Model: logged (and optionally registered) at the end of a
pretraining run, loaded back by `models:/` URI.

    log_encoder_model(state, cfg, tracking_uri, run_id, register_as="")  -> ModelInfo
    load_encoder_model("models:/NAME@alias", tracking_uri)                -> FrozenEncoder

The model is `pipeline.encoder_model.FrozenEncoder` logged with `mlflow.pytorch.log_model`: a
signature, an input example, the preprocessing and the layers' pooled shapes in its metadata,
and the modules it needs shipped as `code_paths`, so any project loads it with plain
`mlflow.pytorch.load_model(uri)`; see docs/encoder_model.md.

That pickle runs code when loaded, so this project never loads it by default: beside it, in the
model's `extra_files/`, go the weights alone (`encoder_state.pt`, tensors only, read with
`torch.load(weights_only=True)`) and `encoder_config.json` (run config, layers, pooling);
`load_encoder_model` downloads only those two and rebuilds the encoder from this repository's
own architecture. A model without them (logged before, or not by this project) is refused
unless pickle is allowed explicitly (`allow_pickle=True`, or CE_ALLOW_PICKLE_MODELS=1).

MLflow's model logging and loading read the global tracking URI (there is no `tracking_uri`
argument on `log_model` / `load_model`), so both run inside `tracking_uri_scope`, which sets it
and restores the previous value on the way out. Everything else in this project passes explicit
URIs to `MlflowClient`s, which the scope does not touch.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, ConfigError, ModelConfig, flatten, from_dict, to_dict
from pipeline.encoder_model import (
    PREPROCESSING,
    SHIPPED_MODULES,
    FrozenEncoder,
    freeze_encoder,
)

MODEL_NAME = "encoder_model"  # the logged model's name in its run
# The weights-only copy beside the pickled model (MLflow's extra_files/ folder of the model).
WEIGHTS_FILE = "encoder_state.pt"  # FrozenEncoder.state_dict(): tensors only
CONFIG_FILE = "encoder_config.json"  # {"format", "run_config", "layers", "max_dim"}
EXTRA_FILES_DIR = "extra_files"
ALLOW_PICKLE_ENV = "CE_ALLOW_PICKLE_MODELS"  # "1": load models without a weights-only copy


class UnsafeModelError(ConfigError):
    """A model can only be loaded by unpickling (running) code from its store, and pickle was
    not allowed. A ConfigError: the user's to decide, one line and exit 2 in every job."""


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
        extra = write_safe_files(enc, Path(tmp) / "safe")
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
            extra_files=[str(p) for p in extra],  # the weights-only copy this project loads
            pip_requirements=_pip_requirements(),
            metadata=model_metadata(enc, cfg),
            registered_model_name=register_as or None,
        )


def write_safe_files(enc: FrozenEncoder, folder: Path) -> list[Path]:
    """WEIGHTS_FILE and CONFIG_FILE of `enc` in `folder`: all `encoder_from_files` needs."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(enc.state_dict(), folder / WEIGHTS_FILE)
    meta = {"format": 1, "run_config": enc.run_config, "layers": list(enc.layers),
            "max_dim": enc.max_dim}  # fmt: skip
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    return [folder / WEIGHTS_FILE, folder / CONFIG_FILE]


def encoder_from_files(weights: Path, config: Path) -> FrozenEncoder:
    """A FrozenEncoder rebuilt from this repository's architecture (pipeline.model) and the
    model config in `config`, its weights read by the weights-only unpickler: no code from the
    files runs. Raises ValueError when they do not describe this project's encoder."""
    from pipeline.model import Generator

    meta = json.loads(config.read_text())
    if not isinstance(meta, dict) or meta.get("format") != 1:
        raise ValueError(f"{config}: not an encoder config of this project")
    model_cfg: ModelConfig = from_dict(meta["run_config"]["model"], ModelConfig, "model.")
    enc = freeze_encoder(Generator(model_cfg), meta["run_config"], meta["layers"],
                         int(meta["max_dim"]))  # fmt: skip
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeModelError(
            f"{weights.name}: holds more than tensors, and the weights-only loader refused it "
            f"({str(err).splitlines()[0]}); not loading a model that carries code"
        ) from None
    try:
        enc.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{weights}: weights do not fit the encoder {model_cfg}: {err}") from err
    return enc


def pickle_allowed(allow_pickle: bool | None = None) -> bool:
    """`allow_pickle` when given, else CE_ALLOW_PICKLE_MODELS=1 in the environment."""
    if allow_pickle is not None:
        return allow_pickle
    return os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def _download_safe_files(uri: str, dst: Path) -> tuple[Path, Path] | None:
    """The model's WEIGHTS_FILE and CONFIG_FILE downloaded into `dst` (nothing else: not the
    pickle), or None when the model has none. MLflow errors (no such model) propagate."""
    from mlflow.exceptions import MlflowException

    got = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            got.append(_download(uri, f"{EXTRA_FILES_DIR}/{name}", dst))
        except (MlflowException, OSError) as err:
            if _exists(uri):
                return None  # the model is there, its weights-only copy is not
            raise err
    return got[1], got[0]


def _download(uri: str, rel: str, dst: Path) -> Path:
    """One file `rel` inside the model at `uri`. models:/ URIs take no sub-path (MLflow reads
    models:/m-ID/x as a registered name), so their artifact repository resolves the model."""
    import mlflow.artifacts

    if uri.startswith("models:/"):
        from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

        return Path(ModelsArtifactRepository(uri).download_artifacts(rel, dst_path=str(dst)))
    return Path(mlflow.artifacts.download_artifacts(f"{uri.rstrip('/')}/{rel}", dst_path=str(dst)))


def _exists(uri: str) -> bool:
    """Whether the model behind `uri` resolves (its MLmodel file downloads)."""
    with tempfile.TemporaryDirectory() as d:
        try:
            _download(uri, "MLmodel", Path(d))
            return True
        except Exception:  # noqa: BLE001 - any failure: not a model we can see
            return False


def load_encoder_model(
    uri: str, tracking_uri: str | None = None, allow_pickle: bool | None = None
) -> FrozenEncoder:
    """A logged FrozenEncoder from `models:/NAME@alias`, `models:/NAME/VERSION`, `models:/m-ID`
    or `runs:/RUN_ID/encoder_model`, rebuilt from its weights-only copy (no code from the store
    runs). A model without one is loaded through MLflow's pickle only when `allow_pickle` (or
    CE_ALLOW_PICKLE_MODELS=1); else UnsafeModelError."""
    import mlflow.pytorch

    scope = tracking_uri_scope(tracking_uri) if tracking_uri else contextlib.nullcontext()
    with scope, tempfile.TemporaryDirectory() as tmp:
        files = _download_safe_files(uri, Path(tmp))
        if files is not None:
            return encoder_from_files(*files)
        if not pickle_allowed(allow_pickle):
            raise UnsafeModelError(
                f"{uri}: the model has no weights-only copy ({EXTRA_FILES_DIR}/{WEIGHTS_FILE}, "
                "logged since this check existed), and loading it would unpickle, i.e. run, "
                f"code from the model store; set {ALLOW_PICKLE_ENV}=1 to load it anyway, only "
                "from a store whose writers you trust"
            )
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    if not isinstance(model, FrozenEncoder):
        raise TypeError(f"{uri}: expected a logged FrozenEncoder, got {type(model).__name__}")
    return model
