"""Trainer, fit loop and checkpoints on hand-made batches; exact resume and a short learning
run on the real CIFAR-10 shards through pipeline.data.build_loader."""

from __future__ import annotations

import dataclasses
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoint import (
    load_checkpoint,
    load_generator,
    save_checkpoint,
    save_encoder,
)
from pipeline.config import (
    Config,
    DataConfig,
    LossConfig,
    MaskConfig,
    ModelConfig,
    TrainConfig,
    to_dict,
)
from pipeline.trainer import Trainer, fit, inpaint

S = 32  # tiny images keep every test here well under a second per step


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides) -> Config:
    sections = {
        "data": DataConfig(image_size=S, batch_size=4),
        "model": ModelConfig(image_size=S, width=8, bottleneck=16),
        "train": TrainConfig(max_steps=4, log_every=2, checkpoint_every=3),
    }
    sections.update(overrides)
    return Config(**sections)


def make_batch(b: int = 4, seed: int = 0, full: bool = False) -> dict:
    """Centre mask (inner 14x14 of the 16-px target: 1-px ring) or a random block mask."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, S, S, generator=gen) * 2 - 1
    mask = torch.zeros(b, 1, S, S)
    if full:
        mask[..., 4:14, 10:25] = 1
    else:
        mask[..., 9:23, 9:23] = 1
    fill = torch.tensor([117, 104, 123]).view(1, 3, 1, 1) / 255 * 2 - 1
    return {
        "image": image,
        "input": image * (1 - mask) + fill * mask,
        "mask": mask,
        "valid": torch.ones(b, dtype=torch.bool),
        "skipped": 0,
    }


class ListLoader:
    """A loader like build_loader's: batches start..n-1 of the epoch, len() = n - start."""

    def __init__(self, epoch: int, start: int, n: int = 3):
        self.epoch, self.start, self.n = epoch, start, n

    def __len__(self) -> int:
        return self.n - self.start

    def __iter__(self):
        for j in range(self.start, self.n):
            batch = make_batch(seed=100 * self.epoch + j)
            batch["skipped"] = 1
            yield batch


def params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module) -> bool:
    return all(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_train_step_updates_d_then_g_and_reports_every_part():
    t = Trainer(tiny_config())
    g0, d0 = params(t.g), params(t.d)
    out = t.train_step(make_batch())
    assert set(out) == {
        "loss_g", "loss_rec", "loss_adv", "loss_d", "loss_d_real", "loss_d_fake", "d_x", "d_g_z",
    }  # fmt: skip
    assert all(isinstance(v, float) for v in out.values())
    assert out["loss_g"] == pytest.approx(0.999 * out["loss_rec"] + 0.001 * out["loss_adv"])
    assert out["loss_d"] == pytest.approx(out["loss_d_real"] + out["loss_d_fake"])
    assert 0 < out["d_x"] < 1 and 0 < out["d_g_z"] < 1
    assert changed(g0, t.g) and changed(d0, t.d)
    assert t.step == 1
    assert all(p.requires_grad for p in t.d.parameters())  # restored after the G step


def test_g_step_leaves_d_gradients_from_the_d_step_only():
    t = Trainer(tiny_config())
    batch = make_batch()
    t.train_step(batch)
    d_grads = [p.grad.clone() for p in t.d.parameters()]
    # The G step runs D with requires_grad off: another G step must leave D's .grad (from
    # the D step) exactly as it was.
    pred = t.g(batch["input"])
    t._g_step(pred, batch["image"][..., 8:24, 8:24], batch["mask"][..., 8:24, 8:24])
    assert all(torch.equal(a, p.grad) for a, p in zip(d_grads, t.d.parameters(), strict=True))


def test_lambda_adv_zero_builds_and_runs_no_discriminator():
    t = Trainer(tiny_config(loss=LossConfig(lambda_adv=0.0, lambda_rec=1.0)))
    assert t.d is None and t.d_model is None and t.opt_d is None
    out = t.train_step(make_batch())
    assert set(out) == {"loss_g", "loss_rec"} and out["loss_g"] == pytest.approx(out["loss_rec"])
    state = t.state_dict()
    assert state["discriminator"] is None and state["opt_d"] is None


def test_full_image_variant_trains_on_random_masks():
    cfg = tiny_config(
        mask=MaskConfig(kind="random_block"),
        model=ModelConfig(image_size=S, width=8, bottleneck=16, full_image_output=True),
        loss=LossConfig(visible_weight=0.1),
    )
    t = Trainer(cfg)
    out = t.train_step(make_batch(full=True))
    assert out["loss_rec"] > 0 and torch.isfinite(torch.tensor(out["loss_g"]))


@pytest.mark.parametrize("precision,channels_last", [("bf16", False), ("bf16", True)])
def test_bf16_autocast_and_channels_last_train(precision, channels_last):
    t = Trainer(tiny_config(train=TrainConfig(precision=precision, channels_last=channels_last)))
    first = t.train_step(make_batch())
    for _ in range(3):
        last = t.train_step(make_batch())
    assert all(p.dtype == torch.float32 for p in t.g.parameters())  # master weights stay fp32
    assert last["loss_rec"] < first["loss_rec"]  # same batch: it fits


@pytest.mark.slow
def test_torch_compile_trains_like_eager():
    # fp32 on every machine: `auto` would pick bf16 where it is native, whose rounding differs
    # between the fused (compiled) and eager kernels by more than this comparison allows.
    fp32 = {"precision": "fp32", "channels_last": False}
    eager = Trainer(tiny_config(train=TrainConfig(**fp32)))
    compiled = Trainer(tiny_config(train=TrainConfig(compile=True, **fp32)))
    for seed in range(3):  # the G step's frozen D is a second graph: both get exercised
        a, b = eager.train_step(make_batch(seed=seed)), compiled.train_step(make_batch(seed=seed))
    for key in ("loss_rec", "loss_d", "loss_g"):
        assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5)


