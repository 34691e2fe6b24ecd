"""Progressive GAN networks (Karras et al. 2018, "Progressive Growing of GANs for Improved Quality,
Stability, and Variation"; official code tkarras/progressive_growing_of_gans, ``networks.py``
``G_paper`` and ``D_paper``): equalised learning rate, pixel normalisation, minibatch standard
deviation, and the fade-in of each new resolution.

Both networks hold every resolution from 4×4 up to ``resolution`` and run at the level of detail
(``lod``, the official name: 0 is full resolution, each unit halves it) kept in their ``lod``
buffer, which the training step sets and the snapshot keeps: G outputs and D reads images at
``2 ** (log2(resolution) - floor(lod))``, and a fractional lod blends in the newest block as the
official ``lerp_clip`` does. Blocks not yet grown cost nothing but a zero term (their parameters
× 0 added to the output), so that DDP sees a gradient, zero, for every parameter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .stylegan2 import MinibatchStdLayer


def channels(stage: int, fmap_base: int = 8192, fmap_max: int = 512) -> int:
    """The official ``nf(stage)``: feature maps of the block at resolution 2^(stage + 1)."""
    return min(fmap_base // 2**stage, fmap_max)


class EqualizedConv2d(nn.Module):
    """Conv with the equalised learning rate of §4.1: weights N(0, 1), scaled at run time by
    ``gain / sqrt(fan_in)`` (He's constant); the bias is added unscaled, as ``apply_bias``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, gain: float = math.sqrt(2)) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = gain / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.weight.shape[-1] // 2)


class EqualizedLinear(nn.Module):
    """Dense layer with the equalised learning rate; ``bias=False`` where the official code adds
    the bias after a reshape (G's first layer, per channel)."""

    def __init__(self, in_features: int, out_features: int, gain: float = math.sqrt(2), bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scale = gain / math.sqrt(in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


def pixel_norm(x: Tensor, eps: float = 1e-8) -> Tensor:
    """§4.2: each pixel's feature vector scaled to unit mean square."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def upscale2d(x: Tensor, factor: int = 2) -> Tensor:
    """Nearest-neighbour upsampling (the official ``upscale2d``)."""
    return x if factor == 1 else x.repeat_interleave(factor, 2).repeat_interleave(factor, 3)


def downscale2d(x: Tensor, factor: int = 2) -> Tensor:
    """Box-filter downsampling (the official ``downscale2d``): the mean of each factor×factor area."""
    return x if factor == 1 else F.avg_pool2d(x, factor)


def fade_weight(lod: float) -> float:
    """How much of the previous level's output a fractional ``lod`` keeps: ``lod - floor(lod)``
    (the official ``lerp_clip(new, old, lod_in - lod)``); 0 once the new block is in."""
    return lod - math.floor(lod)


def _zero(modules: list[nn.Module]) -> Tensor | float:
    """0 × the sum of ``modules``' parameters: their gradients exist and are zero."""
    params = [p.sum() for m in modules for p in m.parameters()]
    return torch.stack(params).sum() * 0 if params else 0.0


class _Levels(nn.Module):
    """What G and D share: the resolutions and the ``lod`` buffer."""

    def _setup(self, resolution: int) -> None:
        self.log2 = int(math.log2(resolution))
        if resolution < 8 or 2**self.log2 != resolution:
            raise ValueError(f"resolution must be a power of 2, at least 8; got {resolution}")
        self.resolution = resolution
        self.register_buffer("lod", torch.zeros(()))  # the official lod: 0 is full resolution

    def level(self, lod: float | None) -> tuple[int, float]:
        """``(log2 of the working resolution, fade weight of the previous level)``."""
        lod = float(self.lod) if lod is None else float(lod)
        if not 0 <= lod <= self.log2 - 2:
            raise ValueError(f"lod must be within 0..{self.log2 - 2} at resolution {self.resolution}, got {lod}")
        return self.log2 - math.floor(lod), fade_weight(lod)


class ProGANGenerator(_Levels):
    """``G_paper``: z (pixel-normalised) → dense to 4×4 → conv 3×3; then per resolution an
    upscale and two convs 3×3; leaky ReLU 0.2 and pixel norm after each; a 1×1 toRGB per
    resolution, linear. ``forward(z)`` gives images at the working resolution of ``lod``;
    ``full=True`` upscales them to ``resolution`` (nearest), as the official G always outputs."""

    def __init__(self, resolution: int = 1024, latent_size: int = 512, fmap_base: int = 8192, fmap_max: int = 512,
                 num_channels: int = 3) -> None:
        super().__init__()
        self._setup(resolution)
        self.latent_size = latent_size

        def nf(stage: int) -> int:
            return channels(stage, fmap_base, fmap_max)

        self.dense = EqualizedLinear(latent_size, nf(1) * 16, gain=math.sqrt(2) / 4, bias=False)
        self.dense_bias = nn.Parameter(torch.zeros(nf(1)))
        self.blocks = nn.ModuleList([EqualizedConv2d(nf(1), nf(1), 3)])  # index 0: 4x4 (res 2)
        for res in range(3, self.log2 + 1):
            self.blocks.append(nn.Sequential(EqualizedConv2d(nf(res - 2), nf(res - 1), 3),
                                             EqualizedConv2d(nf(res - 1), nf(res - 1), 3)))
        self.torgb = nn.ModuleList([EqualizedConv2d(nf(res - 1), num_channels, 1, gain=1)
                                    for res in range(2, self.log2 + 1)])

    def _block(self, x: Tensor, res: int) -> Tensor:
        if res == 2:
            x = self.dense(pixel_norm(x)).view(-1, self.dense_bias.shape[0], 4, 4) + self.dense_bias[:, None, None]
            x = pixel_norm(F.leaky_relu(x, 0.2))
            return pixel_norm(F.leaky_relu(self.blocks[0](x), 0.2))
        x = upscale2d(x)
        for conv in self.blocks[res - 2]:
            x = pixel_norm(F.leaky_relu(conv(x), 0.2))
        return x

    def forward(self, z: Tensor, lod: float | None = None, full: bool = False) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_size:
            raise ValueError(f"z must be [N, {self.latent_size}], got {list(z.shape)}")
        top, fade = self.level(lod)
        x = prev = z
        for res in range(2, top + 1):
            prev, x = x, self._block(x, res)
        img = self.torgb[top - 2](x)
        used = [self.torgb[top - 2]]
        if fade > 0:
            old = upscale2d(self.torgb[top - 3](prev))
            img = img + (old - img) * fade
            used.append(self.torgb[top - 3])
        idle = [b for i, b in enumerate(self.blocks) if i + 2 > top] + [t for t in self.torgb if t not in used]
        img = img + _zero(idle)
        return upscale2d(img, 2 ** (self.log2 - top)) if full else img


class ProGANDiscriminator(_Levels):
    """``D_paper``: a 1×1 fromRGB per resolution; per resolution two convs 3×3 and a box
    downscale; at 4×4 the minibatch standard deviation (groups of 4, one feature map), a conv 3×3,
    a dense layer and the linear output. Leaky ReLU 0.2, no normalisation. ``forward(img)`` reads
    images at the working resolution of ``lod``, blending a fractional one's newest block with the
    previous level's fromRGB of the box-downscaled input."""

    def __init__(self, resolution: int = 1024, fmap_base: int = 8192, fmap_max: int = 512, num_channels: int = 3,
                 mbstd_group_size: int = 4) -> None:
        super().__init__()
        self._setup(resolution)

        def nf(stage: int) -> int:
            return channels(stage, fmap_base, fmap_max)

        self.fromrgb = nn.ModuleList([EqualizedConv2d(num_channels, nf(res - 1), 1)
                                      for res in range(2, self.log2 + 1)])
        self.blocks = nn.ModuleList([nn.ModuleDict({
            "mbstd": MinibatchStdLayer(mbstd_group_size, 1),
            "conv": EqualizedConv2d(nf(1) + 1, nf(1), 3),
            "dense0": EqualizedLinear(nf(1) * 16, nf(0)),
            "dense1": EqualizedLinear(nf(0), 1, gain=1)})])
        for res in range(3, self.log2 + 1):
            self.blocks.append(nn.Sequential(EqualizedConv2d(nf(res - 1), nf(res - 1), 3),
                                             EqualizedConv2d(nf(res - 1), nf(res - 2), 3)))

    def _block(self, x: Tensor, res: int) -> Tensor:
        if res == 2:
            b = self.blocks[0]
            x = F.leaky_relu(b["conv"](b["mbstd"](x)), 0.2)
            return b["dense1"](F.leaky_relu(b["dense0"](x.flatten(1)), 0.2))
        for conv in self.blocks[res - 2]:
            x = F.leaky_relu(conv(x), 0.2)
        return downscale2d(x)

    def forward(self, img: Tensor, lod: float | None = None) -> Tensor:
        """Images [N, C, r, r] at the working resolution r → logits [N]."""
        top, fade = self.level(lod)
        if img.shape[-1] != 2**top or img.shape[-2] != 2**top:
            raise ValueError(f"at lod {float(self.lod) if lod is None else lod} D reads {2**top}x{2**top} images, "
                             f"got {tuple(img.shape[-2:])}")
        x = F.leaky_relu(self.fromrgb[top - 2](img), 0.2)
        used = [self.fromrgb[top - 2]]
        x = self._block(x, top)
        if fade > 0:
            y = F.leaky_relu(self.fromrgb[top - 3](downscale2d(img)), 0.2)
            x = x + (y - x) * fade
            used.append(self.fromrgb[top - 3])
        for res in range(top - 1, 1, -1):
            x = self._block(x, res)
        idle = [b for i, b in enumerate(self.blocks) if i + 2 > top] + [f for f in self.fromrgb if f not in used]
        return x.flatten() + _zero(idle)


def fade_reals(images: Tensor, lod: float, resolution: int) -> Tensor:
    """Real images [N, C, resolution, resolution] as D sees them at ``lod`` (the official
    ``process_reals``): box-downscaled to the working resolution, and during a fade blended with
    their own 2×-down-and-up version by the fade weight, as G's output is."""
    top = int(math.log2(resolution)) - math.floor(lod)
    x = downscale2d(images, resolution // 2**top)
    fade = fade_weight(lod)
    if fade > 0:
        x = x + (upscale2d(downscale2d(x)) - x) * fade
    return x
