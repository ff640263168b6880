"""Fine-tuning (pipeline.finetune, jobs.finetune): the carve, the recipe's pure parts, the
Wilson interval against a brute-force reference, and the job on tiny shards on a real local Ray
with 2 DDP workers, whose val choice runs before the test shards even exist."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from evaluation.bench_report import ingest_finetune
from pipeline.config import ConfigError, ModelConfig
from pipeline.finetune.carve import carve, stratified_carve
from pipeline.finetune.model import build_classifier, build_optimizer, lr_at, pad_and_crop
from pipeline.finetune.score import wilson_interval
from pipeline.finetune.settings import FinetuneData, FinetuneOptim, load_finetune_config
from pipeline.model import build_generator

TINY = ModelConfig(arch="dcgan", image_size=32, width=8, bottleneck=16)
# Four classes told apart by their mean colour: an easy set any trained classifier separates.
COLOURS = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220], [220, 220, 40]])


def write_shards(folder, prefix: str, n: int, per_shard: int, seed: int) -> str:
    """n samples of the four colour classes (noise on top), `per_shard` per tar."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(math.ceil(n / per_shard)):
        with wds.TarWriter(str(folder / f"{prefix}-{s:06d}.tar")) as w:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                c = i % len(COLOURS)
                px = np.clip(COLOURS[c] + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(px).save(buf, format="PNG")
                w.write({"__key__": f"{prefix}-{i:05d}", "png": buf.getvalue(),
                         "cls": str(c).encode()})  # fmt: skip
    last = math.ceil(n / per_shard) - 1
    return str(folder / f"{prefix}-{{000000..{last:06d}}}.tar")


# ---- the carve ------------------------------------------------------------------------------


def test_stratified_carve_counts_disjoint_and_order_free():
    rng = np.random.default_rng(0)
    keys = [f"k{i:04d}" for i in range(1000)]
    labels = rng.integers(0, 5, size=1000)
    train, val = stratified_carve(keys, labels, 0.1, 200, seed=3)
    assert not set(train) & set(val)
    for c in range(5):
        n_c = int((labels == c).sum())
        assert (labels[train] == c).sum() == max(1, round(0.1 * n_c))
        assert (labels[val] == c).sum() == round(200 * n_c / 1000)
    # The same keys in another order carve the same images; another seed carves others.
    perm = rng.permutation(1000)
    t2, v2 = stratified_carve([keys[i] for i in perm], labels[perm], 0.1, 200, seed=3)
    assert sorted(keys[i] for i in train) == sorted(keys[perm[i]] for i in t2)
    assert sorted(keys[i] for i in val) == sorted(keys[perm[i]] for i in v2)
    t3, _ = stratified_carve(keys, labels, 0.1, 200, seed=4)
    assert set(t3) != set(train)
    with pytest.raises(ValueError, match="lower data.label_fraction"):
        stratified_carve(keys, labels, 0.9, 300, seed=0)


def test_carve_writes_shards_once_and_reuses_them(tmp_path):
    pool = write_shards(tmp_path / "pool", "p", 120, 50, seed=0)
    data = FinetuneData(train_shards=pool, test_shards="unused", label_fraction=0.2,
                        val_images=40, carve_seed=1)  # fmt: skip
    first = carve(data, str(tmp_path / "out"))
    assert len(first.train_keys) == 24 and len(first.val_keys) == 40
    assert first.num_classes == 4
    assert not set(first.train_keys) & set(first.val_keys)
    from pipeline.data import expand_urls, shard_sample_counts

    assert sum(shard_sample_counts(expand_urls(first.shards("train")))) == 24
    assert shard_sample_counts([first.shards("val")]) == [40]
    assert len(expand_urls(first.shards("train"))) == 8
    mtime = (first.folder / "carve.json").stat().st_mtime_ns
    again = carve(data, str(tmp_path / "out"))
    assert again == first and (first.folder / "carve.json").stat().st_mtime_ns == mtime


# ---- the recipe's pure parts ---------------------------------------------------------------


def test_wilson_interval_matches_brute_force_inversion():
    """Wilson's interval is the set of p whose score test accepts the observed proportion:
    |p_hat - p| <= z sqrt(p (1 - p) / n). Found here on a fine grid, independently."""
    grid = np.linspace(0, 1, 200_001)
    for correct, total in [(0, 10), (3, 10), (50, 100), (611, 1000), (10_000, 10_000)]:
        p_hat = correct / total
        accepted = grid[np.abs(p_hat - grid) <= 1.959964 * np.sqrt(grid * (1 - grid) / total)]
        low, high = wilson_interval(correct, total)
        assert low == pytest.approx(accepted.min(), abs=2e-5)
        assert high == pytest.approx(accepted.max(), abs=2e-5)
        assert low <= p_hat <= high


def test_lr_warmup_then_cosine_to_zero():
    lrs = [lr_at(s, 100, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_at(100, 100, 10, 0.1) == pytest.approx(0.0)


def test_pad_and_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.randn(6, 3, 8, 8)
    assert torch.equal(pad_and_crop(x, 0, torch.Generator()), x)
    out = pad_and_crop(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    assert out.shape == x.shape
    for i in range(6):
        windows = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    again = pad_and_crop(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_classifier_starts_from_the_encoder_and_decays_weights_only():
    g = build_generator(TINY)
    net = build_classifier(TINY, g.encoder.state_dict(), num_classes=4)
    for k, v in g.encoder.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[k], v), k
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 4)
    assert net.head.in_features == TINY.bottleneck
    opt = build_optimizer(net, FinetuneOptim(weight_decay=1e-3))
    decayed, free = opt.param_groups
    assert decayed["weight_decay"] == 1e-3 and free["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in free["params"])
    n_params = sum(p.numel() for p in net.parameters())
    assert sum(p.numel() for g_ in opt.param_groups for p in g_["params"]) == n_params


def test_encoder_init_from_a_checkpoint_and_seeded_random(tmp_path):
    from evaluation.finetune_source import encoder_init, split_encoder_arg
    from pipeline.checkpoint import save_encoder
    from pipeline.config import Config

    g = build_generator(TINY)
    save_encoder(tmp_path / "generator.pt", g, Config(model=TINY))
    enc = encoder_init("ce", str(tmp_path), model=ModelConfig(), seed=0, download_dir=tmp_path)
    assert (enc.kind, enc.model) == ("context_encoder", TINY)  # its own architecture
    assert enc.state.keys() == g.encoder.state_dict().keys()
    assert all(torch.equal(v, g.encoder.state_dict()[k]) for k, v in enc.state.items())
    r0, r0b, r1 = (encoder_init("r", "random", model=TINY, seed=s, download_dir=tmp_path)
                   for s in (0, 0, 1))  # fmt: skip
    assert r0.kind == "random_init" and r0.source == "random_init:0"
    w = "conv2.0.weight"
    assert torch.equal(r0.state[w], r0b.state[w]) and not torch.equal(r0.state[w], r1.state[w])
    assert split_encoder_arg("random") == ("random_init", "random")
    assert split_encoder_arg("ce=runs:/abc/encoder") == ("ce", "runs:/abc/encoder")
    assert split_encoder_arg("runs:/abc/encoder") == ("context_encoder", "runs:/abc/encoder")
    with pytest.raises(FileNotFoundError, match="not found"):
        encoder_init("x", str(tmp_path / "none.pt"), model=TINY, seed=0, download_dir=tmp_path)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key"):
        load_finetune_config("jobs/configs/finetune_cifar10.yaml", ["optim.lr_max=1"])
    with pytest.raises(ConfigError, match="label_fraction"):
        load_finetune_config("jobs/configs/finetune_cifar10.yaml", ["data.label_fraction=0"])
    cfg = load_finetune_config("jobs/configs/finetune_cifar10.yaml")
    assert (cfg.data.label_fraction, cfg.optim.epochs, cfg.run.num_workers) == (0.1, 30, 2)


def test_cli_missing_test_shards_is_one_line_exit_2(tmp_path, capsys):
    from jobs.finetune import cli

    pool = write_shards(tmp_path / "pool", "p", 8, 8, seed=0)
    with pytest.raises(SystemExit) as e:
        cli(["--config", "jobs/configs/finetune_cifar10.yaml", f"data.train_shards={pool}",
             f"data.test_shards={tmp_path}/none-*.tar", f"run.output_root={tmp_path}"])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.test_shards" in err[0]


# ---- the job on a real local Ray -----------------------------------------------------------


def test_finetune_chooses_on_val_before_test_exists(tmp_path, ray_local):
    """Two stages on 2 Ray Train workers: select (the test shards not yet written, so it cannot
    have read them), then the test shards are written and scored once. Easy classes: the
    chosen weights beat chance by far; the row, its interval and the MLflow run agree."""
    from mlflow.tracking import MlflowClient

    from evaluation.finetune_source import encoder_init
    from pipeline.finetune import (
        load_finetune_config,
        open_run,
        resolve_finetune_paths,
        score_test,
        select,
    )  # fmt: skip
    from pipeline.tracking import tracked_run

    pool = write_shards(tmp_path / "pool", "train", 240, 80, seed=0)
    test_folder = tmp_path / "test"
    cfg = load_finetune_config("jobs/configs/finetune_cifar10.yaml", [
        f"data.train_shards={pool}", f"data.test_shards={test_folder}/test-{{000000..000001}}.tar",
        "data.label_fraction=0.5", "data.val_images=60", "data.batch_size=8",
        "optim.epochs=4", "optim.warmup_epochs=0.5", "optim.lr=0.02",
        "model.width=8", "model.bottleneck=16", f"run.output_root={tmp_path / 'out'}",
        "run.run_name=ft-tiny", "run.system_metrics_every_s=0",
    ])  # fmt: skip
    cfg = resolve_finetune_paths(cfg)
    enc = encoder_init("random_init", "random", model=cfg.model, seed=0, download_dir=tmp_path)
    run = open_run(cfg, enc)
    with tracked_run(run.uri, run.run_id):
        assert not test_folder.exists()
        chosen = select(cfg, enc, run)
        assert not test_folder.exists()  # nothing during selection touched the test path
        write_shards(test_folder, "test", 120, 60, seed=1)
        res = score_test(cfg, enc, chosen, run)

    row = res.row
    assert row["protocol"] == "finetune" and row["kind"] == "random_init"
    assert row["label_fraction"] == 0.5 and row["layer"] == "all" and row["chosen_on_val"]
    assert row["test_top1"] > 60.0  # chance is 25 %
    assert row["test_ci_low"] <= row["test_top1"] <= row["test_ci_high"]
    low, high = wilson_interval(round(row["test_top1"] * 120 / 100), 120)
    assert (row["test_ci_low"], row["test_ci_high"]) == pytest.approx((100 * low, 100 * high))
    with res.row_csv.open() as f:
        (written,) = list(csv.DictReader(f))
    assert list(written) == ["encoder", "kind", "protocol", "label_fraction", "seed", "layer",
                             "chosen_on_val", "val_top1", "test_top1", "test_ci_low",
                             "test_ci_high", "test_n"]  # fmt: skip
    assert float(written["test_top1"]) == row["test_top1"] and row["test_n"] == 120
    # The row is what `ce-benchmark --finetune-results` takes (it once lacked test_n).
    ingested = ingest_finetune(res.row_csv).iloc[0]
    assert ingested.protocol == "finetune" and ingested.test_n == 120
    assert ingested.test_ci_low == pytest.approx(row["test_ci_low"])
    assert json.loads(res.row_json.read_text()) == row

    c = MlflowClient(run.uri)
    info = c.get_run(run.run_id)
    assert info.info.status == "FINISHED"
    val = {m.step: m.value for m in c.get_metric_history(run.run_id, "val_top1")}
    assert sorted(val) == [1, 2, 3, 4]
    best = max(val.values())
    assert chosen.val_top1 == pytest.approx(best) == pytest.approx(row["val_top1"])
    assert chosen.epoch == min(e for e, v in val.items() if v == best)
    assert len(c.get_metric_history(run.run_id, "train_loss")) == 4
    assert info.data.metrics["test_top1"] == pytest.approx(row["test_top1"])
    assert info.data.params["encoder.kind"] == "random_init"