def test_non_finite_loss_names_the_step_and_the_part():
    t = Trainer(tiny_config())
    t.train_step(make_batch())
    bad = make_batch()
    bad["image"][0, 0, 12, 12] = float("nan")  # inside the target: L2 and D(real) go NaN
    with pytest.raises(FloatingPointError, match=r"step 2: .*loss_d_real=nan"):
        t.train_step(bad)


def test_inpaint_pastes_the_prediction_only_where_dropped():
    cfg = tiny_config()
    t = Trainer(cfg)
    batch = make_batch()
    t.g.eval()
    out = inpaint(t.g, batch, cfg.model)
    pred = t.g(batch["input"]).detach()
    visible = batch["mask"].expand_as(out) == 0
    assert torch.equal(out[visible], batch["input"][visible])
    torch.testing.assert_close(out[..., 9:23, 9:23], pred[..., 1:15, 1:15])


def test_evaluate_reports_masked_l2_and_the_fill_baseline_on_valid_samples():
    t = Trainer(tiny_config())
    batch = make_batch()
    batch["valid"][1] = False
    batch["image"][1] = 100.0  # a padding repeat: must not count
    got = t.evaluate([batch])
    keep = batch["valid"]
    m = batch["mask"][keep]
    by_hand = (m * (batch["input"][keep] - batch["image"][keep]) ** 2).sum() / (m.sum() * 3)
    assert got["val_fill_l2"] == pytest.approx(float(by_hand), rel=1e-5)
    assert got["val_images"] == 3
    assert 0 < got["val_rec_l2"] < 10
    assert t.g.training  # back to train mode


def test_fit_logs_checkpoints_and_rolls_epochs():
    t = Trainer(tiny_config(train=TrainConfig(max_steps=7, log_every=2, checkpoint_every=3)))
    logs, ckpts, calls = [], [], []

    def loader_for_epoch(epoch, start):
        calls.append((epoch, start))
        return ListLoader(epoch, start)

    fit(t, loader_for_epoch, on_log=logs.append, on_checkpoint=lambda tr: ckpts.append(
        (tr.step, tr.epoch, tr.batch_in_epoch)))  # fmt: skip
    assert [m["step"] for m in logs] == [2, 4, 6]
    assert [m["skipped"] for m in logs] == [2, 2, 2]  # one skipped sample per batch
    assert all(m["images_per_s"] > 0 and "loss_g" in m for m in logs)
    # 3 batches an epoch: the checkpoint at step 3 already points at epoch 1, batch 0.
    assert ckpts == [(3, 1, 0), (6, 2, 0), (7, 2, 1)]
    assert calls == [(0, 0), (1, 0), (2, 0)]
    # Resuming mid-epoch asks the loader for the rest of that epoch.
    t2 = Trainer(tiny_config(train=TrainConfig(max_steps=8)))
    t2.load_state_dict(t.state_dict())
    calls.clear()
    fit(t2, loader_for_epoch)
    assert calls == [(2, 1)] and (t2.step, t2.epoch, t2.batch_in_epoch) == (8, 2, 2)


