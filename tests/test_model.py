"""Generator / discriminator: exact paper sizes, shapes across the config family, the
channel-wise FC of the AlexNet variant, encode() and the init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig, target_size
from pipeline.model import (
    ChannelwiseFC,
    DenseConv2d,
    DenseConvTranspose2d,
    build_discriminator,
    build_generator,
    stage_channels,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_paper_configuration_has_the_papers_parameter_counts():
    cfg = ModelConfig()  # 128 px, 64-px centre, width 64, 4000-d bottleneck
    assert n_params(build_generator(cfg)) == 71_124_544
    assert n_params(build_discriminator(cfg)) == 2_765_568


def test_paper_generator_layers_are_bias_free_with_the_released_widths():
    g = build_generator(ModelConfig())
    convs = [m for m in g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert all(m.bias is None for m in convs)
    enc = [(m.in_channels, m.out_channels) for m in g.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert enc == [(3, 64), (64, 64), (64, 128), (128, 256), (256, 512), (512, 4000)]
    dec = [(m.in_channels, m.out_channels) for m in g.decoder.modules() if hasattr(m, "stride")]
    assert dec == [(4000, 512), (512, 256), (256, 128), (128, 64), (64, 3)]
    assert not isinstance(g.encoder["conv1"][1], nn.BatchNorm2d)  # no BN on the first conv


@pytest.mark.parametrize(
    "n,expected", [(3, [8, 16, 32]), (4, [8, 16, 32, 64]), (5, [8, 8, 16, 32, 64])]
)
def test_stage_channels_double_up_to_eight_times_width(n, expected):
    assert stage_channels(n, 8) == expected


@pytest.mark.parametrize("arch", ["dcgan", "alexnet"])
@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("full", [False, True])
def test_output_shapes_across_sizes(arch, size, full):
    cfg = ModelConfig(arch=arch, image_size=size, width=8, bottleneck=16, full_image_output=full)
    g, d = build_generator(cfg), build_discriminator(cfg)
    t = size if full else size // 2
    assert target_size(cfg) == t
    y = g(torch.randn(2, 3, size, size))
    assert y.shape == (2, 3, t, t)
    assert y.abs().max() <= 1.0  # Tanh output, images live in [-1, 1]
    logits = d(y)
    assert logits.shape == (2,) and torch.isfinite(logits).all()


def test_width_and_bottleneck_are_configurable():
    small = build_generator(ModelConfig(image_size=32, width=8, bottleneck=16))
    big = build_generator(ModelConfig(image_size=32, width=16, bottleneck=16))
    assert small.encoder["bottleneck"][0].out_channels == 16
    assert small.encoder["conv1"][0].out_channels == 8
    assert big.encoder["conv1"][0].out_channels == 16
    assert n_params(big) > n_params(small)


def test_non_power_of_two_size_is_a_clear_error():
    with pytest.raises(ValueError, match="power of two"):
        build_generator(ModelConfig(image_size=96))


@pytest.mark.parametrize("size,width", [(32, 16), (128, 64)])
def test_alexnet_channelwise_fc_has_m_n4_weights_plus_a_1x1_conv(size, width):
    g = build_generator(ModelConfig(arch="alexnet", image_size=size, width=width))
    m, n = g.encoder["pool5"](g.encode(torch.zeros(1, 3, size, size), ["conv5"])["conv5"]).shape[
        1:3
    ]
    cwfc, conv1x1 = g.encoder["bottleneck"][0], g.encoder["bottleneck"][3]
    assert isinstance(cwfc, ChannelwiseFC)
    assert cwfc.weight.numel() == m * n**4  # not the dense m^2 * n^4
    assert conv1x1.weight.numel() == m * m and conv1x1.kernel_size == (1, 1)
    bn = sum(n_params(x) for x in g.encoder["bottleneck"] if isinstance(x, nn.BatchNorm2d))
    assert n_params(g.encoder["bottleneck"]) == m * n**4 + m * m + bn


def test_channelwise_fc_connects_each_map_to_itself_only_like_a_grouped_conv():
    torch.manual_seed(0)
    m, n = 3, 2
    layer = ChannelwiseFC(m, n)
    x = torch.randn(4, m, n, n)
    y = layer(x)
    # The same map as a 1x1 grouped conv over (B, m*n^2, 1, 1) with groups = m.
    w = layer.weight.transpose(1, 2).reshape(m * n * n, n * n, 1, 1)
    ref = F.conv2d(x.reshape(4, m * n * n, 1, 1), w, groups=m).reshape(4, m, n, n)
    torch.testing.assert_close(y, ref)
    x2 = x.clone()
    x2[:, 1] += 1.0  # perturb channel 1 only
    changed = (layer(x2) - y).abs().amax(dim=(0, 2, 3)) > 0
    assert changed.tolist() == [False, True, False]


@pytest.mark.parametrize("channels_last", [False, True])
def test_dense_bottleneck_layers_compute_exactly_their_convolutions(channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = DenseConv2d(6, 5, 4, bias=False).to(memory_format=fmt)
    x = torch.randn(3, 6, 4, 4).contiguous(memory_format=fmt).requires_grad_()
    y = conv(x)
    ref = F.conv2d(x, conv.weight)
    torch.testing.assert_close(y, ref)
    (gx, gw), (rx, rw) = (torch.autograd.grad(v.square().sum(), [x, conv.weight]) for v in (y, ref))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    deconv = DenseConvTranspose2d(6, 5, 4, bias=False).to(memory_format=fmt)
    z = torch.randn(3, 6, 1, 1).contiguous(memory_format=fmt)
    torch.testing.assert_close(deconv(z), F.conv_transpose2d(z, deconv.weight))
    assert deconv(z).shape == (3, 5, 4, 4)


@pytest.mark.parametrize("arch", ["dcgan", "alexnet"])
def test_encode_returns_named_features_and_stops_at_the_deepest(arch):
    cfg = ModelConfig(arch=arch, image_size=32, width=8, bottleneck=16)
    g = build_generator(cfg).eval()
    assert g.feature_layers[0] == "conv1" and g.feature_layers[-1] == "bottleneck"
    ran: list[str] = []
    for name, stage in g.encoder.items():
        stage.register_forward_hook(lambda *_, name=name: ran.append(name))
    g.decoder.register_forward_hook(lambda *_: ran.append("decoder"))
    x = torch.randn(2, 3, 32, 32)
    feats = g.encode(x, ["conv2", "conv1"])
    assert ran == ["conv1", "conv2"]  # nothing deeper, no decoder
    assert set(feats) == {"conv1", "conv2"}
    assert feats["conv1"].shape[0] == 2 and feats["conv1"].dim() == 4
    # The same tensors the full forward computes on the way.
    seen = {}
    g.encoder["conv2"].register_forward_hook(lambda _m, _i, out: seen.setdefault("c2", out))
    g(x)
    torch.testing.assert_close(feats["conv2"], seen["c2"])
    with pytest.raises(ValueError, match="known"):
        g.encode(x, ["fc7"])


def test_dcgan_encode_feature_shapes_at_128():
    g = build_generator(ModelConfig(width=8, bottleneck=16)).eval()
    feats = g.encode(torch.randn(1, 3, 128, 128), g.feature_layers)
    shapes = {k: tuple(v.shape[1:]) for k, v in feats.items()}
    assert shapes == {
        "conv1": (8, 64, 64),
        "conv2": (8, 32, 32),
        "conv3": (16, 16, 16),
        "conv4": (32, 8, 8),
        "conv5": (64, 4, 4),
        "bottleneck": (16, 1, 1),
    }


def test_init_follows_method():
    torch.manual_seed(0)
    g = build_generator(ModelConfig(image_size=64, width=32, bottleneck=256))
    conv_w = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, nn.Conv2d)])
    bns = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_w = torch.cat([m.weight for m in bns])
    assert abs(conv_w.mean().item()) < 2e-3 and abs(conv_w.std().item() - 0.02) < 1e-3
    assert abs(bn_w.mean().item() - 1.0) < 5e-3 and abs(bn_w.std().item() - 0.02) < 5e-3
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in bns)
