"""pipeline.encoder_model / pipeline.mlflow_encoder: the frozen encoder gives the evaluation's
features, logs to a real sqlite MLflow store, loads with plain `mlflow.pytorch.load_model` in
a fresh interpreter that cannot import this repository, and resolves `models:/NAME@alias`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.features import pool
from pipeline.config import Config, DataConfig, ModelConfig, to_dict
from pipeline.encoder_model import FrozenEncoder, freeze_encoder, pooled_side
from pipeline.model import build_generator

SIZE = 32


def tiny_config(arch: str = "dcgan") -> Config:
    model = ModelConfig(arch=arch, image_size=SIZE, width=8, bottleneck=24)
    return Config(data=DataConfig(image_size=SIZE, resize=36), model=model)


def trained_like_generator(cfg: Config, seed: int = 0):
    """A generator whose BN running statistics are not the defaults (as after training), so a
    model that silently ran BN in train mode or lost its buffers would differ."""
    torch.manual_seed(seed)
    g = build_generator(cfg.model)
    g.train()
    with torch.no_grad():
        for _ in range(3):
            g(torch.rand(8, 3, SIZE, SIZE) * 2 - 1)
    return g.eval()


def reference_features(g, x: torch.Tensor, layers: list[str], max_dim: int) -> np.ndarray:
    """The evaluation path: Generator.encode, then evaluation.features.pool, concatenated."""
    with torch.inference_mode():
        maps = g.encode(x, layers)
    return torch.cat([pool(maps[name], max_dim) for name in layers], dim=1).numpy()


def images(n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("arch", ["dcgan", "alexnet"])
def test_frozen_encoder_gives_the_evaluation_features(arch, one_thread):
    cfg = tiny_config(arch)
    g = trained_like_generator(cfg)
    enc = freeze_encoder(g, to_dict(cfg), max_dim=256)
    x = images()
    want = reference_features(g, x, list(g.feature_layers), 256)
    got = enc(x).numpy()
    assert got.shape == want.shape and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    # layer_slices says where each layer's pooled features sit, with the pooled shape
    slices = enc.layer_slices()
    assert list(slices) == list(g.feature_layers)
    for name, s in slices.items():
        c, p, _ = s["pooled"]
        assert s["stop"] - s["start"] == c * p * p == pool(g.encode(x, [name])[name], 256).shape[1]
        assert p == pooled_side(c, min(s["map"][1:]), 256)
    assert max(s["stop"] for s in slices.values()) == got.shape[1]


def test_frozen_encoder_stays_frozen_and_checks_its_input(one_thread):
    cfg = tiny_config()
    g = trained_like_generator(cfg)
    enc = freeze_encoder(g, to_dict(cfg), layers=["conv2"])
    x = images()
    before = enc(x)
    enc.train()  # BN must keep its running statistics
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert torch.equal(enc(x), before)
    # the copy is independent of the generator, which keeps training
    with torch.no_grad():
        next(g.parameters()).add_(1.0)
    assert torch.equal(enc(x), before)
    with pytest.raises(ValueError, match=r"expected input \(B, 3, 32, 32\)"):
        enc(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="conv9"):
        FrozenEncoder(g.encoder, SIZE, {}, layers=["conv9"])


# ---- MLflow: log once (a module fixture, ~15 s), load three ways; the integration tier -------


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny generator logged (and registered as `ce-tiny`, alias `champion`) to a sqlite
    store: (tracking uri, ModelInfo, generator, config)."""
    from mlflow.tracking import MlflowClient

    from pipeline.mlflow_encoder import log_encoder_model

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("enc", artifact_location=str(root / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    cfg = tiny_config()
    g = trained_like_generator(cfg, seed=3)
    info = log_encoder_model(g.state_dict(), cfg, uri, run_id, register_as="ce-tiny")
    client.set_registered_model_alias("ce-tiny", "champion", info.registered_model_version)
    client.set_terminated(run_id)
    return uri, info, g, cfg


def _site_packages() -> list[str]:
    """The interpreter's site-packages folders, and nothing else: no repository, no cwd."""
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return sorted(p for p in paths if Path(p).is_dir())


LOADER = textwrap.dedent(
    """
    import importlib.util, json, sys
    import numpy as np
    assert importlib.util.find_spec("pipeline") is None, "the repository is importable"
    import mlflow, mlflow.pytorch
    mlflow.set_tracking_uri(sys.argv[1])
    model = mlflow.pytorch.load_model(sys.argv[2])
    import pipeline
    x = np.load(sys.argv[3])
    out = model(__import__("torch").from_numpy(x)).numpy()
    np.save(sys.argv[4], out)
    print(json.dumps({"pipeline": pipeline.__file__, "type": type(model).__name__}))
    """
)


@pytest.mark.slow
def test_logged_encoder_loads_without_this_repository(logged, tmp_path):
    """A fresh `python -I -S` (no PYTHONPATH, no .pth files: the editable install is hidden)
    whose sys.path is site-packages only, run outside the repository."""
    uri, info, g, cfg = logged
    x = images(4, seed=7).numpy()
    np.save(tmp_path / "x.npy", x)
    boot = (f"import sys; sys.path[:0] = {_site_packages()!r}; sys.argv = sys.argv[1:]; "
            "exec(open(sys.argv[0]).read())")  # fmt: skip
    (tmp_path / "load.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW"))}
    cmd = [sys.executable, "-I", "-S", "-c", boot, str(tmp_path / "load.py"), uri,
           info.model_uri, str(tmp_path / "x.npy"), str(tmp_path / "out.npy")]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    repo = Path(__file__).resolve().parents[1]
    assert seen["type"] == "FrozenEncoder"
    assert not Path(seen["pipeline"]).resolve().is_relative_to(repo)  # the shipped copy
    want = reference_features(g, torch.from_numpy(x), list(g.feature_layers), 4096)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_logged_model_states_its_preprocessing_and_signature(logged):
    from mlflow.models import get_model_info

    uri, info, g, cfg = logged
    from pipeline.mlflow_encoder import tracking_uri_scope

    with tracking_uri_scope(uri):
        model_info = get_model_info(info.model_uri)
    meta = model_info.metadata
    assert meta["image_size"] == SIZE and meta["resize"] == 36
    assert "[-1, 1]" in meta["preprocessing"]
    assert meta["layers"] == list(g.feature_layers)
    total = sum(s["stop"] - s["start"] for s in meta["layer_slices"].values())
    inputs = model_info.signature.inputs.to_dict()[0]
    outputs = model_info.signature.outputs.to_dict()[0]
    assert list(inputs["tensor-spec"]["shape"]) == [-1, 3, SIZE, SIZE]
    assert list(outputs["tensor-spec"]["shape"]) == [-1, total]
    assert info.registered_model_version == 1


