"""Each loss against its formula computed by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import LossConfig, ModelConfig
from pipeline.objective import (
    discriminator_loss,
    generator_loss,
    reconstruction_loss,
    region,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_region_crops_the_centre_half_or_keeps_the_full_image():
    t = torch.arange(2 * 1 * 32 * 32, dtype=torch.float32).reshape(2, 1, 32, 32)
    c = region(t, ModelConfig(image_size=32))
    assert c.shape == (2, 1, 16, 16)
    assert c[0, 0, 0, 0] == t[0, 0, 8, 8] and c[1, 0, 15, 15] == t[1, 0, 23, 23]
    assert region(t, ModelConfig(image_size=32, full_image_output=True)) is t
    with pytest.raises(ValueError, match="image_size"):
        region(t, ModelConfig(image_size=64))


def test_centre_l2_weights_the_visible_ring_ten_times():
    # 4x4 target, interior 2x2 dropped (mask 1), ring visible (mask 0), weight 10.
    pred = torch.zeros(1, 1, 4, 4)
    target = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4) / 16
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 1:3] = 1
    by_hand = 0.0
    for i in range(4):
        for j in range(4):
            w = 1.0 if 1 <= i <= 2 and 1 <= j <= 2 else 10.0
            by_hand += w * (target[0, 0, i, j].item() ** 2)
    by_hand /= 16  # mean over all elements, as the released code
    got = reconstruction_loss(pred, target, mask, LossConfig(), centre=True)
    assert got.item() == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("visible_weight", [0.0, 0.25])
def test_random_mask_l2_covers_dropped_pixels_with_optional_visible_weight(visible_weight):
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    mask = (torch.rand(2, 1, 5, 5) < 0.3).float()
    by_hand = 0.0
    for b in range(2):
        for c in range(3):
            for i in range(5):
                for j in range(5):
                    w = 1.0 if mask[b, 0, i, j] else visible_weight
                    by_hand += w * (pred[b, c, i, j] - target[b, c, i, j]).item() ** 2
    by_hand /= 2 * 3 * 5 * 5
    loss = LossConfig(visible_weight=visible_weight)
    got = reconstruction_loss(pred, target, mask, loss, centre=False)
    assert got.item() == pytest.approx(by_hand, rel=1e-5)


def test_reconstruction_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        reconstruction_loss(
            torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 4, 4),
            LossConfig(), centre=True,
        )  # fmt: skip


def test_generator_loss_is_joint_with_each_weight_applied_once():
    pred, target = torch.full((1, 1, 2, 2), 0.5), torch.zeros(1, 1, 2, 2)
    mask = torch.ones(1, 1, 2, 2)  # all dropped: rec = 0.25
    logits = torch.tensor([0.3, -1.2])
    adv_by_hand = -(math.log(sigmoid(0.3)) + math.log(sigmoid(-1.2))) / 2  # non-saturating
    loss = LossConfig(lambda_rec=0.999, lambda_adv=0.001)
    out = generator_loss(pred, target, mask, loss, centre=True, fake_logits=logits)
    assert out["loss_rec"].item() == pytest.approx(0.25)
    assert out["loss_adv"].item() == pytest.approx(adv_by_hand, rel=1e-6)
    assert out["loss_g"].item() == pytest.approx(0.999 * 0.25 + 0.001 * adv_by_hand, rel=1e-6)


def test_generator_loss_without_adversary_needs_no_logits():
    pred, target, mask = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    out = generator_loss(pred, target, mask, LossConfig(lambda_rec=0.5, lambda_adv=0.0), True)
    assert set(out) == {"loss_g", "loss_rec"}
    assert out["loss_g"].item() == pytest.approx(0.5)  # 0.5 * 1.0, not 0.5 * 0.5 * 1.0
    with pytest.raises(ValueError, match="fake_logits"):
        generator_loss(pred, target, mask, LossConfig(), True, fake_logits=None)


def test_discriminator_loss_by_hand():
    real, fake = torch.tensor([2.0, -0.5]), torch.tensor([0.1, -3.0])
    out = discriminator_loss(real, fake)
    d_real = -(math.log(sigmoid(2.0)) + math.log(sigmoid(-0.5))) / 2
    d_fake = -(math.log(1 - sigmoid(0.1)) + math.log(1 - sigmoid(-3.0))) / 2
    assert out["loss_d_real"].item() == pytest.approx(d_real, rel=1e-6)
    assert out["loss_d_fake"].item() == pytest.approx(d_fake, rel=1e-6)
    assert out["loss_d"].item() == pytest.approx(d_real + d_fake, rel=1e-6)
    assert out["d_x"].item() == pytest.approx((sigmoid(2.0) + sigmoid(-0.5)) / 2, rel=1e-6)
    assert out["d_g_z"].item() == pytest.approx((sigmoid(0.1) + sigmoid(-3.0)) / 2, rel=1e-6)


def test_losses_stay_finite_and_fp32_for_extreme_bf16_logits():
    # A sigmoid + BCELoss pipeline gives log(0) = -inf here; BCE-with-logits does not.
    real = torch.tensor([-200.0, 150.0], dtype=torch.bfloat16)
    fake = torch.tensor([300.0, -90.0], dtype=torch.bfloat16)
    out = discriminator_loss(real, fake)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    assert out["loss_d_real"].item() == pytest.approx(100.0, rel=1e-2)  # (200 + 0) / 2
    g = generator_loss(
        torch.zeros(1, 3, 2, 2, dtype=torch.bfloat16), torch.zeros(1, 3, 2, 2),
        torch.ones(1, 1, 2, 2), LossConfig(), True, fake_logits=fake,
    )  # fmt: skip
    assert torch.isfinite(g["loss_g"]) and g["loss_adv"].item() == pytest.approx(45.0, rel=1e-2)


def _hole_batch():
    """A small full-image-output D, and a batch with a rectangular hole: (d, target, mask, pred)."""
    from pipeline.model import build_discriminator

    torch.manual_seed(0)
    model = ModelConfig(image_size=32, width=8, bottleneck=16, full_image_output=True)
    d = build_discriminator(model)
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 4:14, 10:25] = 1
    pred = torch.randn(2, 3, 32, 32, requires_grad=True)
    return d, target, mask, pred


def _adversarial_grad(d, fake, pred, target, mask) -> torch.Tensor:
    """d(loss_adv) / d(pred) when D judges `fake`."""
    adv = generator_loss(pred, target, mask, LossConfig(lambda_rec=0.0, lambda_adv=1.0),
                         centre=False, fake_logits=d(fake))["loss_adv"]  # fmt: skip
    (grad,) = torch.autograd.grad(adv, pred)
    return grad


def test_random_mask_discriminator_sees_real_context_and_pushes_only_the_hole():
    # Full-image output: D judges pred * m + image * (1 - m) (released train_random.lua), so its
    # input equals the real image outside the hole, and the adversarial gradient reaches the
    # prediction inside the hole and nowhere else.
    from pipeline.objective import discriminator_input

    d, target, mask, pred = _hole_batch()
    fake = discriminator_input(pred, target, mask, centre=False)
    assert torch.equal(fake.detach()[:, :, mask[0, 0] == 0], target[:, :, mask[0, 0] == 0])
    assert torch.equal(fake.detach()[:, :, mask[0, 0] == 1], pred.detach()[:, :, mask[0, 0] == 1])
    grad = _adversarial_grad(d, fake, pred, target, mask)
    hole = mask.expand_as(grad).bool()
    assert grad[~hole].abs().max() == 0
    assert grad[hole].abs().gt(0).float().mean() > 0.9


def test_centre_discriminator_judges_the_predicted_square_itself():
    from pipeline.objective import discriminator_input

    pred, target = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 1:15, 1:15] = 1
    assert discriminator_input(pred, target, mask, centre=True) is pred


def test_released_random_variant_d_sees_raw_output_and_l2_covers_the_whole_image():
    # loss.discriminator_input=prediction + loss.visible_weight=1: train_random.lua's objective.
    # D judges G's raw output, so the adversarial gradient also reaches the visible pixels, and
    # the L2 is torch's plain MSE over every pixel (the release's nn.MSECriterion).
    from pipeline.config import load_config
    from pipeline.objective import discriminator_input

    cfg = load_config(None, ["loss.discriminator_input=prediction", "loss.visible_weight=1"])
    assert cfg.loss.discriminator_input == "prediction"
    d, target, mask, pred = _hole_batch()
    fake = discriminator_input(pred, target, mask, centre=False, mode="prediction")
    assert fake is pred
    grad = _adversarial_grad(d, fake, pred, target, mask)
    assert grad[~mask.expand_as(grad).bool()].abs().gt(0).float().mean() > 0.9
    rec = reconstruction_loss(pred, target, mask, cfg.loss, centre=False)
    assert rec.item() == pytest.approx(torch.nn.functional.mse_loss(pred, target).item())
    # The centre mask hands D the predicted square whatever the mode.
    assert discriminator_input(pred, target, mask, centre=True, mode="pasted") is pred
    with pytest.raises(ValueError, match="is not one of"):
        load_config(None, ["loss.discriminator_input=raw"])
