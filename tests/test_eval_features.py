"""Loading encoders (path, runs:/ URI, errors) and one-pass pooled feature extraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.features import (
    RawPixels,
    check_image_size,
    check_layers,
    extract,
    load_encoder,
    pool,
    pooled_side,
    random_init_encoder,
    raw_pixels_encoder,
    weights_hash,
)
from pipeline.checkpoint import save_encoder
from pipeline.config import Config, DataConfig, ModelConfig
from pipeline.model import build_generator

TINY = Config(
    data=DataConfig(image_size=32), model=ModelConfig(image_size=32, width=8, bottleneck=16)
)


@pytest.fixture
def encoder_file(tmp_path):
    torch.manual_seed(1)
    g = build_generator(TINY.model)
    path = tmp_path / "generator.pt"
    save_encoder(path, g, TINY)
    return path, g


def test_load_from_path_keeps_weights_and_hash(encoder_file, tmp_path):
    path, g = encoder_file
    enc = load_encoder("ce", str(path), tmp_path / "dl")
    assert enc.weights == weights_hash(g)
    assert enc.config == TINY
    assert enc.module.feature_layers == ("conv1", "conv2", "conv3", "bottleneck")
    assert not enc.module.training
    assert all(not p.requires_grad for p in enc.module.parameters())
    # A folder holding generator.pt is accepted too.
    assert load_encoder("ce", str(path.parent), tmp_path / "dl").weights == enc.weights


def test_missing_file_and_architecture_mismatch_name_both_sides(encoder_file, tmp_path):
    path, g = encoder_file
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_encoder("ce", str(tmp_path / "nope.pt"), tmp_path / "dl")
    # Weights of width 8 under a config that says width 16.
    wrong = Config(data=TINY.data, model=ModelConfig(image_size=32, width=16, bottleneck=16))
    bad = tmp_path / "bad.pt"
    save_encoder(bad, g, wrong)
    with pytest.raises(RuntimeError, match=r"bad\.pt.*width=16"):
        load_encoder("ce", str(bad), tmp_path / "dl")
    enc = load_encoder("ce", str(path), tmp_path / "dl")
    with pytest.raises(ValueError, match="expects image_size 32.*uses 64"):
        check_image_size(enc, 64)
    with pytest.raises(ValueError, match=r"no layer\(s\) \['conv9'\].*available"):
        check_layers(enc, ["conv2", "conv9"])


def _logged_encoder_run(path, tmp_path) -> tuple[str, str]:
    """(tracking URI, run id) of a run in a sqlite store holding `path` as encoder/<name>."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    run_id = c.create_run(exp).info.run_id
    c.log_artifact(run_id, str(path), artifact_path="encoder")
    return uri, run_id


def test_load_from_mlflow_runs_uri(encoder_file, tmp_path):
    path, g = encoder_file
    uri, run_id = _logged_encoder_run(path, tmp_path)
    for suffix in ("encoder/generator.pt", "encoder"):
        enc = load_encoder("ce", f"runs:/{run_id}/{suffix}", tmp_path / suffix, uri)
        assert enc.weights == weights_hash(g)


def test_random_init_is_fixed_by_seed_and_differs_from_trained():
    a, b = random_init_encoder(TINY, seed=0), random_init_encoder(TINY, seed=0)
    c = random_init_encoder(TINY, seed=1)
    assert a.weights == b.weights != c.weights
    assert raw_pixels_encoder().weights != a.weights


def test_pooled_side_and_pool_by_hand():
    assert pooled_side(8, 16, 4096) == 16  # 8*16*16 = 2048 fits
    assert pooled_side(64, 16, 4096) == 8  # 64*8*8 = 4096
    assert pooled_side(3, 32, 1000) == 18  # 3*18*18 = 972
    assert pooled_side(5000, 1, 4096) == 1
    t = torch.arange(16.0).reshape(1, 1, 4, 4)
    np.testing.assert_allclose(pool(t, 4).numpy(), [[2.5, 4.5, 10.5, 12.5]])
    assert pool(torch.zeros(2, 64, 16, 16), 4096).shape == (2, 4096)


