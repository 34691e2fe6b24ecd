"""Paired (per-image) metrics for image-to-image models: PSNR, SSIM, MS-SSIM and LPIPS ('alex', v0.1).

Images are float tensors ``[N, C, H, W]`` in the generator's range ``[-1, 1]`` (what the data pipeline
yields and a tanh G emits); every function takes ``value_range`` to say otherwise. PSNR, SSIM and
MS-SSIM work in ``[0, 1]`` units (data range 1), LPIPS in ``[-1, 1]`` as the official package does.
Every function returns one value per image, ``[N]`` float32, computed in fp32 without grad.

The LPIPS weights (torchvision's AlexNet features + the official linear heads) come from one local
file; build it once with ``python -m pipeline.eval.paired`` (see ``missing_lpips_message``).
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Mapping, Sequence
from io import BytesIO

import torch
import torch.nn.functional as F
from torch import nn

from .. import io
from .metrics import load_tensor_state_dict

# Wang et al. 2004 (SSIM) and Wang, Simoncelli & Bovik 2003 (MS-SSIM) standard constants.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

# Official lpips v0.1 ScalingLayer: maps [-1, 1] inputs to ImageNet-normalised ones.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10  # official normalize_tensor's epsilon

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"  # torchvision IMAGENET1K_V1
LPIPS_LINEAR_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth"


def missing_lpips_message(path: str) -> str:
    return (
        f"LPIPS weights not found at {path}.\n"
        "LPIPS ('alex', v0.1) reads one local file holding torchvision's AlexNet features and the official "
        "linear heads; nothing is downloaded at run time. On a machine with internet:\n"
        f"    curl -L -o alexnet-owt-7be5be79.pth {ALEXNET_URL}\n"
        f"    curl -L -o lpips-v0.1-alex-linear.pth {LPIPS_LINEAR_URL}\n"
        "    (the second file is also lpips/weights/v0.1/alex.pth inside the `lpips` wheel on PyPI)\n"
        "    python -m pipeline.eval.paired --alexnet alexnet-owt-7be5be79.pth "
        "--linear lpips-v0.1-alex-linear.pth --out lpips_alex_v0.1.pth\n"
        "then copy lpips_alex_v0.1.pth where every evaluator can read it and pass it as "
        "--lpips-weights PATH (config: eval.lpips_weights=PATH)."
    )


def _to_unit(images: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    lo, hi = value_range
    return (images.detach().float() - lo) / (hi - lo)


def _pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two image batches [N, C, H, W] of one shape, got {list(x.shape)} "
                         f"and {list(y.shape)}")


# ---------------------------------------------------------------------------------- PSNR


@torch.no_grad()
def psnr(x: torch.Tensor, y: torch.Tensor, *, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``[N]``: ``10 log10(1 / MSE)`` over C, H, W in ``[0, 1]`` units
    (the same number as ``10 log10(range^2 / MSE)`` in the input's units). Identical images give inf."""
    _pair(x, y)
    mse = (_to_unit(x, value_range) - _to_unit(y, value_range)).square().mean(dim=(1, 2, 3))
    return 10 * torch.log10(1.0 / mse)


# ---------------------------------------------------------------------------------- SSIM, MS-SSIM


def _gaussian(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """The normalised 1-D Gaussian ``[size]``; its outer product is MATLAB's fspecial('gaussian')."""
    t = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(t * t) / (2 * sigma * sigma))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter per channel, 'valid' region only (as the reference ssim.m does):
    ``[N, C, H, W]`` -> ``[N, C, H - k + 1, W - k + 1]``."""
    c, k = x.shape[1], g.numel()
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term per image and channel, each ``[N, C]``, for images in
    ``[0, 1]`` (so ``C1 = (K1 * 1)^2``, ``C2 = (K2 * 1)^2``)."""
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    c = x.shape[1]
    # One grouped filter pass over all five moments instead of five passes.
    moments = _blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), g)
    mu_x, mu_y, xx, yy, xy = moments.split(c, dim=1)
    var_x, var_y, cov = xx - mu_x * mu_x, yy - mu_y * mu_y, xy - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return (luminance * cs).mean(dim=(2, 3)), cs.mean(dim=(2, 3))


