"""Registered encoders load without unpickling code: `ce-probe`'s loader
(evaluation.features.load_encoder) rebuilds a `models:/` encoder from its weights-only copy and
this repository's architecture. A malicious model registered in a real sqlite MLflow store (a
pickled object whose __reduce__ writes a marker file) runs nothing unless pickle is allowed
explicitly; the legitimate model gives the same features as before."""

from __future__ import annotations

import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.features import extract, load_encoder, pool
from pipeline.config import Config, DataConfig, ModelConfig, to_dict
from pipeline.mlflow_encoder import (
    ALLOW_PICKLE_ENV,
    CONFIG_FILE,
    WEIGHTS_FILE,
    UnsafeModelError,
    freeze_encoder,
    load_encoder_model,
    log_encoder_model,
    tracking_uri_scope,
    write_safe_files,
)
from pipeline.model import build_generator

pytestmark = pytest.mark.slow  # a sqlite store and three logged models: ~40 s

SIZE = 32


class Payload(torch.nn.Module):
    """Unpickling this calls Path.write_text(marker, ...): any code could stand there."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "code ran\n"))


def tiny_config() -> Config:
    return Config(data=DataConfig(image_size=SIZE),
                  model=ModelConfig(image_size=SIZE, width=8, bottleneck=24))  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with: `ce-good` (logged by log_encoder_model from a generator with trained
    BN statistics), `evil` (only a pickle whose unpickling writes `marker`), `evil-weights` (a
    valid encoder config beside a weights file carrying the same payload)."""
    import mlflow
    import mlflow.pytorch
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    marker = root / "pwned"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("enc", artifact_location=str(root / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    cfg = tiny_config()
    torch.manual_seed(0)
    g = build_generator(cfg.model).train()
    with torch.no_grad():
        g(torch.rand(8, 3, SIZE, SIZE) * 2 - 1)  # BN running stats away from their defaults
    g.eval()
    info = log_encoder_model(g.state_dict(), cfg, uri, run_id, register_as="ce-good")

    evil_files = root / "evil_files"
    write_safe_files(freeze_encoder(g, to_dict(cfg)), evil_files)
    torch.save(Payload(marker), evil_files / WEIGHTS_FILE)  # a pickle, not a state dict
    with tracking_uri_scope(uri), mlflow.start_run(experiment_id=exp):
        common = {"serialization_format": "pickle", "pip_requirements": ["torch"]}  # no probe
        mlflow.pytorch.log_model(Payload(marker), name="m1", registered_model_name="evil",
                                 **common)  # fmt: skip
        mlflow.pytorch.log_model(
            Payload(marker), name="m2", registered_model_name="evil-weights",
            extra_files=[str(evil_files / WEIGHTS_FILE), str(evil_files / CONFIG_FILE)], **common,
        )  # fmt: skip
    assert not marker.exists()  # logging ran nothing
    return uri, marker, g, info.model_uri


def test_a_malicious_registered_model_runs_no_code(store, tmp_path):
    uri, marker, _, _ = store
    with pytest.raises(UnsafeModelError, match=f"no weights-only copy.*{ALLOW_PICKLE_ENV}=1"):
        load_encoder("evil", "models:/evil/1", tmp_path, tracking_uri=uri)
    with pytest.raises(UnsafeModelError, match="weights-only loader refused it"):
        load_encoder("evil", "models:/evil-weights/1", tmp_path, tracking_uri=uri)
    assert not marker.exists()


def test_the_pickle_path_needs_the_opt_in_and_then_runs_the_payload(store, monkeypatch):
    """The same model with the opt-in: its code runs (so the test above is not vacuous)."""
    uri, marker, _, _ = store
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    with pytest.raises(AttributeError, match="'int' object"):  # MLflow's .eval() on the result
        load_encoder_model("models:/evil/1", uri)
    assert marker.read_text() == "code ran\n"
    marker.unlink()


@pytest.mark.parametrize("ref", ["models:/ce-good/1", "model_id"])
def test_the_legitimate_model_gives_the_same_features(store, ref, tmp_path, one_thread):
    uri, _, g, model_uri = store
    ref = model_uri if ref == "model_id" else ref  # the logged model's own models:/m-<id>
    enc = load_encoder("ce", ref, tmp_path, tracking_uri=uri)
    pickled = load_encoder_model(ref, uri, allow_pickle=True)  # the path ce-probe used before
    assert enc.config == tiny_config() and type(enc.module).__name__ == "FrozenEncoder"
    x = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch = {"image": x, "key": [f"k{i}" for i in range(6)], "label": torch.arange(6)}
    layers = list(g.feature_layers)
    got = extract(enc.module, layers, [batch], max_dim=4096)
    with torch.inference_mode():
        want = pickled(x).numpy()
        maps = g.encode(x, layers)
    np.testing.assert_array_equal(np.concatenate([got[k].x for k in layers], axis=1), want)
    reference = torch.cat([pool(maps[k], 4096) for k in layers], 1).numpy()  # the generator's
    np.testing.assert_allclose(want, reference, atol=1e-6, rtol=0)