@pytest.mark.slow
@pytest.mark.parametrize("ref", ["models:/ce-tiny@champion", "models:/ce-tiny/1", "model_uri"])
def test_probe_loader_resolves_registered_and_logged_models(logged, ref, tmp_path, one_thread):
    from evaluation.features import extract, load_encoder

    uri, info, g, cfg = logged
    model_uri = info.model_uri if ref == "model_uri" else ref
    enc = load_encoder("ce", model_uri, tmp_path / "downloads", tracking_uri=uri)
    assert enc.config == cfg and enc.source == model_uri
    assert not enc.can_inpaint  # encoder only: the probe skips inpainting for it
    x = images(6, seed=11)
    batch = {"image": x, "key": [f"k{i}" for i in range(6)], "label": torch.arange(6)}
    got = extract(enc.module, ["conv2", "bottleneck"], [batch], max_dim=4096)
    want = reference_features(g, x, ["conv2", "bottleneck"], 4096)
    np.testing.assert_allclose(
        np.concatenate([got["conv2"].x, got["bottleneck"].x], axis=1), want, atol=1e-6, rtol=0
    )


@pytest.mark.slow
def test_unknown_registered_model_is_a_clear_error(logged, tmp_path):
    from evaluation.features import load_encoder

    uri = logged[0]
    with pytest.raises(FileNotFoundError, match="models:/no-such-model@champion"):
        load_encoder("ce", "models:/no-such-model@champion", tmp_path, tracking_uri=uri)


@pytest.mark.slow
def test_pretrain_logs_and_registers_the_encoder_it_trained(tmp_path, ray_local):
    """Through jobs.pretrain (2 DDP workers, SyncBatchNorm): the run's encoder_model, registered
    under run.register_model, gives the features of its own encoder/generator.pt."""
    import mlflow.artifacts
    import mlflow.pytorch

    from jobs import make_shards, pretrain
    from pipeline.checkpoint import load_generator
    from pipeline.mlflow_encoder import tracking_uri_scope

    make_shards.main(["--src", "digits", "--out", str(tmp_path / "shards")])
    res = pretrain.main([
        f"data.train_shards={tmp_path / 'shards' / 'digits-train-*.tar'}", "data.image_size=32",
        "model.image_size=32", "model.width=8", "model.bottleneck=24", "data.batch_size=8",
        "train.max_steps=4", "train.checkpoint_every=4", "train.eval_batches=0",
        f"run.output_root={tmp_path / 'out'}", "run.num_workers=2", "run.max_failures=0",
        "run.register_model=ce-digits",
    ])  # fmt: skip
    with tracking_uri_scope(res.tracking_uri):
        model = mlflow.pytorch.load_model("models:/ce-digits/1")
        path = mlflow.artifacts.download_artifacts(
            f"runs:/{res.mlflow_run_id}/encoder/generator.pt", dst_path=str(tmp_path / "dl")
        )
    g, _ = load_generator(path)
    x = images(4, seed=5)
    with torch.no_grad():
        got = model(x).numpy()
    np.testing.assert_allclose(got, reference_features(g, x, list(g.feature_layers), 4096),
                               atol=1e-6, rtol=0)  # fmt: skip
    assert model.run_config["train"]["max_steps"] == 4


def test_the_shipped_code_imports_only_itself():
    """Every module-level `pipeline.*` import of a shipped module is shipped too: the model is
    loaded where this repository is not (imports inside functions run only on other paths)."""
    import ast

    from pipeline.encoder_model import SHIPPED_MODULES

    root = Path(__file__).resolve().parents[1] / "pipeline"
    shipped = {name.removesuffix(".py") for name in SHIPPED_MODULES}
    for name in SHIPPED_MODULES:
        tree = ast.parse((root / name).read_text())
        for node in tree.body:  # module level only
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                assert node.module.split(".")[1] in shipped, f"{name} imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("pipeline."):
                        assert alias.name.split(".")[1] in shipped, f"{name} imports {alias.name}"