def test_fit_measures_the_wait_for_each_batch():
    """A loader that takes a known 0.15 s per batch: data_wait_s is that time, and
    data_wait_frac its share of the whole step (wait + the measured train step)."""
    import time

    class SlowLoader(ListLoader):
        def __iter__(self):
            for batch in super().__iter__():
                time.sleep(0.15)
                yield batch

    t = Trainer(tiny_config(train=TrainConfig(max_steps=4, log_every=2, checkpoint_every=4)))
    logs, steps = [], []
    real_step = t.train_step

    def timed_step(batch):  # the train step's own time, measured from outside fit
        t0 = time.perf_counter()
        out = real_step(batch)
        steps.append(time.perf_counter() - t0)
        return out

    t.train_step = timed_step
    fit(t, lambda e, s: SlowLoader(e, s, n=4), on_log=logs.append)
    assert [m["step"] for m in logs] == [2, 4]
    for i, m in enumerate(logs):
        compute = sum(steps[2 * i : 2 * i + 2]) / 2
        assert 0.15 <= m["data_wait_s"] < 0.15 + 0.05  # the sleep, plus a batch's own cost
        expected = m["data_wait_s"] / (m["data_wait_s"] + compute)
        assert m["data_wait_frac"] == pytest.approx(expected, abs=0.02)
    # And a loader that never waits: a share near zero.
    t2 = Trainer(tiny_config(train=TrainConfig(max_steps=4, log_every=2, checkpoint_every=4)))
    fast = []
    fit(t2, lambda e, s: [make_batch(seed=j) for j in range(s, 4)], on_log=fast.append)
    assert all(m["data_wait_s"] < 0.01 and m["data_wait_frac"] < 0.2 for m in fast)


def test_fit_rejects_an_empty_loader():
    t = Trainer(tiny_config())
    with pytest.raises(ValueError, match="has 0 batches"):
        fit(t, lambda e, s: ListLoader(e, s, n=0))


def test_checkpoint_round_trip_is_atomic_and_weights_only(tmp_path: Path):
    t = Trainer(tiny_config())
    t.train_step(make_batch())
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, t.state_dict())
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left
    state = load_checkpoint(path)  # torch.load(weights_only=True) inside
    assert state["step"] == 1 and state["config"] == to_dict(t.cfg)
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    t2 = Trainer(tiny_config())
    t2.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(t.g.parameters(), t2.g.parameters(), strict=True))
    assert t2.opt_d.state_dict()["state"][0]["step"] == 1


