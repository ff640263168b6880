"""The protocol end to end on real tar shards: table, plots, cache reuse and rebuild, Ray
fan-out identical to one process, the MLflow job, and a CIFAR-10 run."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import torch
import webdataset as wds
from PIL import Image

from evaluation.extraction import SplitSpec, split_features
from evaluation.features import raw_pixels_encoder
from evaluation.probe import ProbeSettings
from evaluation.protocol import ProtocolSettings, evaluate_encoders
from pipeline.checkpoint import save_encoder
from pipeline.config import Config, DataConfig, ModelConfig
from pipeline.model import build_generator

TINY = Config(
    data=DataConfig(image_size=32), model=ModelConfig(image_size=32, width=8, bottleneck=16)
)
FAST = ProtocolSettings(
    batch_size=32, probe=ProbeSettings(c_grid=(0.01, 1.0), max_iter=100), inpaint_images=40
)
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])  # one tint per class


def write_shards(root, prefix: str, n_shards: int, per_shard: int, seed: int) -> str:
    """Real WebDataset shards: 32-px JPEGs of noisy class tints, labels in `cls`."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"{prefix}-{s:06d}.tar")) as w:
            for i in range(per_shard):
                label = int(rng.integers(0, 3))
                px = COLOURS[label] + rng.normal(0, 40, size=(32, 32, 3))
                buf = io.BytesIO()
                Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
                w.write({"__key__": f"{prefix}-{s}-{i:04d}", "jpg": buf.getvalue(),
                         "cls": str(label).encode()})  # fmt: skip
    return str(root / f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return write_shards(root, "train", 4, 30, seed=0), write_shards(root, "test", 2, 25, seed=1)


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("enc") / "generator.pt"
    save_encoder(path, build_generator(TINY.model), TINY)
    return str(path)


def run(shards, encoder_path, root, layers=("conv2", "bottleneck")) -> pd.DataFrame:
    return evaluate_encoders(
        {"ce": encoder_path},
        train_urls=shards[0],
        test_urls=shards[1],
        layers=list(layers),
        cache_dir=root / "cache",
        out_dir=root / "out",
        image_size=32,
        settings=FAST,
    )


def value(df, encoder, layer, metric) -> float:
    sel = df[(df.encoder == encoder) & (df.layer == layer) & (df.metric == metric)]
    assert len(sel) == 1, (encoder, layer, metric)
    return float(sel["value"].iloc[0])


@pytest.mark.integration  # the whole protocol end to end: tens of seconds
def test_protocol_table_plots_and_cache(shards, encoder_path, tmp_path):
    df = run(shards, encoder_path, tmp_path)
    pairs = set(zip(df.encoder, df.layer, strict=True))
    assert pairs == {
        ("ce", "conv2"), ("ce", "bottleneck"), ("ce", "output"),
        ("random_init", "conv2"), ("random_init", "bottleneck"), ("random_init", "output"),
        ("raw_pixels", "pixels"), ("mean_fill", "output:center"),
    }  # fmt: skip
    # Tinted classes are linearly separable in pixel space; the probe and kNN must see it.
    assert value(df, "raw_pixels", "pixels", "probe_top1") > 0.9
    assert value(df, "raw_pixels", "pixels", "knn_top1") > 0.9
    assert value(df, "raw_pixels", "pixels", "feature_dim") == 3 * 32 * 32
    assert value(df, "ce", "conv2", "feature_dim") == 16 * 8 * 8
    assert value(df, "ce", "conv2", "probe_C") in FAST.probe.c_grid
    assert value(df, "ce", "output", "inpaint_l2") <= value(df, "ce", "output", "inpaint_l1")
    assert 0 < value(df, "mean_fill", "output:center", "inpaint_psnr") < 60
    assert df["value"].map(math.isfinite).all()
    out = tmp_path / "out"
    for name in ("table.parquet", "table.csv", "probe_accuracy.png", "confusion.png",
                 "inpaint_ce.png", "inpaint_random_init.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    pd.testing.assert_frame_equal(pd.read_parquet(out / "table.parquet"), df)

    # Rerun: every feature file is reused untouched and the numbers are identical.
    files = sorted((tmp_path / "cache").rglob("*.parquet"))
    assert len(files) == 2 * (2 + 2 + 1)  # splits x (ce + random_init layers + pixels)
    before = {f: f.stat().st_mtime_ns for f in files}
    pd.testing.assert_frame_equal(run(shards, encoder_path, tmp_path), df)
    assert {f: f.stat().st_mtime_ns for f in files} == before

    # A damaged file is detected, rebuilt, and the result does not change.
    victim = next(f for f in files if "conv2" in f.name and f.name.startswith("train"))
    victim.write_bytes(victim.read_bytes()[:100])
    pd.testing.assert_frame_equal(run(shards, encoder_path, tmp_path), df)
    changed = [f for f in files if f.stat().st_mtime_ns != before[f]]
    assert changed == [victim] and victim.stat().st_size > 1000


def test_ray_fan_out_identical_to_one_process(shards, encoder_path, tmp_path, ray_local):
    from evaluation.features import load_encoder

    spec = SplitSpec("train", shards[0], 32, batch_size=16, max_dim=512)
    for enc in (load_encoder("ce", encoder_path, tmp_path), raw_pixels_encoder()):
        layers = ["conv1", "bottleneck"] if enc.name == "ce" else ["pixels"]
        one = split_features(enc, layers, spec, tmp_path / "single")
        many = split_features(enc, layers, spec, tmp_path / "ray", use_ray=True, ray_tasks=2)
        for layer in layers:
            assert len(one[layer].keys) == 120
            assert list(many[layer].keys) == list(one[layer].keys)
            np.testing.assert_array_equal(many[layer].labels, one[layer].labels)
            np.testing.assert_array_equal(many[layer].x, one[layer].x)


@pytest.mark.integration  # the whole protocol end to end: tens of seconds
def test_job_logs_one_mlflow_run(shards, encoder_path, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from jobs.probe import main

    root = tmp_path / "outputs"
    run_id = main([
        "--encoder", f"ce={encoder_path}", "--train-shards", shards[0],
        "--test-shards", shards[1], "--layers", "bottleneck", "--output-root", str(root),
        "--batch-size", "32", "--c-grid", "0.1,1", "--inpaint-images", "20",
    ])  # fmt: skip
    c = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    r = c.get_run(run_id)
    assert r.info.status == "FINISHED"
    assert r.data.metrics["probe_top1/raw_pixels/pixels"] > 0.9
    assert 0 <= r.data.metrics["probe_top1/ce/bottleneck"] <= 1
    assert "inpaint_psnr/ce/output" in r.data.metrics
    assert r.data.params["encoder.ce"] == encoder_path
    logged = {a.path for a in c.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/table.csv", "evaluation/table.parquet", "evaluation/probe_accuracy.png",
            "evaluation/confusion.png", "evaluation/inpaint_ce.png"} <= logged  # fmt: skip
    printed = capsys.readouterr().out
    assert run_id in printed and "raw_pixels" in printed and "probe_top1" in printed


@pytest.mark.slow
@pytest.mark.cifar
def test_cifar10_encoder_and_baselines_side_by_side(cifar_dir, encoder_path, tmp_path):
    # One train shard (5,000) and one test shard (5,000) keep this under a minute.
    df = evaluate_encoders(
        {"ce": encoder_path},
        train_urls=str(cifar_dir / "cifar10-train-000000.tar"),
        test_urls=str(cifar_dir / "cifar10-test-000000.tar"),
        layers=["conv3"],
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "out",
        image_size=32,
        # Pooled to <= 1024 dims and a short sweep: this is a protocol check, not a benchmark.
        settings=ProtocolSettings(
            max_dim=1024,
            probe=ProbeSettings(c_grid=(0.01, 0.1), sweep_max_samples=2000, max_iter=50),
            inpaint_images=500,
        ),
    )
    top1 = {e: value(df, e, lay, "probe_top1") for e, lay in
            (("ce", "conv3"), ("random_init", "conv3"), ("raw_pixels", "pixels"))}  # fmt: skip
    # Linear probes on (pooled) CIFAR-10 pixels reach about 0.35 on 5k images; chance is 0.10.
    assert 0.28 < top1["raw_pixels"] < 0.5
    assert all(0.2 < v < 0.6 for v in top1.values()), top1
    assert value(df, "raw_pixels", "pixels", "knn_top1") > 0.2
    assert value(df, "ce", "output", "inpaint_l1") > 0


def test_baseline_names_are_reserved(shards, encoder_path, tmp_path):
    with pytest.raises(ValueError, match=r"\['raw_pixels'\] are reserved"):
        evaluate_encoders(
            {"raw_pixels": encoder_path},
            train_urls=shards[0],
            test_urls=shards[1],
            layers=None,
            cache_dir=tmp_path / "cache",
            out_dir=tmp_path / "out",
            image_size=32,
        )
    assert not (tmp_path / "cache").exists()
