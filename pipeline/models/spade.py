"""SPADE / GauGAN networks (Park et al. 2019): spatially-adaptive normalisation, its residual
block, the generator, the VAE style encoder and SPADE's variant of the multiscale discriminator,
following NVlabs/SPADE ``models/networks/{normalization,architecture,generator,encoder,
discriminator}.py``. Module names are the official ones, so state dicts line up key for key
(spectral norm aside: ``parametrizations.weight.original`` here, ``weight_orig`` there).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.layers import init_weights, spectral_norm
from pipeline.models.pix2pixhd import MultiscaleDiscriminator

UPSAMPLING_LAYERS = {"normal": 5, "more": 6, "most": 7}
# Official init: ``--init_type xavier --init_variance 0.02`` for G, D and E.
_INIT, _INIT_GAIN = "xavier", 0.02
_SPADE_NORM = re.compile(r"(spectral)?spade(syncbatch|batch|instance)(\d)x\d")
_PLAIN_NORM = re.compile(r"(spectral)?(syncbatch|sync_batch|batch|instance|none)?")


def parse_spade_norm(text: str) -> dict:
    """The official ``norm_G`` string as keyword arguments: ``spectralspadesyncbatch3x3`` →
    ``{"spectral": True, "param_free_norm": "batch", "sync": True, "kernel_size": 3}``."""
    m = _SPADE_NORM.fullmatch(text)
    if m is None:
        raise ValueError(f"norm_G {text!r} is not an official SPADE norm string: [spectral]spade"
                         "(syncbatch|batch|instance)<k>x<k>, e.g. spectralspadesyncbatch3x3, spadeinstance3x3")
    spectral, norm, ks = m.groups()
    if int(ks) % 2 == 0:
        raise ValueError(f"norm_G {text!r}: the kernel size must be odd")
    return {"spectral": bool(spectral), "param_free_norm": "instance" if norm == "instance" else "batch",
            "sync": norm == "syncbatch", "kernel_size": int(ks)}


def parse_plain_norm(text: str) -> dict:
    """The official ``norm_D``/``norm_E`` string as keyword arguments: ``spectralinstance`` →
    ``{"spectral": True, "norm": "instance"}``; ``syncbatch`` is ``batch`` (synchronised by the
    loop on GPUs)."""
    m = _PLAIN_NORM.fullmatch(text)
    if m is None or not text:
        raise ValueError(f"norm {text!r} is not an official SPADE norm string: [spectral](instance|batch|"
                         "syncbatch|none), e.g. spectralinstance")
    spectral, norm = m.groups()
    norm = "none" if norm is None else ("batch" if "batch" in norm else norm)
    return {"spectral": bool(spectral), "norm": norm}


def _param_free_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=False)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False)
    raise ValueError(f"unknown param_free_norm {kind!r}; expected batch or instance")


class SPADE(nn.Module):
    """Spatially-adaptive denormalisation, Park et al. 2019 eq. (1): ``x`` normalised without
    parameters (batch or instance norm), then ``(1 + γ) · x̂ + β`` with γ, β [N, C, H, W] from a
    shared ``kernel_size`` conv (``hidden`` channels, ReLU) on the segmentation map resized
    (nearest) to ``x``, as the official ``SPADE``. (γ and β as one conv call, weights
    concatenated, measured slower and 0.17 GB heavier on CPU: docs/spade.md.)"""

    def __init__(self, norm_nc: int, label_nc: int, *, param_free_norm: str = "batch",
                 kernel_size: int = 3, hidden: int = 128) -> None:
        super().__init__()
        self.param_free_norm = _param_free_norm(param_free_norm, norm_nc)
        pw = kernel_size // 2
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, kernel_size, padding=pw), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, kernel_size, padding=pw)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, kernel_size, padding=pw)

    def forward(self, x: Tensor, segmap: Tensor) -> Tensor:
        """``x`` [N, C, H, W]; ``segmap`` [N, label_nc, h, w], resized here when h, w differ
        (the generator passes it at ``x``'s size, resized once per resolution)."""
        normalized = self.param_free_norm(x)
        actv = self.mlp_shared(resized(segmap, x.shape[-2:]))
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


def resized(segmap: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """``segmap`` at ``size`` by nearest-neighbour resampling (the official ``F.interpolate``)."""
    return segmap if segmap.shape[-2:] == size else F.interpolate(segmap, size=tuple(size), mode="nearest")


class SPADEResBlock(nn.Module):
    """The official ``SPADEResnetBlock``: SPADE → LeakyReLU(0.2) → 3×3 conv, twice, plus a
    shortcut that is learned (SPADE → 1×1 conv without bias) when ``fin != fout``; spectral norm
    on the three convs when ``spectral``."""

    def __init__(self, fin: int, fout: int, label_nc: int, *, spectral: bool = True,
                 param_free_norm: str = "batch", kernel_size: int = 3, hidden: int = 128) -> None:
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = nn.Conv2d(fin, fmiddle, 3, padding=1)
        self.conv_1 = nn.Conv2d(fmiddle, fout, 3, padding=1)
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(fin, fout, 1, bias=False)
        opts = {"param_free_norm": param_free_norm, "kernel_size": kernel_size, "hidden": hidden}
        self.norm_0 = SPADE(fin, label_nc, **opts)
        self.norm_1 = SPADE(fmiddle, label_nc, **opts)
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, label_nc, **opts)
        init_weights(self, _INIT, _INIT_GAIN)  # before spectral norm, whose power iteration starts from it
        if spectral:
            for conv in self.convs():
                spectral_norm(conv)

    def convs(self) -> list[nn.Conv2d]:
        return [self.conv_0, self.conv_1] + ([self.conv_s] if self.learned_shortcut else [])

    def forward(self, x: Tensor, seg: Tensor) -> Tensor:
        """``x`` [N, fin, H, W], ``seg`` [N, label_nc, h, w] → [N, fout, H, W]."""
        seg = resized(seg, x.shape[-2:])
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return x_s + dx


class SPADEGenerator(nn.Module):
    """The official ``SPADEGenerator``: from the segmentation map downsampled by
    2^``UPSAMPLING_LAYERS[num_upsampling_layers]`` through a 3×3 conv to 16·ngf channels (or, with
    ``use_vae``, from ``z`` [N, z_dim] through a linear layer), then SPADE residual blocks
    head_0, G_middle_0, G_middle_1, up_0..up_3 (up_4 for ``most``) with nearest ×2 upsampling
    between them, widths 16·ngf → ngf (ngf/2), and LeakyReLU → 3×3 conv → tanh.

    ``num_upsampling_layers``: ``normal`` 5 upsamplings, ``more`` one more between the middle
    blocks, ``most`` also a last block at 2× (the official choices). Without the VAE the
    starting size is the input's divided by 2^n (input sides must be multiples of 2^n); with
    it, it is fixed by ``crop_size`` and ``aspect_ratio`` as in the official code. The map is
    resized once per resolution for all blocks there. ``hidden``: the SPADE layers' shared conv
    width, 128 in the official code (hard-coded there)."""

    def __init__(self, semantic_nc: int, *, ngf: int = 64, num_upsampling_layers: str = "normal",
                 use_vae: bool = False, z_dim: int = 256, crop_size: int = 256, aspect_ratio: float = 1.0,
                 spectral: bool = True, param_free_norm: str = "batch", kernel_size: int = 3,
                 hidden: int = 128) -> None:
        super().__init__()
        if num_upsampling_layers not in UPSAMPLING_LAYERS:
            raise ValueError(f"num_upsampling_layers {num_upsampling_layers!r}; expected one of "
                             f"{', '.join(UPSAMPLING_LAYERS)}")
        self.num_up = UPSAMPLING_LAYERS[num_upsampling_layers]
        self.num_upsampling_layers = num_upsampling_layers
        self.use_vae, self.z_dim, self.ngf = use_vae, z_dim, ngf
        self.sw = crop_size // 2 ** self.num_up
        self.sh = round(self.sw / aspect_ratio)
        nf = ngf
        if use_vae:
            self.fc = nn.Linear(z_dim, 16 * nf * self.sw * self.sh)
        else:
            self.fc = nn.Conv2d(semantic_nc, 16 * nf, 3, padding=1)
        opts = {"spectral": spectral, "param_free_norm": param_free_norm, "kernel_size": kernel_size,
                "hidden": hidden}
        self.head_0 = SPADEResBlock(16 * nf, 16 * nf, semantic_nc, **opts)
        self.G_middle_0 = SPADEResBlock(16 * nf, 16 * nf, semantic_nc, **opts)
        self.G_middle_1 = SPADEResBlock(16 * nf, 16 * nf, semantic_nc, **opts)
        self.up_0 = SPADEResBlock(16 * nf, 8 * nf, semantic_nc, **opts)
        self.up_1 = SPADEResBlock(8 * nf, 4 * nf, semantic_nc, **opts)
        self.up_2 = SPADEResBlock(4 * nf, 2 * nf, semantic_nc, **opts)
        self.up_3 = SPADEResBlock(2 * nf, nf, semantic_nc, **opts)
        final_nc = nf
        if num_upsampling_layers == "most":
            self.up_4 = SPADEResBlock(nf, nf // 2, semantic_nc, **opts)
            final_nc = nf // 2
        self.conv_img = nn.Conv2d(final_nc, 3, 3, padding=1)
        for layer in (self.fc, self.conv_img):  # the blocks initialise themselves
            init_weights(layer, _INIT, _INIT_GAIN)

    def forward(self, seg: Tensor, z: Tensor | None = None) -> Tensor:
        """``seg`` [N, semantic_nc, H, W] (one-hot + edges) → [N, 3, H, W] in [-1, 1]. With the
        VAE, ``z`` [N, z_dim] is the style (drawn from N(0, I) when None)."""
        n, _, h, w = seg.shape
        step = 2 ** self.num_up
        if h % step or w % step:
            raise ValueError(f"SPADE with num_upsampling_layers={self.num_upsampling_layers} needs image sides "
                             f"divisible by {step}, got {h}x{w}: crop or resize the data (data.crop_size)")
        if self.use_vae:
            if z is None:
                z = torch.randn(n, self.z_dim, device=seg.device)
            x = self.fc(z).view(n, 16 * self.ngf, self.sh, self.sw)
        else:
            x = self.fc(F.interpolate(seg, size=(h // step, w // step), mode="nearest"))
        maps: dict[tuple[int, int], Tensor] = {}

        def block(module: SPADEResBlock, x: Tensor) -> Tensor:
            size = tuple(x.shape[-2:])
            if size not in maps:
                maps[size] = resized(seg, size)
            return module(x, maps[size])

        up = self.upsample
        x = block(self.head_0, x)
        x = block(self.G_middle_0, up(x))
        if self.num_up > 5:
            x = up(x)
        x = block(self.G_middle_1, x)
        for module in (self.up_0, self.up_1, self.up_2, self.up_3):
            x = block(module, up(x))
        if self.num_up == 7:
            x = block(self.up_4, up(x))
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))

    @staticmethod
    def upsample(x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")


class ConvEncoder(nn.Module):
    """The official VAE style ``ConvEncoder``: the image resized to 256×256 (bilinear), six 3×3
    stride-2 convs (ndf, 2, 4, 8, 8, 8 · ndf; spectral norm + instance norm by default, no bias
    before a norm) with LeakyReLU(0.2), then μ and log σ² [N, z_dim] from linear layers on the
    4×4 map. The official code drops the sixth conv below a 256 crop, which then cannot reach its
    4×4 linear layers; here it is always there."""

    def __init__(self, *, ndf: int = 64, z_dim: int = 256, norm: str = "instance", spectral: bool = True) -> None:
        super().__init__()
        widths = [3, ndf, ndf * 2, ndf * 4, ndf * 8, ndf * 8, ndf * 8]
        for i in range(6):
            conv = nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1, bias=norm == "none")
            layer = nn.Sequential(conv) if norm == "none" else nn.Sequential(conv, _plain_norm(norm, widths[i + 1]))
            setattr(self, f"layer{i + 1}", layer)
        self.fc_mu = nn.Linear(ndf * 8 * 4 * 4, z_dim)
        self.fc_var = nn.Linear(ndf * 8 * 4 * 4, z_dim)
        init_weights(self, _INIT, _INIT_GAIN)
        if spectral:
            for i in range(6):
                spectral_norm(getattr(self, f"layer{i + 1}")[0])

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """``image`` [N, 3, H, W] in [-1, 1] → (μ, log σ²), each [N, z_dim]."""
        x = image
        if x.shape[-2:] != (256, 256):
            x = F.interpolate(x, size=(256, 256), mode="bilinear")
        for i in range(6):
            x = getattr(self, f"layer{i + 1}")(x if i == 0 else F.leaky_relu(x, 0.2))
        x = F.leaky_relu(x, 0.2).flatten(1)
        return self.fc_mu(x), self.fc_var(x)


def _plain_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=True)
    return nn.InstanceNorm2d(channels, affine=False)


def spade_discriminator(input_nc: int, *, ndf: int = 64, n_layers_D: int = 4, num_D: int = 2,
                        norm: str = "instance", spectral: bool = True) -> MultiscaleDiscriminator:
    """SPADE's ``MultiscaleDiscriminator`` of ``NLayerDiscriminator``s: pix2pixHD's multiscale
    discriminator with spectral norm on its normalised convs (bias removed), Xavier init, and
    the official layer count (``n_layers_D`` 4 = first conv, two stride-2 and one stride-1
    normalised convs, the logits conv). Output: per scale, ``n_layers_D + 1`` features, logits
    last."""
    if n_layers_D < 2:
        raise ValueError(f"n_layers_D must be >= 2, got {n_layers_D}")
    return MultiscaleDiscriminator(input_nc, ndf=ndf, n_layers=n_layers_D - 1, num_D=num_D, norm=norm,
                                   spectral=spectral, norm_bias=False, init=_INIT)
