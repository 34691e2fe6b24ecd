"""DCGAN networks (Radford et al. 2016), with the discriminator options a WGAN-GP critic
(Gulrajani et al. 2017) and SN-GAN (Miyato et al. 2018) need, and SAGAN's (Zhang et al. 2019)
self-attention at chosen resolutions and spectral norm in G.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.models.layers import SelfAttention, check_norm, init_weights, norm_layer
from pipeline.models.layers import spectral_norm as apply_spectral_norm

IMAGE_SIZES = (32, 64, 128)


def check_attention(attention: tuple[int, ...], image_size: int) -> tuple[int, ...]:
    """``attention`` if every entry is a feature-map resolution strictly between 4 and
    ``image_size`` (where both networks have a layer to put the block after), else a ValueError."""
    allowed = [2**k for k in range(3, _num_stride2_layers(image_size) + 2)]
    bad = [r for r in attention if r not in allowed]
    if bad:
        raise ValueError(f"self-attention resolutions {bad} are not feature-map sizes of a {image_size}x{image_size} "
                         f"DCGAN; choose from {allowed}")
    return tuple(attention)


def _num_stride2_layers(image_size: int) -> int:
    """Stride-2 layers between 4×4 and ``image_size``: 3 for 32, 4 for 64, 5 for 128."""
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size}")
    return int(math.log2(image_size)) - 2


class DCGANGenerator(nn.Module):
    """DCGAN generator: Radford et al. 2016, "Unsupervised Representation Learning with Deep
    Convolutional Generative Adversarial Networks", Sec. 3 and Fig. 1; layer for layer the
    ``Generator`` of the PyTorch example ``dcgan/main.py`` at ``image_size=64``.

    z is projected and reshaped by a 4×4 transposed conv from 1×1 to 4×4 with ``ngf * 8``
    channels (at 64×64), then stride-2 4×4 transposed convs halve the width and double the
    resolution up to ``image_size``. BatchNorm + ReLU everywhere but the output, which is Tanh
    without norm. No biases (each conv but the last is followed by BatchNorm; the example keeps
    the last bias-free too). Weights N(0, 0.02), BatchNorm scales N(1, 0.02).

    SAGAN's options: ``attention`` lists feature-map resolutions after whose block (after its
    ReLU) a :class:`SelfAttention` follows; ``spectral_norm=True`` wraps every conv, as SAGAN
    does in G (with batch norm kept). Both off by default: the DCGAN above, unchanged.
    """

    def __init__(self, *, z_dim: int = 100, ngf: int = 64, out_channels: int = 3, image_size: int = 64,
                 attention: tuple[int, ...] = (), spectral_norm: bool = False) -> None:
        super().__init__()
        n_up = _num_stride2_layers(image_size)
        check_attention(attention, image_size)
        self.z_dim = z_dim
        self.image_size = image_size
        width = ngf * 2 ** (n_up - 1)
        blocks: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim, width, 4, stride=1, padding=0, bias=False),
            norm_layer("batch", width),
            nn.ReLU(),
        ]
        resolution = 4
        for _ in range(n_up - 1):
            blocks += [
                nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1, bias=False),
                norm_layer("batch", width // 2),
                nn.ReLU(),
            ]
            width //= 2
            resolution *= 2
            if resolution in attention:
                blocks.append(SelfAttention(width))
        blocks += [nn.ConvTranspose2d(width, out_channels, 4, stride=2, padding=1, bias=False), nn.Tanh()]
        self.model = nn.Sequential(*blocks)
        init_weights(self, "normal", 0.02)
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` [N, z_dim] (or [N, z_dim, 1, 1]) → images [N, out_channels, image_size,
        image_size] in [-1, 1]."""
        if z.dim() == 2:
            z = z[:, :, None, None]
        if z.dim() != 4 or z.shape[1:] != (self.z_dim, 1, 1):
            raise ValueError(f"z must be [N, {self.z_dim}] or [N, {self.z_dim}, 1, 1], got {list(z.shape)}")
        return self.model(z)


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator: Radford et al. 2016, Sec. 3; at ``image_size=64`` with
    ``norm="batch"`` layer for layer the ``Discriminator`` of the PyTorch example
    ``dcgan/main.py``, minus its final sigmoid.

    Stride-2 4×4 convs with LeakyReLU(0.2) halve the resolution down to 4×4 while the width
    doubles from ``ndf`` (no norm on the first), then a 4×4 valid conv gives one logit per image.

    ``norm`` is ``"batch"`` (DCGAN), ``"layer"`` or ``"none"``. A WGAN-GP critic must not use
    batch norm: the gradient penalty is per sample, and batch norm makes each output depend on
    the whole batch (Gulrajani et al. 2017, Sec. 4, who suggest layer norm). ``"layer"`` is
    ``GroupNorm(1, C)``: each sample normalized over [C, H, W] with per-channel scale and shift,
    as the official WGAN-GP code's ``Layernorm`` over axes [1, 2, 3]. Convs have no bias (as in
    the example) unless ``norm="none"``, where nothing else would shift them.
    ``spectral_norm=True`` wraps every conv in spectral normalization (Miyato et al. 2018),
    after the N(0, 0.02) init. ``attention``: feature-map resolutions after whose block (after its
    LeakyReLU) a :class:`SelfAttention` follows (SAGAN).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        ndf: int = 64,
        image_size: int = 64,
        norm: str = "batch",
        spectral_norm: bool = False,
        attention: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if check_norm(norm) == "instance":
            # Not part of either paper; refusing it keeps the set of tested variants closed.
            raise ValueError("DCGANDiscriminator norm must be 'batch', 'layer' or 'none', got 'instance'")
        n_down = _num_stride2_layers(image_size)
        check_attention(attention, image_size)
        self.image_size = image_size
        bias = norm == "none"
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1, bias=bias), nn.LeakyReLU(0.2)]
        width, resolution = ndf, image_size // 2
        if resolution in attention:
            blocks.append(SelfAttention(width))
        for _ in range(n_down - 1):
            blocks += [
                nn.Conv2d(width, width * 2, 4, stride=2, padding=1, bias=bias),
                norm_layer(norm, width * 2),
                nn.LeakyReLU(0.2),
            ]
            width *= 2
            resolution //= 2
            if resolution in attention:
                blocks.append(SelfAttention(width))
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=0, bias=bias))
        self.model = nn.Sequential(*blocks)
        init_weights(self, "normal", 0.02)
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [N, in_channels, image_size, image_size] → logits [N]."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}×{self.image_size} images, got {tuple(x.shape[-2:])}")
        return self.model(x).reshape(x.shape[0])
