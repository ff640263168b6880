"""Inpainting metrics against a hand computation on tiny images."""

from __future__ import annotations

import math

import pytest
import torch

from evaluation.inpainting import evaluate_inpainting, inpainting_metrics


def to_pm1(x01: torch.Tensor) -> torch.Tensor:
    return x01 * 2 - 1


def tiny_case():
    """Two 2x2 images. Image 0 drops 2 pixels, image 1 drops 1; visible pixels carry big
    errors that must not count."""
    truth = torch.zeros(2, 3, 2, 2)
    pred = torch.zeros(2, 3, 2, 2)
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, 0, 0, :] = 1  # image 0: top row dropped
    pred[0, :, 0, 0] = 0.5  # error 0.5 on 3 channels
    pred[0, :, 0, 1] = 0.25  # error 0.25 on 3 channels
    mask[1, 0, 1, 1] = 1  # image 1: one pixel dropped
    pred[1, :, 1, 1] = 0.1  # error 0.1 on 3 channels
    pred[:, :, 1, 0] = 1.0  # visible everywhere: ignored
    return to_pm1(pred), to_pm1(truth), mask


def test_metrics_match_hand_computation():
    pred, truth, mask = tiny_case()
    m = inpainting_metrics(pred, truth, mask)
    # 9 dropped pixel-channels: 3 x 0.5, 3 x 0.25, 3 x 0.1.
    assert m["inpaint_l1"] == pytest.approx(3 * (0.5 + 0.25 + 0.1) / 9)
    assert m["inpaint_l2"] == pytest.approx(3 * (0.25 + 0.0625 + 0.01) / 9)
    mse0, mse1 = (0.25 + 0.0625) / 2, 0.01  # 0.15625 -> 8.0618 dB, 0.01 -> 20 dB
    psnr = (10 * math.log10(1 / mse0) + 10 * math.log10(1 / mse1)) / 2
    assert m["inpaint_psnr"] == pytest.approx(psnr)
    assert m["inpaint_psnr"] == pytest.approx((8.0618 + 20.0) / 2, abs=1e-3)


def test_streaming_drops_padding_and_scores_the_fill_baseline():
    pred, truth, mask = tiny_case()
    fill = to_pm1(torch.full_like(truth, 0.5))  # the masked input: 0.5 grey at every pixel
    batch = {
        "image": torch.cat([truth, truth[:1]]),
        "input": torch.cat([fill, fill[:1]]),
        "mask": torch.cat([mask, mask[:1]]),
        "valid": torch.tensor([True, True, False]),  # a padding repeat that must not count
    }
    preds = torch.cat([pred, torch.ones_like(pred[:1])])
    model, base, grid = evaluate_inpainting([batch], lambda b: preds, grid_rows=4)
    assert model == pytest.approx(inpainting_metrics(pred, truth, mask))
    assert base["inpaint_l1"] == pytest.approx(0.5)
    assert base["inpaint_l2"] == pytest.approx(0.25)
    assert base["inpaint_psnr"] == pytest.approx(10 * math.log10(4))
    # 2 valid rows x 3 panels of 2x2 with 2 px padding.
    assert grid.size == (3 * 4 + 2, 2 * 4 + 2)


def test_perfect_prediction_has_zero_error_and_finite_psnr():
    _, truth, mask = tiny_case()
    m = inpainting_metrics(truth, truth, mask)
    assert m["inpaint_l1"] == 0 and m["inpaint_l2"] == 0
    assert m["inpaint_psnr"] == pytest.approx(100.0)


def test_no_dropped_pixels_is_an_error():
    _, truth, mask = tiny_case()
    with pytest.raises(ValueError, match="no dropped pixels"):
        inpainting_metrics(truth, truth, torch.zeros_like(mask))
