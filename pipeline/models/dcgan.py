"""DCGAN networks (Radford et al. 2016), with the discriminator options a WGAN-GP critic
(Gulrajani et al. 2017) and SN-GAN (Miyato et al. 2018) need, SAGAN's (Zhang et al. 2019)
self-attention at chosen resolutions and spectral norm in G, and class conditioning: G by
conditional batch norm or a one-hot input (Mirza & Osindero 2014), D by projection (Miyato &
Koyama 2018) or an auxiliary classifier (ACGAN, Odena et al. 2017).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.layers import SelfAttention, check_norm, init_weights, norm_layer, spectral_norm_weight
from pipeline.models.layers import spectral_norm as apply_spectral_norm

IMAGE_SIZES = (32, 64, 128)
G_CONDITIONING = ("cbn", "concat")
D_CONDITIONING = ("projection", "acgan")


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm with a scale and shift per class (de Vries et al. 2017), as the class-conditional
    generators of the projection discriminator's paper (Miyato & Koyama 2018) and SAGAN use it:
    statistics as ``BatchNorm2d`` without affine parameters, then ``γ[y] x + β[y]`` with γ
    starting at 1 and β at 0 (the official code's initial values)."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, affine=False)
        self.weight = nn.Embedding(num_classes, num_features)
        self.bias = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.weight.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.weight(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


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
                 attention: tuple[int, ...] = (), spectral_norm: bool = False, num_classes: int = 0,
                 conditioning: str = "cbn") -> None:
        super().__init__()
        n_up = _num_stride2_layers(image_size)
        check_attention(attention, image_size)
        if num_classes and conditioning not in G_CONDITIONING:
            raise ValueError(f"conditioning must be one of {G_CONDITIONING}, got {conditioning!r}")
        self.z_dim = z_dim
        self.image_size = image_size
        self.num_classes = num_classes
        self.conditioning = conditioning if num_classes else None

        def norm(width: int) -> nn.Module:
            return ConditionalBatchNorm2d(width, num_classes) if self.conditioning == "cbn" \
                else norm_layer("batch", width)

        width = ngf * 2 ** (n_up - 1)
        in_dim = z_dim + (num_classes if self.conditioning == "concat" else 0)
        blocks: list[nn.Module] = [
            nn.ConvTranspose2d(in_dim, width, 4, stride=1, padding=0, bias=False),
            norm(width),
            nn.ReLU(),
        ]
        resolution = 4
        for _ in range(n_up - 1):
            blocks += [
                nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1, bias=False),
                norm(width // 2),
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

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``z`` [N, z_dim] (or [N, z_dim, 1, 1]) and, for a class-conditional G, class ids ``y``
        [N] → images [N, out_channels, image_size, image_size] in [-1, 1]."""
        if z.dim() == 2:
            z = z[:, :, None, None]
        if z.dim() != 4 or z.shape[1:] != (self.z_dim, 1, 1):
            raise ValueError(f"z must be [N, {self.z_dim}] or [N, {self.z_dim}, 1, 1], got {list(z.shape)}")
        if (y is None) != (self.conditioning is None):
            raise ValueError("class ids y are needed by a class-conditional G, and only by one")
        if self.conditioning is None:
            return self.model(z)
        if self.conditioning == "concat":
            onehot = F.one_hot(y, self.num_classes).to(z.dtype)[:, :, None, None]
            return self.model(torch.cat([z, onehot], 1))
        x = z
        for layer in self.model:
            x = layer(x, y) if isinstance(layer, ConditionalBatchNorm2d) else layer(x)
        return x


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
        num_classes: int = 0,
        conditioning: str = "projection",
    ) -> None:
        super().__init__()
        if num_classes and conditioning not in D_CONDITIONING:
            raise ValueError(f"conditioning must be one of {D_CONDITIONING}, got {conditioning!r}")
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
        self.num_classes = num_classes
        self.conditioning = conditioning if num_classes else None
        if self.conditioning == "projection":
            self.embed = nn.Embedding(num_classes, width)
        elif self.conditioning == "acgan":
            self.classifier = nn.Linear(width * 16, num_classes)
        init_weights(self, "normal", 0.02)
        if self.conditioning == "projection":
            nn.init.xavier_uniform_(self.embed.weight)  # the official projection code's GlorotUniform
        if spectral_norm:
            apply_spectral_norm(self)
            if self.conditioning == "projection":
                spectral_norm_weight(self.embed)  # the official SNEmbedID: σ of the [classes, C] matrix

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """``x`` [N, in_channels, image_size, image_size] → logits [N].

        Class-conditional: with ``conditioning="projection"`` (Miyato & Koyama 2018, Eq. 3) the
        logit of image x of class ``y`` [N] is ``ψ(φ(x)) + ⟨embed(y), Σ_hw φ(x)⟩``, φ the 4×4
        features before the last conv ψ, summed over space as the paper's global sum pooling;
        with ``"acgan"`` (Odena et al. 2017) ``y`` is not taken and the output is ``(logits [N],
        class logits [N, num_classes])`` from an auxiliary linear classifier on φ."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}×{self.image_size} images, got {tuple(x.shape[-2:])}")
        if self.conditioning is None:
            return self.model(x).reshape(x.shape[0])
        features = self.model[:-1](x)
        logits = self.model[-1](features).reshape(x.shape[0])
        if self.conditioning == "acgan":
            return logits, self.classifier(features.flatten(1))
        if y is None:
            raise ValueError("a projection discriminator needs the class ids y of its images")
        return logits + (self.embed(y) * features.sum((2, 3))).sum(1)