def batches_of(images, labels, keys, size, pad_to=None):
    out = []
    for s in range(0, len(images), size):
        img, lab, key = images[s : s + size], labels[s : s + size], keys[s : s + size]
        valid = torch.ones(len(img), dtype=torch.bool)
        if pad_to and len(img) < pad_to:  # padding repeats, as the loader makes them
            n = pad_to - len(img)
            img, lab = (
                torch.cat([img, img[:1].repeat(n, 1, 1, 1)]),
                torch.cat([lab, lab[:1].repeat(n)]),
            )
            key, valid = key + key[:1] * n, torch.cat([valid, torch.zeros(n, dtype=torch.bool)])
        out.append({"image": img, "label": lab, "key": key, "valid": valid})
    return out


def test_extract_is_one_pass_sorted_eval_mode_and_drops_padding():
    torch.manual_seed(0)
    g = build_generator(TINY.model).train()  # extract must switch to eval mode itself
    images = torch.rand(10, 3, 32, 32) * 2 - 1
    labels = torch.arange(10) % 3
    keys = [f"s{i:02d}" for i in range(10)]
    layers = ["conv1", "conv3", "bottleneck"]
    got = extract(g, layers, batches_of(images, labels, keys, 4, pad_to=4), max_dim=512)
    order = torch.randperm(10)
    shuffled = extract(
        g, layers, batches_of(images[order], labels[order], [keys[i] for i in order], 3), 512
    )
    g.eval()
    with torch.no_grad():
        want = g.encode(images, layers)
    for layer in layers:
        f = got[layer]
        assert list(f.keys) == keys
        np.testing.assert_array_equal(f.labels, labels.numpy())
        np.testing.assert_allclose(f.x, pool(want[layer], 512).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(shuffled[layer].x, f.x, rtol=1e-5, atol=1e-6)
    assert got["conv1"].x.shape == (10, 8 * 8 * 8)  # 8 ch x 16x16 pooled to 8x8 (512)
    assert got["bottleneck"].x.shape == (10, 16)


def test_raw_pixels_is_the_image():
    images = torch.rand(4, 3, 8, 8)
    got = extract(RawPixels(), ["pixels"], batches_of(images, torch.zeros(4).long(),
                  list("abcd"), 4), max_dim=4096)  # fmt: skip
    np.testing.assert_array_equal(got["pixels"].x, images.flatten(1).numpy())


def test_evaluation_reads_images_at_the_encoders_training_resize(cifar_dir):
    """An encoder trained on crops of images resized to 64 is probed on the centre 32 of the
    image resized to 64, not on the whole image squeezed to 32."""
    import io
    import tarfile

    from PIL import Image

    from evaluation.extraction import SplitSpec, extract_local

    url = str(cifar_dir / "cifar10-test-000000.tar")
    with tarfile.open(url) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".jpg"))
        key, data = member.name.split(".")[0], tf.extractfile(member).read()
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)
    expected = np.asarray(img.crop((16, 16, 48, 48)), dtype=np.float32) / 127.5 - 1
    enc = raw_pixels_encoder()
    got = {}
    for resize in (0, 64):
        spec = SplitSpec("test", url, 32, batch_size=500, max_dim=3 * 32 * 32, resize=resize)
        feats = extract_local(enc, ["pixels"], spec)["pixels"]
        got[resize] = feats.x[list(feats.keys).index(key)].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.abs(got[64] - expected).max() < 3 / 127.5
    assert np.abs(got[0] - expected).mean() > 0.05  # the whole image is another picture
    assert (
        SplitSpec("t", url, 32, resize=64).transform_key()
        != SplitSpec("t", url, 32).transform_key()
    )


def test_runs_uri_download_is_loaded_then_removed_and_a_local_path_is_kept(encoder_file, tmp_path):
    path, g = encoder_file
    uri, run_id = _logged_encoder_run(path, tmp_path)
    dl = tmp_path / "dl"
    for _ in range(2):  # one private folder per download, gone once the weights are loaded
        enc = load_encoder("ce", f"runs:/{run_id}/encoder", dl, uri)
        assert enc.weights == weights_hash(g) and list(dl.iterdir()) == []
    load_encoder("ce", str(path), path.parent)  # a user's own file inside download_dir
    assert path.is_file()
