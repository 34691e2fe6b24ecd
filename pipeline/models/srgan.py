"""SRGAN networks (Ledig et al. 2017, "Photo-Realistic Single Image Super-Resolution Using a
Generative Adversarial Network", Fig. 4): the SRResNet generator and the VGG-style discriminator.
No official code was released; layer names follow the paper's figure.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """One of SRResNet's B residual blocks (Fig. 4, after Gross & Wilber's ResNet variant):
    k3n64s1 conv → BN → PReLU → k3n64s1 conv → BN, plus the block's input."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(self.prelu(self.bn1(self.conv1(x)))))


class SRResNet(nn.Module):
    """The SRResNet generator G of SRGAN (Ledig et al. 2017, Fig. 4 top, §3.1).

    ``head``: k9n64s1 conv + PReLU; ``blocks``: ``num_blocks`` (16) :class:`ResidualBlock`;
    ``body_tail``: k3n64s1 conv + BN, added to the head's output (the long skip); ``upsample``:
    log2(``scale``) stages of k3n256s1 conv → ×2 sub-pixel shuffle (Shi et al. 2016) → PReLU;
    ``tail``: k9n3s1 conv, no activation (as the figure). PReLU slopes are per channel (the
    paper's Lasagne default), starting at 0.25.

    Input: low-resolution images ``[N, 3, h, w]`` in [0, 1]; output ``[N, 3, scale·h, scale·w]``
    in about [-1, 1] (the paper's ranges for LR and HR images).
    """

    def __init__(self, *, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, num_blocks: int = 16,
                 scale: int = 4) -> None:
        super().__init__()
        if scale < 2 or scale & (scale - 1):
            raise ValueError(f"scale must be a power of 2 (each upsampling stage doubles), got {scale}")
        self.scale = scale
        self.head = nn.Sequential(nn.Conv2d(in_channels, ngf, 9, padding=4), nn.PReLU(ngf))
        self.blocks = nn.Sequential(*(ResidualBlock(ngf) for _ in range(num_blocks)))
        self.body_tail = nn.Sequential(nn.Conv2d(ngf, ngf, 3, padding=1), nn.BatchNorm2d(ngf))
        stages: list[nn.Module] = []
        for _ in range(int(math.log2(scale))):
            stages += [nn.Conv2d(ngf, ngf * 4, 3, padding=1), nn.PixelShuffle(2), nn.PReLU(ngf)]
        self.upsample = nn.Sequential(*stages)
        self.tail = nn.Conv2d(ngf, out_channels, 9, padding=4)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """``lr`` [N, C, h, w] in [0, 1] → [N, C, scale·h, scale·w]."""
        h = self.head(lr)
        return self.tail(self.upsample(h + self.body_tail(self.blocks(h))))


class SRGANDiscriminator(nn.Module):
    """The discriminator D of SRGAN (Ledig et al. 2017, Fig. 4 bottom; after Radford et al.'s
    guidelines): k3n64s1 conv + LeakyReLU(0.2), then seven conv → BN → LeakyReLU blocks
    (n64s2, n128s1, n128s2, n256s1, n256s2, n512s1, n512s2: four stride-2 ones), a dense layer
    of 1024, LeakyReLU, and a dense layer of one logit (the paper's sigmoid is in the loss).

    The dense layer sees the whole ``[512, S/16, S/16]`` map, so D is built for one input size
    ``image_size`` (96: the paper's HR crops). Output: logits ``[N]``.
    """

    def __init__(self, *, in_channels: int = 3, ndf: int = 64, image_size: int = 96) -> None:
        super().__init__()
        if image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (four stride-2 convs), got {image_size}")
        self.image_size = image_size
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 3, padding=1), nn.LeakyReLU(0.2)]
        width = ndf
        for out_ch, stride in ((ndf, 2), (ndf * 2, 1), (ndf * 2, 2), (ndf * 4, 1), (ndf * 4, 2), (ndf * 8, 1),
                               (ndf * 8, 2)):
            layers += [nn.Conv2d(width, out_ch, 3, stride=stride, padding=1), nn.BatchNorm2d(out_ch),
                       nn.LeakyReLU(0.2)]
            width = out_ch
        self.features = nn.Sequential(*layers)
        side = image_size // 16
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(width * side * side, 1024), nn.LeakyReLU(0.2),
                                        nn.Linear(1024, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [N, C, image_size, image_size] → logits [N]."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"SRGANDiscriminator is built for {self.image_size}x{self.image_size} images, got "
                             f"{tuple(x.shape[-2:])}")
        return self.classifier(self.features(x)).reshape(x.shape[0])
