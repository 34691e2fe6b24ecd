"""pix2pix networks (Isola et al. 2017): the U-Net generator and the PatchGAN / PixelGAN
discriminators, as in the official junyanz/pytorch-CycleGAN-and-pix2pix ``models/networks.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.layers import SelfAttention, check_norm, init_weights, norm_has_shift, norm_layer


class UnetGenerator(nn.Module):
    """U-Net generator of pix2pix: Isola et al. 2017, "Image-to-Image Translation with
    Conditional Adversarial Networks", "Generator with skips" and the appendix's generator
    architectures; follows ``UnetGenerator`` and ``UnetSkipConnectionBlock`` of the official
    ``models/networks.py``.

    With ``num_downs=8`` (``unet_256``) the encoder is C64-C128-C256-C512-C512-C512-C512-C512
    and the decoder mirrors it, each decoder block seeing the concatenation [encoder skip,
    decoder output]. Encoder blocks are LeakyReLU(0.2) → 4×4 stride-2 conv → norm (no
    activation before the first, no norm on the first nor on the innermost, whose output is
    1×1); decoder blocks are ReLU → 4×4 stride-2 transposed conv → norm, and the outermost ends
    in Tanh. Dropout 0.5 after the innermost ``num_downs - 5`` decoder blocks of width
    ``8 * ngf`` (the bottleneck's own decoder block excluded) is the generator's only noise, and
    like the official code it is on in train mode only. Convs have biases only where no norm
    with a learned shift follows them (the outermost transposed conv always has one).

    The math is the official one; the module tree is flat (``down``/``up`` lists) instead of
    nested blocks, so official checkpoints need their keys mapped before loading.

    ``skip_last``: decoder blocks see [decoder output, skip] (BicycleGAN's ``UnetBlock``) instead
    of [skip, decoder output]. ``attention`` (not in pix2pix): SAGAN's :class:`SelfAttention` at the end of the decoder
    blocks whose features are at ``1/f`` of the input size, for each ``f`` listed (a power of 2
    from 2 to ``2**(num_downs - 1)``), before they meet their skip: long-range structure that
    the 70×70 receptive field of the PatchGAN cannot ask for.
    """

    def __init__(
        self,
        *,
        input_nc: int = 3,
        output_nc: int = 3,
        num_downs: int = 8,
        ngf: int = 64,
        norm: str = "batch",
        use_dropout: bool = True,
        attention: tuple[int, ...] = (),
        skip_last: bool = False,
    ) -> None:
        super().__init__()
        self.skip_last = skip_last
        if num_downs < 5:
            # Below 5 the C64-C128-C256-C512 head and the bottleneck would overlap.
            raise ValueError(f"num_downs must be >= 5, got {num_downs}")
        allowed = [2**i for i in range(1, num_downs)]
        if any(f not in allowed for f in attention):
            raise ValueError(f"attention factors must be among {allowed} for num_downs={num_downs}, got "
                             f"{list(attention)}")
        check_norm(norm)
        self.num_downs = num_downs
        bias = not norm_has_shift(norm)
        widths = [ngf * min(2**i, 8) for i in range(num_downs)]
        innermost = num_downs - 1

        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            if i == 0:
                block = [nn.Conv2d(input_nc, width, 4, stride=2, padding=1, bias=bias)]
            else:
                block = [nn.LeakyReLU(0.2), nn.Conv2d(widths[i - 1], width, 4, stride=2, padding=1, bias=bias)]
                if i < innermost:
                    block.append(norm_layer(norm, width))
            self.down.append(nn.Sequential(*block))

        # Ordered from the bottleneck outwards; all but the innermost see [skip, previous] and
        # therefore twice the encoder width.
        self.up = nn.ModuleList()
        for i in reversed(range(num_downs)):
            in_ch = widths[i] if i == innermost else 2 * widths[i]
            if i == 0:
                block = [nn.ReLU(), nn.ConvTranspose2d(in_ch, output_nc, 4, stride=2, padding=1), nn.Tanh()]
            else:
                out_ch = widths[i - 1]
                block = [
                    nn.ReLU(),
                    nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=bias),
                    norm_layer(norm, out_ch),
                ]
                if use_dropout and 4 <= i < innermost:
                    block.append(nn.Dropout(0.5))
                if 2**i in attention:
                    block.append(SelfAttention(out_ch))
            self.up.append(nn.Sequential(*block))

        init_weights(self, "normal", 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [N, input_nc, H, W], H and W multiples of ``2**num_downs`` →
        [N, output_nc, H, W] in [-1, 1]."""
        factor = 2**self.num_downs
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"UnetGenerator with num_downs={self.num_downs} needs H and W divisible by {factor}, "
                f"got {tuple(x.shape[-2:])}"
            )
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
        h = self.up[0](skips.pop())
        for up in self.up[1:]:
            skip = skips.pop()
            h = up(torch.cat([h, skip] if self.skip_last else [skip, h], dim=1))
        return h


def unet_256(
    *, input_nc: int = 3, output_nc: int = 3, ngf: int = 64, norm: str = "batch", use_dropout: bool = True
) -> UnetGenerator:
    """The official ``unet_256``: 8 downsamplings, 256×256 → 1×1 at the bottleneck."""
    return UnetGenerator(
        input_nc=input_nc, output_nc=output_nc, num_downs=8, ngf=ngf, norm=norm, use_dropout=use_dropout
    )


def unet_128(
    *, input_nc: int = 3, output_nc: int = 3, ngf: int = 64, norm: str = "batch", use_dropout: bool = True
) -> UnetGenerator:
    """The official ``unet_128``: 7 downsamplings, 128×128 → 1×1 at the bottleneck."""
    return UnetGenerator(
        input_nc=input_nc, output_nc=output_nc, num_downs=7, ngf=ngf, norm=norm, use_dropout=use_dropout
    )


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator: Isola et al. 2017, "Markovian discriminator (PatchGAN)" and the
    appendix's discriminator architectures; follows ``NLayerDiscriminator`` of the official
    ``models/networks.py``.

    4×4 convs with padding 1 and LeakyReLU(0.2): a stride-2 conv without norm, ``n_layers - 1``
    stride-2 conv + norm blocks, one stride-1 conv + norm block (widths ``ndf * min(2**n, 8)``),
    and a stride-1 conv to one channel. ``n_layers=3`` is the paper's 70×70 PatchGAN
    (``n_layers=1``: 16×16, ``5``: 286×286). Each output element is the logit (no sigmoid) of
    one receptive-field patch being real. The default ``input_nc=6`` is the conditional
    discriminator's [input image, output image] concatenation.
    """

    def __init__(self, *, input_nc: int = 6, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        bias = not norm_has_shift(norm)
        blocks: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            # The last block keeps resolution: that is what makes the patch 70×70 and not 142×142.
            stride = 2 if n < n_layers else 1
            blocks += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=bias),
                norm_layer(norm, out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*blocks)
        init_weights(self, "normal", 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [N, input_nc, H, W] → patch logits [N, 1, H', W'] (30×30 for 256×256 and
        ``n_layers=3``)."""
        return self.model(x)


class PixelDiscriminator(nn.Module):
    """1×1 PixelGAN discriminator: Isola et al. 2017, "From PixelGANs to PatchGANs to
    ImageGANs"; follows ``PixelDiscriminator`` of the official ``models/networks.py``: 1×1 convs
    C64-C128(norm)-C1 with LeakyReLU(0.2), one logit per pixel.
    """

    def __init__(self, *, input_nc: int = 6, ndf: int = 64, norm: str = "batch") -> None:
        super().__init__()
        bias = not norm_has_shift(norm)
        self.model = nn.Sequential(
            nn.Conv2d(input_nc, ndf, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ndf, 2 * ndf, 1, bias=bias),
            norm_layer(norm, 2 * ndf),
            nn.LeakyReLU(0.2),
            # The official code drops this bias with norm="batch" too; no norm follows the logit
            # layer, so here it keeps its bias like the PatchGAN's last conv.
            nn.Conv2d(2 * ndf, 1, 1),
        )
        init_weights(self, "normal", 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [N, input_nc, H, W] → per-pixel logits [N, 1, H, W]."""
        return self.model(x)