def _check_size(x: torch.Tensor, scales: int) -> None:
    need = (SSIM_WINDOW - 1) * 2 ** (scales - 1) + 1  # the coarsest scale must still hold one window
    if min(x.shape[-2:]) < need:
        what = "SSIM" if scales == 1 else f"MS-SSIM with {scales} scales"
        raise ValueError(f"{what} needs images of at least {need}x{need} pixels (the coarsest scale must "
                         f"fit the {SSIM_WINDOW}-pixel window); got {x.shape[-2]}x{x.shape[-1]}")


@torch.no_grad()
def ssim(x: torch.Tensor, y: torch.Tensor, *, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), ``[N]``: Gaussian window 11, sigma 1.5, K1 0.01,
    K2 0.03, data range 1 in ``[0, 1]`` units, valid-region map averaged over channels and pixels.
    No automatic downsampling (the reference ssim.m shrinks images larger than 256 px; libraries don't)."""
    _pair(x, y)
    _check_size(x, 1)
    x, y = _to_unit(x, value_range), _to_unit(y, value_range)
    value, _ = _ssim_and_cs(x, y, _gaussian(SSIM_WINDOW, SSIM_SIGMA, x.device))
    return value.mean(dim=1)


def _halve(x: torch.Tensor) -> torch.Tensor:
    """2x2 mean then keep every other pixel, as the reference msssim.m does; an odd last row/column
    is averaged with its mirror (itself), so sizes go to ceil(n / 2)."""
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2), mode="replicate")
    return F.avg_pool2d(x, kernel_size=2, stride=2)


@torch.no_grad()
def ms_ssim(x: torch.Tensor, y: torch.Tensor, *, value_range: tuple[float, float] = (-1.0, 1.0),
            weights: Sequence[float] = MS_SSIM_WEIGHTS) -> torch.Tensor:
    """Multi-scale SSIM (Wang, Simoncelli & Bovik 2003), ``[N]``: contrast-structure at scales 1..M-1
    and full SSIM at scale M (M = 5 with the standard weights), each raised to its weight and
    multiplied, per channel, then averaged over channels. Negative terms are clamped to 0 before the
    fractional powers (they would give NaN), as pytorch-msssim does. Needs sides of at least 161 px."""
    _pair(x, y)
    _check_size(x, len(weights))
    x, y = _to_unit(x, value_range), _to_unit(y, value_range)
    g = _gaussian(SSIM_WINDOW, SSIM_SIGMA, x.device)
    terms = []
    for scale in range(len(weights)):
        value, cs = _ssim_and_cs(x, y, g)
        if scale == len(weights) - 1:
            terms.append(value)
        else:
            terms.append(cs)
            x, y = _halve(x), _halve(y)
    w = torch.tensor(weights, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    per_channel = torch.stack(terms).clamp(min=0).pow(w).prod(dim=0)  # [N, C]
    return per_channel.mean(dim=1)


def ms_ssim_weights(height: int, width: int) -> tuple[float, ...]:
    """The standard MS-SSIM weights for the scales that fit ``height`` x ``width`` images (the
    coarsest must still hold the 11-pixel window: 5 scales from 161 px, 3 at 64, 2 at 32); fewer
    than five are renormalised to sum to 1, so small images get a multi-scale SSIM of the same form."""
    scales = len(MS_SSIM_WEIGHTS)
    while scales > 1 and min(height, width) < (SSIM_WINDOW - 1) * 2 ** (scales - 1) + 1:
        scales -= 1
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"MS-SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {height}x{width}")
    if scales == len(MS_SSIM_WEIGHTS):
        return MS_SSIM_WEIGHTS
    used = MS_SSIM_WEIGHTS[:scales]
    return tuple(w / sum(used) for w in used)


