"""Context Encoder networks: generator (encoder + decoder) and discriminator.

Pure modules: no I/O, no devices, no logging. Built from a frozen `ModelConfig`:

- arch="dcgan" (the released configuration at 128 px): a DCGAN encoder down to 512x4x4, a 4x4
  valid conv to a `bottleneck`x1x1 code, a mirrored up-convolutional decoder to the target
  square (the 64-px centre of a 128 input, or the whole image with `full_image_output`).
- arch="alexnet" (the paper's feature-learning variant): an AlexNet-style encoder to pool5
  (m x n x n), a channel-wise fully connected layer (m * n^4 weights, each map connected only
  to itself) and a 1x1 conv to mix channels, then the same kind of up-convolutional decoder.

The discriminator is a DCGAN discriminator on the target square that returns logits (the
sigmoid lives in the loss: BCE-with-logits is numerically safe and autocast-friendly).

Channel rule (both encoders' DCGAN stages and the discriminator): the first conv has `width`
channels and each later stage doubles up to 8 x width, the doubling anchored at the deepest
stage, so 128 px gives 64, 64, 128, 256, 512 (the paper) and 64 px gives DCGAN's 64..512.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import ModelConfig, target_size

LEAK = 0.2  # LeakyReLU slope of the DCGAN encoder and discriminator (the released code)
ALEXNET_CHANNELS = (96, 256, 384, 384, 256)  # AlexNet conv1..conv5 at width 64


def _log2_exact(x: int, what: str) -> int:
    """log2(x) for a power of two, else a ValueError naming `what`."""
    if x < 1 or x & (x - 1):
        raise ValueError(f"{what} must be a power of two, got {x}")
    return int(math.log2(x))


def stage_channels(n_stages: int, width: int) -> list[int]:
    """Output channels of `n_stages` stride-2 convs: width first, doubling up to 8x at the
    deepest. 5 -> [w, w, 2w, 4w, 8w]; 4 -> [w, 2w, 4w, 8w]; 3 -> [w, 2w, 4w]."""
    extra = max(0, n_stages - 4)  # stages beyond DCGAN's four stay at `width` (paper: 64, 64)
    return [width * 2 ** min(3, max(0, i - extra)) for i in range(n_stages)]


def _pairs(chans: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive (in, out) channel pairs of a chain of layers."""
    return list(zip(chans[:-1], chans[1:], strict=True))


def _down(c_in: int, c_out: int, bn: bool) -> nn.Sequential:
    """4x4 stride-2 conv (+ BN) + LeakyReLU: (B, c_in, h, w) -> (B, c_out, h/2, w/2)."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.LeakyReLU(LEAK, inplace=True))
    return nn.Sequential(*layers)


def _up(c_in: int, c_out: int, last: bool) -> nn.Sequential:
    """4x4 stride-2 transposed conv + BN + ReLU (Tanh when last): (B, c_in, h, w) -> 2h, 2w."""
    conv = nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False)
    if last:
        return nn.Sequential(conv, nn.Tanh())
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _upsampler(c_in: int, channels: Sequence[int]) -> nn.Sequential:
    """len(channels) + 1 stride-2 up-convs c_in -> channels... -> 3 (image, Tanh)."""
    chans = [c_in, *channels, 3]
    return nn.Sequential(
        *[_up(a, b, last=(i == len(chans) - 2)) for i, (a, b) in enumerate(_pairs(chans))]
    )


class DenseConv2d(nn.Conv2d):
    """A k x k valid conv applied to a k x k map (the bottleneck, D's head): (B, in, k, k) ->
    (B, out, 1, 1). The same weights and state dict as nn.Conv2d, computed as one matmul since
    that is what it is: oneDNN's conv backward for this shape runs ~5x slower than the GEMM."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != self.kernel_size or self.padding != (0, 0) or self.groups != 1:
            return super().forward(x)
        b, w = x.shape[0], self.weight
        if not w.is_contiguous():  # channels_last: (out, k, k, in) in memory, flatten that way
            w, x = w.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1)
        out = F.linear(x.reshape(b, -1), w.reshape(self.out_channels, -1), self.bias)
        return out[..., None, None]  # (B, out, 1, 1)