def test_failed_write_keeps_the_previous_checkpoint(tmp_path: Path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(Exception):  # noqa: B017 - any pickling error
        save_checkpoint(path, {"step": 2, "bad": lambda: None})
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_load_generator_from_checkpoint_and_encoder_file(tmp_path: Path):
    t = Trainer(tiny_config())
    t.train_step(make_batch())
    save_checkpoint(tmp_path / "train.pt", t.state_dict())
    save_encoder(tmp_path / "enc.pt", t.g, t.cfg)
    x = make_batch()["input"]
    t.g.eval()
    for name in ("train.pt", "enc.pt"):
        g, cfg = load_generator(tmp_path / name)
        assert cfg == t.cfg and not g.training
        torch.testing.assert_close(g(x), t.g(x))


def test_load_generator_errors_name_the_file_and_the_architecture(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_generator(tmp_path / "missing.pt")
    t = Trainer(tiny_config())
    state = {"config": to_dict(t.cfg), "generator": t.g.state_dict()}
    state["config"]["model"]["bottleneck"] = 32  # the weights were built for 16
    save_checkpoint(tmp_path / "bad.pt", state)
    with pytest.raises(RuntimeError, match=r"bad\.pt.*bottleneck=32"):
        load_generator(tmp_path / "bad.pt")
    other = Trainer(tiny_config(model=ModelConfig(image_size=S, width=16, bottleneck=16)))
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict(t.state_dict())


# ---- on the real CIFAR-10 shards ------------------------------------------------------------


def cifar_config(train_shards: str, val_shards: str, **train) -> Config:
    data = DataConfig(
        train_shards=train_shards, val_shards=val_shards, image_size=S, batch_size=32,
        shuffle_buffer=200, num_workers=0,
    )  # fmt: skip
    return Config(
        data=data,
        model=ModelConfig(image_size=S, width=16, bottleneck=64),
        train=dataclasses.replace(TrainConfig(log_every=1000, checkpoint_every=1000), **train),
    )


def train_loader(cfg: Config):
    from pipeline.data import build_loader

    def loader_for_epoch(epoch: int, start_batch: int):
        return build_loader(
            cfg.data, cfg.mask, urls=cfg.data.train_shards, train=True, epoch=epoch,
            seed=cfg.train.seed, start_batch=start_batch,
        )  # fmt: skip

    return loader_for_epoch


def write_shards(root: Path, n_shards: int = 2, per_shard: int = 10) -> str:
    """Real PNG tar shards (smooth colour gradients) written with webdataset."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:S, 0:S] / S
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"toy-{s:06d}.tar")) as w:
            for i in range(per_shard):
                a, b, c = rng.uniform(0, 255, size=(3, 3))
                img = np.stack([a[k] * yy + b[k] * xx + c[k] * (1 - xx) for k in range(3)], -1)
                buf = io.BytesIO()
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
                w.write({"__key__": f"s{s}_{i:03d}", "png": buf.getvalue(), "cls": str(i % 3)})
    last = f"{n_shards - 1:06d}"
    return str(root / ("toy-{000000.." + last + "}.tar"))


def test_exact_resume_matches_an_uninterrupted_run(tmp_path: Path):
    # 20 samples, batch 4: 5 steps an epoch; 8 steps cross an epoch boundary after the resume
    # at step 3 (mid-epoch, start_batch 3).
    shards = write_shards(tmp_path)
    cfg = cifar_config(shards, shards, max_steps=8)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=4))
    straight = fit(Trainer(cfg), train_loader(cfg))
    half_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=3))
    first = fit(Trainer(half_cfg), train_loader(half_cfg))
    save_checkpoint(tmp_path / "half.pt", first.state_dict())
    resumed = Trainer(cfg)
    resumed.load_state_dict(load_checkpoint(tmp_path / "half.pt"))
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (3, 0, 3)
    fit(resumed, train_loader(cfg))
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (8, 1, 3)
    assert (straight.epoch, straight.batch_in_epoch) == (1, 3)
    for name in ("generator", "discriminator", "opt_g", "opt_d"):
        a, b = straight.state_dict()[name], resumed.state_dict()[name]
        flat_a, flat_b = _tensors(a), _tensors(b)
        assert len(flat_a) == len(flat_b) > 0
        assert all(torch.equal(x, y) for x, y in zip(flat_a, flat_b, strict=True)), name
    # ... and different from a run that saw other data, so the equality means something.
    assert not torch.equal(
        straight.g.encoder["conv1"][0].weight, first.g.encoder["conv1"][0].weight
    )


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in _tensors(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


@pytest.mark.cifar
def test_short_cifar_run_beats_its_start_and_the_mean_fill(cifar_train: str, cifar_test: str):
    from pipeline.data import build_loader

    # auto: bf16 where it is native, fp32 where bf16 would be emulated (~30x slower there).
    cfg = cifar_config(cifar_train, cifar_test, max_steps=200, precision="auto",
                       channels_last="auto")  # fmt: skip
    held_out = build_loader(cfg.data, cfg.mask, urls=cifar_test, train=False, seed=0)
    val = list(itertools.islice(held_out, 8))  # 256 images, the same masks at both evaluations
    trainer = Trainer(cfg)
    before = trainer.evaluate(val)
    fit(trainer, train_loader(cfg))
    after = trainer.evaluate(val)
    assert after["val_fill_l2"] == pytest.approx(before["val_fill_l2"])
    # Seen here: 0.216 -> 0.121 in 200 steps of 32 (~10 s), against a fill baseline of 0.214.
    assert after["val_rec_l2"] < 0.7 * before["val_rec_l2"]
    assert after["val_rec_l2"] < 0.7 * after["val_fill_l2"]


def test_random_mask_trainer_hands_d_the_prediction_pasted_into_the_real_image():
    cfg = tiny_config(model=ModelConfig(image_size=S, width=8, bottleneck=16,
                                        full_image_output=True))  # fmt: skip
    trainer = Trainer(cfg)
    seen: list[torch.Tensor] = []
    trainer.d.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    batch = make_batch(full=True)
    trainer.train_step(batch)
    real, fake_d, fake_g = seen  # D step (real, fake), then the G step's fake
    visible = batch["mask"].expand_as(real) == 0
    assert torch.equal(real, batch["image"])
    for fake in (fake_d, fake_g):
        assert torch.equal(fake[visible], batch["image"][visible])
        assert not torch.equal(fake[~visible], batch["image"][~visible])


@pytest.mark.parametrize(("lambda_adv", "lr_g", "expected"),
                         [(0.001, 0.0, 2e-3), (0.0, 0.0, 2e-4), (0.0, 5e-4, 5e-4)])  # fmt: skip
def test_generator_lr_is_10x_only_with_the_adversarial_loss(lambda_adv, lr_g, expected):
    cfg = tiny_config(
        loss=LossConfig(lambda_adv=lambda_adv),
        train=TrainConfig(lr_d=2e-4, lr_g=lr_g, max_steps=4),
    )
    trainer = Trainer(cfg)
    assert trainer.opt_g.param_groups[0]["lr"] == pytest.approx(expected)
    assert (trainer.d is None) == (lambda_adv == 0)