# ---------------------------------------------------------------------------------- the SR protocol


def luma(images: torch.Tensor, *, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """ITU-R BT.601 luma Y of RGB images as MATLAB's ``rgb2ycbcr`` gives it (studio range, 16–235
    of 255), ``[N, 1, H, W]`` in ``[0, 1]`` units: the channel the super-resolution literature
    (SRCNN, SRGAN, EDSR) measures PSNR and SSIM on."""
    x = _to_unit(images, value_range)
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (16.0 + 65.481 * r + 128.553 * g + 24.966 * b) / 255.0


@torch.no_grad()
def psnr_ssim_y(x: torch.Tensor, y: torch.Tensor, *, border: int,
                value_range: tuple[float, float] = (-1.0, 1.0)) -> dict[str, torch.Tensor]:
    """The Set5/Set14 protocol: both images quantised to 8 bits (as they would be saved), the Y
    channel, ``border`` pixels (the scale factor) cropped from each side, then PSNR and SSIM, each
    ``[N]``: ``{"psnr_y", "ssim_y"}``."""
    _pair(x, y)
    q = [torch.round(_to_unit(t, value_range).clamp(0, 1) * 255) / 255 for t in (x, y)]
    ys = [luma(t, value_range=(0.0, 1.0)) for t in q]
    if border:
        if min(x.shape[-2:]) <= 2 * border:
            raise ValueError(f"images of {x.shape[-2]}x{x.shape[-1]} pixels leave nothing after cropping {border} "
                             f"from each border")
        ys = [t[..., border:-border, border:-border] for t in ys]
    return {"psnr_y": psnr(*ys, value_range=(0.0, 1.0)), "ssim_y": ssim(*ys, value_range=(0.0, 1.0))}


# ---------------------------------------------------------------------------------- LPIPS


def _unit_normalize(f: torch.Tensor) -> torch.Tensor:
    """Each pixel's feature vector divided by its L2 norm over channels (official normalize_tensor)."""
    return f / (f.square().sum(dim=1, keepdim=True).sqrt() + LPIPS_EPS)


class LPIPS(nn.Module):
    """LPIPS distance: Zhang, Isola, Efros, Shechtman & Wang, "The Unreasonable Effectiveness of Deep
    Features as a Perceptual Metric", CVPR 2018; the 'alex' network, version 0.1, of the official
    ``lpips`` package (lpips/lpips.py, lpips/pretrained_networks.py).

    ``forward(x, y)``, images ``[N, 3, H, W]`` in ``[-1, 1]`` -> ``[N]``: the scaling layer, AlexNet
    features tapped after relu1..relu5, each unit-normalised over channels, squared differences, a
    learned 1x1 convolution per layer (no bias; the official Dropout before it is the identity in
    evaluation and is left out), spatial mean, sum over the five layers.

    State dict (the weights file's format): ``features.{0,3,6,8,10}.{weight,bias}`` exactly as in
    torchvision's ``alexnet().features`` and ``lins.{0..4}.weight`` ``[1, C, 1, 1]`` from the official
    ``lin{k}.model.1.weight``. The scaling constants are code, not weights.
    """

    CHANNELS = (64, 192, 384, 256, 256)
    TAPS = (1, 4, 7, 9, 11)  # indices of relu1..relu5 in torchvision's AlexNet.features

    def __init__(self) -> None:
        super().__init__()
        # Same layers at the same indices as torchvision's AlexNet.features up to relu5, so its
        # state-dict keys apply unchanged.
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
        )
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in self.CHANNELS)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.weights_sha256: str | None = None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = (torch.cat([x, y]) - self.shift) / self.scale  # both images in one batch through the net
        total = h.new_zeros(n)
        taps = iter(self.lins)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.TAPS:
                fx, fy = _unit_normalize(h[:n]), _unit_normalize(h[n:])
                total = total + next(taps)((fx - fy).square()).mean(dim=(1, 2, 3))
        return total