class DenseConvTranspose2d(nn.ConvTranspose2d):
    """A k x k transposed conv from a 1 x 1 code (the decoder's first layer): (B, in, 1, 1) ->
    (B, out, k, k), computed as one matmul for the reason given in DenseConv2d."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        plain = self.padding == (0, 0) and self.output_padding == (0, 0) and self.groups == 1
        if x.shape[-2:] != (1, 1) or not plain or self.bias is not None:
            return super().forward(x, output_size)
        (k, kw), w, b = self.kernel_size, self.weight, x.shape[0]
        if w.is_contiguous():  # (in, out, k, k)
            return (x.reshape(b, -1) @ w.reshape(w.shape[0], -1)).view(b, self.out_channels, k, kw)
        w = w.permute(0, 2, 3, 1)  # channels_last: (in, k, k, out) in memory
        out = (x.reshape(b, -1) @ w.reshape(w.shape[0], -1)).view(b, k, kw, self.out_channels)
        return out.permute(0, 3, 1, 2)  # (B, out, k, k), channels_last in memory


class ChannelwiseFC(nn.Module):
    """Each of the m feature maps (n x n) fully connected to itself only: m * n^4 weights
    instead of a dense layer's m^2 * n^4. A batched matmul over channels (a grouped conv with
    groups = m in effect). (B, m, n, n) -> (B, m, n, n)."""

    def __init__(self, channels: int, side: int):
        super().__init__()
        self.channels, self.side = channels, side
        self.weight = nn.Parameter(torch.empty(channels, side * side, side * side))
        nn.init.normal_(self.weight, 0.0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        b, m, n, _ = x.shape
        flat = x.reshape(b, m, n * n)  # (B, m, n^2)
        out = torch.einsum("bci,cio->bco", flat, self.weight.to(flat.dtype))  # (B, m, n^2)
        return out.reshape(b, m, n, n)


def _dcgan_encoder(cfg: ModelConfig) -> tuple[nn.ModuleDict, list[int]]:
    """Stages conv1..convK, bottleneck: (B, 3, S, S) -> (B, bottleneck, 1, 1)."""
    n = _log2_exact(cfg.image_size, "model.image_size") - 2  # stride-2 convs down to 4x4
    chans = stage_channels(n, cfg.width)
    stages = {
        f"conv{i + 1}": _down(c_in, c_out, bn=i > 0)  # no BN on the first conv (DCGAN)
        for i, (c_in, c_out) in enumerate(_pairs([3, *chans]))
    }
    stages["bottleneck"] = nn.Sequential(  # 4x4 valid conv: (B, 8w, 4, 4) -> (B, bottleneck, 1, 1)
        DenseConv2d(chans[-1], cfg.bottleneck, 4, 1, 0, bias=False),
        nn.BatchNorm2d(cfg.bottleneck),
        nn.LeakyReLU(LEAK, inplace=True),
    )
    return nn.ModuleDict(stages), chans


def _dcgan_decoder(cfg: ModelConfig, enc_channels: list[int]) -> nn.Sequential:
    """(B, bottleneck, 1, 1) -> (B, 3, T, T): a 4x4 up-conv to 4x4 then stride-2 up-convs,
    channels mirroring the encoder (paper: 4000 -> 512 -> 256 -> 128 -> 64 -> 3)."""
    n_up = _log2_exact(target_size(cfg), "target size") - 2
    mirror = enc_channels[::-1][:n_up]  # e.g. [512, 256, 128, 64]
    first = nn.Sequential(  # (B, bottleneck, 1, 1) -> (B, mirror[0], 4, 4)
        DenseConvTranspose2d(cfg.bottleneck, mirror[0], 4, 1, 0, bias=False),
        nn.BatchNorm2d(mirror[0]),
        nn.ReLU(inplace=True),
    )
    return nn.Sequential(first, *_upsampler(mirror[0], mirror[1:]))


def alexnet_geometry(image_size: int) -> tuple[int, int]:
    """(conv1 stride, pool5 side n). conv1's stride shrinks with the image so pool5 stays
    >= 4x4: 227 px AlexNet has stride 4 and a 6x6 pool5; here 128 -> (4, 4), 64 -> (2, 4),
    32 -> (1, 4), 256 -> (4, 8)."""
    stride = max(1, min(4, image_size // 32))
    if image_size % (8 * stride):
        raise ValueError(
            f"alexnet: model.image_size {image_size} must be divisible by {8 * stride}"
        )
    return stride, image_size // (8 * stride)


def _alexnet_encoder(cfg: ModelConfig) -> tuple[nn.ModuleDict, int, int]:
    """Stages conv1..conv5, pool5, bottleneck (channel-wise FC + 1x1 conv):
    (B, 3, S, S) -> (B, m, n, n); returns (stages, m, n)."""
    stride, n = alexnet_geometry(cfg.image_size)
    c1, c2, c3, c4, c5 = (max(1, round(c * cfg.width / 64)) for c in ALEXNET_CHANNELS)
    k1 = 2 * stride + 3  # 11 at stride 4 as in AlexNet; padding keeps S / stride exactly

    def pool() -> nn.Module:  # 3x3 stride 2 as AlexNet; padding 1 halves an even side exactly
        return nn.MaxPool2d(3, 2, 1)

    def conv(c_in: int, c_out: int, k: int, s: int = 1, p: int | None = None) -> list[nn.Module]:
        p = k // 2 if p is None else p
        return [nn.Conv2d(c_in, c_out, k, s, p, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]

    # BatchNorm after every conv (AlexNet used LRN) so Adam trains it from scratch reliably.
    stages = {
        "conv1": nn.Sequential(*conv(3, c1, k1, stride, (stride + 4) // 2), pool()),  # S/(2s)
        "conv2": nn.Sequential(*conv(c1, c2, 5), pool()),  # S/(4s)
        "conv3": nn.Sequential(*conv(c2, c3, 3)),
        "conv4": nn.Sequential(*conv(c3, c4, 3)),
        "conv5": nn.Sequential(*conv(c4, c5, 3)),
        "pool5": pool(),  # (B, m, n, n), n = S/(8s)
        "bottleneck": nn.Sequential(  # channel-wise FC, then a 1x1 conv to mix channels
            ChannelwiseFC(c5, n),
            nn.BatchNorm2d(c5),
            nn.ReLU(inplace=True),
            nn.Conv2d(c5, c5, 1, bias=False),
            nn.BatchNorm2d(c5),
            nn.ReLU(inplace=True),
        ),
    }
    return nn.ModuleDict(stages), c5, n


def _alexnet_decoder(cfg: ModelConfig, m: int, n: int) -> nn.Sequential:
    """(B, m, n, n) -> (B, 3, T, T): stride-2 up-convs, channels halving from 8 x width."""
    n_up = _log2_exact(target_size(cfg) // n, "target size / pool5 side")
    if n * 2**n_up != target_size(cfg):
        raise ValueError(f"alexnet: target {target_size(cfg)} is not pool5 side {n} * 2^k")
    return _upsampler(m, stage_channels(n_up - 1, cfg.width)[::-1])


class Generator(nn.Module):
    """Encoder + decoder. forward: (B, 3, S, S) in [-1, 1] -> (B, 3, T, T) in [-1, 1],
    T = config.target_size(cfg). `encode` returns named encoder features for evaluation."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.arch == "dcgan":
            self.encoder, chans = _dcgan_encoder(cfg)
            self.decoder = _dcgan_decoder(cfg, chans)
        elif cfg.arch == "alexnet":
            self.encoder, m, n = _alexnet_encoder(cfg)
            self.decoder = _alexnet_decoder(cfg, m, n)
        else:
            raise ValueError(f"unknown model.arch {cfg.arch!r}; known: ['dcgan', 'alexnet']")
        self.feature_layers: tuple[str, ...] = tuple(self.encoder.keys())

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.encoder.values():
            x = stage(x)
        return self.decoder(x)

    def encode(self, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        """{name: (B, C, h, w)} for the requested encoder stages (post-activation), running
        the encoder only up to the deepest one requested and never the decoder."""
        unknown = [name for name in layers if name not in self.encoder]
        if unknown or not layers:
            raise ValueError(
                f"unknown encoder layer(s) {unknown or '[]'}; known: {list(self.feature_layers)}"
            )
        wanted, deepest = set(layers), max(self.feature_layers.index(n) for n in layers)
        out: dict[str, Tensor] = {}
        for name in self.feature_layers[: deepest + 1]:
            x = self.encoder[name](x)
            if name in wanted:
                out[name] = x
        return out


class Discriminator(nn.Module):
    """DCGAN discriminator on the target square: (B, 3, T, T) -> logits (B,)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        side = target_size(cfg)
        chans = stage_channels(_log2_exact(side, "target size") - 2, cfg.width)
        self.features = nn.Sequential(
            *[_down(a, b, bn=i > 0) for i, (a, b) in enumerate(_pairs([3, *chans]))]
        )  # (B, 3, T, T) -> (B, 8w, 4, 4)
        self.head = DenseConv2d(chans[-1], 1, 4, 1, 0, bias=False)  # -> (B, 1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)).flatten()  # (B,)


def init_weights(module: nn.Module) -> None:
    """docs/method.md init, for `model.apply(init_weights)`: conv weights N(0, 0.02); BatchNorm
    scale N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, ChannelwiseFC)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_generator(cfg: ModelConfig) -> Generator:
    """A Generator for `cfg`, initialised as in docs/method.md."""
    g = Generator(cfg)
    g.apply(init_weights)
    return g


def build_discriminator(cfg: ModelConfig) -> Discriminator:
    """A Discriminator for `cfg`'s target square, initialised as in docs/method.md."""
    d = Discriminator(cfg)
    d.apply(init_weights)
    return d
