"""BicycleGAN networks (Zhu et al. 2017, "Toward Multimodal Image-to-Image Translation"), after
the official junyanz/BicycleGAN ``models/networks.py``: the U-Net generator with z added at the
input, the ResNet encoder E, and the two-scale PatchGAN discriminator.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.layers import check_norm, norm_layer
from pipeline.models.pix2pix import NLayerDiscriminator, UnetGenerator


class UnetAddInputGenerator(nn.Module):
    """``G_Unet_add_input``: z [N, nz] tiled over the image and concatenated to the input
    channels, then pix2pix's U-Net (``unet``; its layers are the official ``UnetBlock``'s: with
    instance norm, every conv has a bias, and dropout sits in the ``num_downs - 5`` inner 8·ngf
    decoder blocks; unlike pix2pix's, each block concatenates [its output, the skip])."""

    def __init__(self, *, input_nc: int = 3, output_nc: int = 3, nz: int = 8, num_downs: int = 8, ngf: int = 64,
                 norm: str = "instance", use_dropout: bool = False) -> None:
        super().__init__()
        self.nz = nz
        self.unet = UnetGenerator(input_nc=input_nc + nz, output_nc=output_nc, num_downs=num_downs, ngf=ngf,
                                  norm=norm, use_dropout=use_dropout, skip_last=True)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``x`` [N, input_nc, H, W], ``z`` [N, nz] → [N, output_nc, H, W] in [-1, 1]."""
        if z.shape != (x.shape[0], self.nz):
            raise ValueError(f"z must be [{x.shape[0]}, {self.nz}], got {list(z.shape)}")
        z_img = z[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        return self.unet(torch.cat([x, z_img.to(x.dtype)], 1))


class BasicBlock(nn.Module):
    """The encoder's residual block that halves the resolution: norm → LReLU → 3×3 conv (in→in)
    → norm → LReLU → 3×3 conv (in→out) → 2×2 mean pool, plus a shortcut of 2×2 mean pool → 1×1
    conv (the official ``BasicBlock``)."""

    def __init__(self, inplanes: int, outplanes: int, norm: str) -> None:
        super().__init__()
        self.conv = nn.Sequential(norm_layer(norm, inplanes), nn.LeakyReLU(0.2),
                                  nn.Conv2d(inplanes, inplanes, 3, padding=1), norm_layer(norm, inplanes),
                                  nn.LeakyReLU(0.2),
                                  nn.Sequential(nn.Conv2d(inplanes, outplanes, 3, padding=1), nn.AvgPool2d(2)))
        self.shortcut = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(inplanes, outplanes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.shortcut(x)


class ResNetEncoder(nn.Module):
    """``E_ResNet`` with ``vaeLike=True``: a 4×4 stride-2 conv, ``n_blocks - 1`` halving
    :class:`BasicBlock` s (widths nef·min(4, n)), LReLU, an 8×8 mean pool, and two linear heads:
    μ and log σ² of q(z|B). ``resnet_256`` is 5 blocks for 256² images, ``resnet_128`` 4: the
    map must be 8×8 before the pool, so ``image_size = 2**(n_blocks + 3)``."""

    def __init__(self, *, input_nc: int = 3, nz: int = 8, nef: int = 64, n_blocks: int = 5,
                 norm: str = "instance") -> None:
        super().__init__()
        check_norm(norm)
        self.image_size = 2 ** (n_blocks + 3)
        layers: list[nn.Module] = [nn.Conv2d(input_nc, nef, 4, stride=2, padding=1)]
        width = nef
        for n in range(1, n_blocks):
            width = nef * min(4, n + 1)
            layers.append(BasicBlock(nef * min(4, n), width, norm))
        layers += [nn.LeakyReLU(0.2), nn.AvgPool2d(8)]
        # The official registration order (heads first), so parameters() lists them alike.
        self.fc = nn.Sequential(nn.Linear(width, nz))
        self.fcVar = nn.Sequential(nn.Linear(width, nz))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [N, C, S, S] with S = ``image_size`` → (μ, log σ²), each [N, nz]."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"this encoder takes {self.image_size}x{self.image_size} images, got "
                             f"{tuple(x.shape[-2:])}")
        flat = self.conv(x).flatten(1)
        return self.fc(flat), self.fcVar(flat)


class MultiscalePatchDiscriminator(nn.Module):
    """``D_NLayersMulti``: ``num_D`` PatchGANs, the k-th with ndf/2^k filters on the image
    downsampled k times by a 3×3 stride-2 mean pool; returns one logit map per scale, as the
    multiscale output of ``losses.adversarial`` (each scale's loss summed, as the official
    ``GANLoss`` over a list)."""

    def __init__(self, *, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, num_D: int = 2,
                 norm: str = "instance") -> None:
        super().__init__()
        self.scales = nn.ModuleList(NLayerDiscriminator(input_nc=input_nc, ndf=int(round(ndf / 2**i)),
                                                        n_layers=n_layers, norm=norm) for i in range(num_D))
        self.down = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        out = []
        for i, scale in enumerate(self.scales):
            if i:
                x = self.down(x)
            out.append([scale(x)])
        return out