def load_lpips(weights_path: str, device: str | torch.device = "cpu", *,
               storage_options: dict | None = None) -> LPIPS:
    """An ``LPIPS`` in fp32 evaluation mode with weights from ``weights_path`` (a local path or any
    fsspec URL; format in ``LPIPS``'s docstring). A missing file raises FileNotFoundError saying how to
    build it; the file's SHA-256 is kept as ``weights_sha256``."""
    weights_path = str(weights_path)
    try:
        data = io.read_bytes(weights_path, storage_options)
    except FileNotFoundError as exc:
        raise FileNotFoundError(missing_lpips_message(weights_path)) from exc
    model = LPIPS()
    try:
        model.load_state_dict(load_tensor_state_dict(data, weights_path))
    except RuntimeError as exc:
        raise ValueError(f"{weights_path} is not an LPIPS weights file of this pipeline's format "
                         f"({exc}).\n{missing_lpips_message(weights_path).split(chr(10), 1)[1]}") from exc
    model.weights_sha256 = hashlib.sha256(data).hexdigest()
    return model.float().eval().requires_grad_(False).to(device)


@torch.no_grad()
def lpips(model: LPIPS, x: torch.Tensor, y: torch.Tensor, *,
          value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """LPIPS distance per image pair, ``[N]`` float32 on ``x``'s device; identical images give 0."""
    _pair(x, y)
    device, out_device = next(model.parameters()).device, x.device
    x = _to_unit(x, value_range).to(device) * 2 - 1
    y = _to_unit(y, value_range).to(device) * 2 - 1
    return model(x, y).to(out_device)


def build_lpips_state_dict(alexnet_state: Mapping[str, torch.Tensor],
                           linear_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This pipeline's LPIPS weights from torchvision's AlexNet state dict (``features.*`` is used,
    ``classifier.*`` ignored) and the official lpips v0.1 'alex' linear heads (``lin{k}.model.1.weight``,
    or ``lins.{k}.model.1.weight`` as newer lpips versions also save them). Validated by a strict load."""
    out: dict[str, torch.Tensor] = {}
    for i in (0, 3, 6, 8, 10):
        for p in ("weight", "bias"):
            out[f"features.{i}.{p}"] = alexnet_state[f"features.{i}.{p}"]
    for k in range(len(LPIPS.CHANNELS)):
        names = (f"lin{k}.model.1.weight", f"lins.{k}.model.1.weight")
        found = next((n for n in names if n in linear_state), None)
        if found is None:
            raise KeyError(f"the linear-head file has neither of {names}; its keys: {sorted(linear_state)}")
        out[f"lins.{k}.weight"] = linear_state[found]
    out = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}
    LPIPS().load_state_dict(out)  # raises on any shape mismatch
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Build the LPIPS weights file from the two downloaded files (run once, anywhere)."""
    p = argparse.ArgumentParser(prog="python -m pipeline.eval.paired",
                                description="Build the LPIPS ('alex', v0.1) weights file this pipeline reads.")
    p.add_argument("--alexnet", required=True, help=f"torchvision AlexNet weights ({ALEXNET_URL})")
    p.add_argument("--linear", required=True, help=f"official lpips v0.1 alex linear heads ({LPIPS_LINEAR_URL})")
    p.add_argument("--out", required=True, help="output file (local path or fsspec URL)")
    args = p.parse_args(argv)
    state = build_lpips_state_dict(load_tensor_state_dict(io.read_bytes(args.alexnet), args.alexnet),
                                   load_tensor_state_dict(io.read_bytes(args.linear), args.linear))
    buf = BytesIO()
    torch.save(state, buf)
    io.atomic_write_bytes(args.out, buf.getvalue())
    print(f"wrote {args.out} ({len(buf.getvalue())} bytes, sha256 {hashlib.sha256(buf.getvalue()).hexdigest()})")


if __name__ == "__main__":
    main()
