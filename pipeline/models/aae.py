"""The adversarial autoencoder's networks (Makhzani et al. 2016, "Adversarial Autoencoders"): a
convolutional encoder to the code, and the code discriminator, an MLP on codes. The decoder is
the DCGAN generator (``pipeline/models/dcgan.py``), which maps a code to an image.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.dcgan import _num_stride2_layers
from pipeline.models.layers import check_norm, init_weights, norm_layer


class ConvEncoder(nn.Module):
    """The deterministic encoder q(z|x) of an AAE for images: the DCGAN discriminator's stride-2
    4×4 convs with LeakyReLU(0.2) (batch norm from the second on) down to 4×4, then a 4×4 valid
    conv to ``z_dim`` linear outputs: the code. (The paper's MNIST encoder is an MLP of two
    1000-unit layers; the convolutional form is the one its image experiments need.)"""

    def __init__(self, *, in_channels: int = 3, ndf: int = 64, image_size: int = 64, z_dim: int = 8,
                 norm: str = "batch") -> None:
        super().__init__()
        check_norm(norm)
        n_down = _num_stride2_layers(image_size)
        self.image_size = image_size
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ndf
        for _ in range(n_down - 1):
            layers += [nn.Conv2d(width, width * 2, 4, stride=2, padding=1), norm_layer(norm, width * 2),
                       nn.LeakyReLU(0.2)]
            width *= 2
        layers.append(nn.Conv2d(width, z_dim, 4))
        self.model = nn.Sequential(*layers)
        init_weights(self, "normal", 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [N, C, S, S] in [-1, 1] → codes [N, z_dim]."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}×{self.image_size} images, got {tuple(x.shape[-2:])}")
        return self.model(x).flatten(1)


class CodeDiscriminator(nn.Module):
    """The AAE's discriminator on codes (Makhzani et al. 2016, §2 and the MNIST architecture of
    §3: two layers of 1000 ReLU units), one logit per code: does ``z`` come from the prior p(z)
    or from the encoder's aggregated posterior q(z)? It never sees an image."""

    def __init__(self, *, z_dim: int = 8, hidden: int = 1000) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                   nn.Linear(hidden, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` [N, z_dim] → logits [N]."""
        return self.model(z).squeeze(1)
