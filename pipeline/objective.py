"""The Context Encoder objective: masked L2 + adversarial loss, as pure functions on tensors.

    L_G = lambda_rec * L_rec + lambda_adv * L_adv        (each weight applied exactly once)
    L_D = BCE(D(x), 1) + BCE(D(G(z)), 0)                   (the released code's errD, unweighted)

The discriminator returns logits; every sigmoid lives here inside BCE-with-logits (numerically
safe, and safe under bf16 autocast since the losses are computed in fp32). The generator's
adversarial term is the non-saturating form: -log sigma(D(G(z))), i.e. BCE(D(G(z)), 1).
Losses come back as dicts of 0-d tensors so logging never recomputes them. No collectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import LossConfig, ModelConfig, target_size


def region(t: Tensor, model: ModelConfig) -> Tensor:
    """Crop (B, C, S, S) to the square the generator predicts: the centre T x T (a view), or
    `t` itself when the model outputs the full image."""
    s, side = t.shape[-1], target_size(model)
    if s != model.image_size:
        raise ValueError(f"region: tensor side {s} != model.image_size {model.image_size}")
    if side == s:
        return t
    lo = (s - side) // 2
    return t[..., lo : lo + side, lo : lo + side]


def discriminator_input(
    pred: Tensor, target: Tensor, mask: Tensor, centre: bool, mode: str = "pasted"
) -> Tensor:
    """What D judges as "fake" (`loss.discriminator_input`). Centre: the predicted square itself
    (the released code), whatever `mode`. Full-image output (random masks):

    - "pasted" (default): the prediction pasted into the real image, pred * m + target * (1 - m).
      D's input then differs from a real image only inside the hole, so the adversarial gradient
      reaches G's dropped pixels and never the visible ones, which no loss constrains at the
      default `visible_weight` = 0 and which `inpaint` replaces with the real context anyway.
    - "prediction": G's raw output, as the released `train_random.lua` hands D (`input_center:
      copy(fake)`). D may then tell fakes by their visible pixels too; the release pairs it with
      an L2 over the whole image (`visible_weight` = 1) that keeps those close to the input.

    pred/target (B, 3, h, w), mask (B, 1, h, w) with 1 = dropped; the pasted result is float32
    when pred is bf16 (type promotion), like the real images D sees."""
    if centre or mode == "prediction":
        return pred
    if mode != "pasted":
        raise ValueError(f"discriminator_input: mode {mode!r} is not 'pasted' or 'prediction'")
    m = mask.to(target.dtype)
    return pred * m + target * (1.0 - m)


def l2_weights(mask: Tensor, loss: LossConfig, centre: bool) -> Tensor:
    """Per-pixel L2 weight from a (B, 1, h, w) mask (1 = dropped). Centre: the cropped mask is
    1 on the interior and 0 on the visible ring, so mask + overlap_weight * (1 - mask) weights
    the ring 10x (the released code). Random masks: dropped pixels 1, visible visible_weight."""
    other = loss.overlap_weight if centre else loss.visible_weight
    return mask + other * (1.0 - mask)


def reconstruction_loss(
    pred: Tensor, target: Tensor, mask: Tensor, loss: LossConfig, centre: bool
) -> Tensor:
    """Weighted squared error mean(w * (pred - target)^2) over all B*C*h*w elements: the
    discretised || M (x - F(...)) ||^2 with the released code's normalisation (a plain mean,
    not divided by the weight sum). pred/target (B, 3, h, w), mask (B, 1, h, w)."""
    if pred.shape != target.shape or mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(
            f"reconstruction_loss: pred {tuple(pred.shape)}, target {tuple(target.shape)}, "
            f"mask {tuple(mask.shape)} do not match"
        )
    diff = pred.float() - target.float()
    return (l2_weights(mask.float(), loss, centre) * diff.square()).mean()


def generator_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor,
    loss: LossConfig,
    centre: bool,
    fake_logits: Tensor | None = None,
) -> dict[str, Tensor]:
    """{"loss_g": lambda_rec * rec + lambda_adv * adv, "loss_rec": rec, "loss_adv": adv}.
    `fake_logits` = D(G(z)) (B,), required when lambda_adv > 0 and ignored otherwise (no
    "loss_adv" key then: no discriminator exists)."""
    rec = reconstruction_loss(pred, target, mask, loss, centre)
    out = {"loss_rec": rec}
    total = loss.lambda_rec * rec
    if loss.lambda_adv > 0:
        if fake_logits is None:
            raise ValueError("generator_loss: lambda_adv > 0 needs fake_logits from D")
        logits = fake_logits.float()
        adv = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        out["loss_adv"] = adv
        total = total + loss.lambda_adv * adv
    out["loss_g"] = total
    return out


def discriminator_real_loss(real_logits: Tensor) -> dict[str, Tensor]:
    """{"loss_d_real": BCE(D(x), 1), "d_x": mean sigma(D(x))} from logits (B,). Split from
    the fake half so a trainer can run forward + backward per half (DDP-safe)."""
    real = real_logits.float()
    return {
        "loss_d_real": F.binary_cross_entropy_with_logits(real, torch.ones_like(real)),
        "d_x": torch.sigmoid(real.detach()).mean(),
    }


def discriminator_fake_loss(fake_logits: Tensor) -> dict[str, Tensor]:
    """{"loss_d_fake": BCE(D(G(z)), 0), "d_g_z": mean sigma(D(G(z)))} from logits (B,) of a
    detached generator output."""
    fake = fake_logits.float()
    return {
        "loss_d_fake": F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)),
        "d_g_z": torch.sigmoid(fake.detach()).mean(),
    }


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> dict[str, Tensor]:
    """{"loss_d": real + fake, "loss_d_real", "loss_d_fake", "d_x", "d_g_z"}: both halves
    above; the sum is unweighted, as the released code's errD."""
    out = {**discriminator_real_loss(real_logits), **discriminator_fake_loss(fake_logits)}
    out["loss_d"] = out["loss_d_real"] + out["loss_d_fake"]
    return out
