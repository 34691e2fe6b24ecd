"""Single-image super-resolution (Ledig et al. 2017): ``srresnet``, the MSE-trained SRResNet
(the pre-training stage), and ``srgan``, SRResNet against the VGG-style D with the VGG content
loss + 10⁻³ adversarial loss, started from an ``srresnet`` run with ``model.init_from``.

Any image folder is a training set: the stream's random ``data.crop_size`` crops are the HR
images, and the LR inputs are made from them on the device by bicubic ×``scale`` downsampling
(antialiased, as MATLAB's ``imresize``), quantised to 8 bits as a saved LR image would be.
Evaluation: PSNR and SSIM on the Y channel with ``scale`` pixels cropped from each border (the
Set5/Set14 protocol), the RGB paired metrics and LPIPS (with its weights), FID/KID.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import Config, ConfigError, ModelConfig, bounded, choice
from ..data.device import float_image
from ..eval.paired import psnr_ssim_y
from ..losses.adversarial import d_loss, g_loss
from ..losses.perceptual import require_vgg_weights, vgg_content_loss
from ..models.layers import init_weights
from ..models.srgan import SRGANDiscriminator, SRResNet
from ..train.family import DataInfo, Evaluation, Family, Network, Optimizer, Phase, StepContext, Stream

CONTENT_LAYERS = {"vgg54": "relu5_4", "vgg22": "relu2_2"}


@dataclass
class SRResNetConfig(ModelConfig):
    """SRResNet (the paper's MSE-trained network): Adam(1e-4, 0.9, 0.999), 10⁶ updates of 16
    96×96 crops in the paper."""

    family: str = "srresnet"
    scale: int = choice(4, 2, 4, 8)  # upsampling factor: log2(scale) sub-pixel stages
    ngf: int = bounded(64, 1)
    num_blocks: int = bounded(16, 1)  # B residual blocks
    lr_G: float = bounded(1e-4, 0.0)
    beta1: float = bounded(0.9, 0.0, 1.0)
    beta2: float = bounded(0.999, 0.0, 1.0)


@dataclass
class SRGANConfig(SRResNetConfig):
    """SRGAN: the content loss (VGG54 by default; VGG22 or the pixel MSE are the paper's other
    variants) + ``adv_weight`` × the non-saturating adversarial loss; both networks Adam(1e-4,
    0.9, 0.999), 10⁵ updates, then 10⁵ at 10⁻⁵ (``optim.schedule=step``)."""

    family: str = "srgan"
    ndf: int = bounded(64, 1)
    content: str = choice("vgg54", "vgg54", "vgg22", "mse")
    vgg_weights: str | None = None  # local torchvision vgg19 state_dict file (never downloaded)
    vgg_rescale: float = bounded(1 / 12.75, 0.0)  # the paper's rescaling of the VGG features
    adv_weight: float = bounded(1e-3, 0.0)
    gan: str = choice("vanilla", "vanilla", "lsgan", "hinge")
    lr_D: float = bounded(1e-4, 0.0)

    def check_files(self) -> None:
        require_vgg_weights(1.0 if self.content != "mse" else 0.0, self.vgg_weights)


def _hr_size(cfg: Config) -> tuple[int, int]:
    """(W, H) of the HR images the stream yields: the crop, else the resize."""
    size = cfg.data.crop_size or cfg.data.load_size
    if size is None:
        raise ConfigError(f"model.family={cfg.model.family} trains on fixed-size HR crops: set data.crop_size "
                          "(the paper: 96,96)")
    if size[0] % cfg.model.scale or size[1] % cfg.model.scale:
        raise ConfigError(f"data.crop_size {size[0]}x{size[1]} is not divisible by model.scale={cfg.model.scale}")
    return size


def build_srresnet(cfg: Config, info: DataInfo) -> dict:
    m = cfg.model
    _hr_size(cfg)
    G = SRResNet(ngf=m.ngf, num_blocks=m.num_blocks, scale=m.scale)
    return {"G": G}


def build_srgan(cfg: Config, info: DataInfo) -> dict:
    m = cfg.model
    width, height = _hr_size(cfg)
    if width != height:
        raise ConfigError(f"SRGAN's D takes square HR crops; data.crop_size is {width}x{height}")
    D = init_weights(SRGANDiscriminator(ndf=m.ndf, image_size=width), "normal", 0.02)
    return {**build_srresnet(cfg, info), "D": D}


def streams(cfg: Config, info: DataInfo, split: str) -> tuple[Stream, ...]:
    return (Stream("data", split, ("image",)),)


def downsample(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """HR ``[N, 3, H, W]`` in [-1, 1] → LR ``[N, 3, H/scale, W/scale]`` in [0, 1]: antialiased
    bicubic (MATLAB ``imresize``'s kernel widened by the factor), rounded to 8-bit levels."""
    lr = F.interpolate((hr.float() + 1) / 2, scale_factor=1 / scale, mode="bicubic", antialias=True,
                       align_corners=False)
    return torch.round(lr.clamp(0, 1) * 255) / 255


def prepare(batches: dict[str, dict], device: torch.device, cfg: Config, info: DataInfo) -> dict:
    """``image`` (HR) [N, 3, H, W] in [-1, 1] and ``lr`` [N, 3, H/scale, W/scale] in [0, 1]."""
    hr = float_image(batches["data"]["image"].to(device, non_blocking=True))
    if hr.shape[-1] % cfg.model.scale or hr.shape[-2] % cfg.model.scale:
        raise ValueError(f"HR images of {hr.shape[-1]}x{hr.shape[-2]} are not divisible by model.scale="
                         f"{cfg.model.scale}: set data.crop_size")
    return {"image": hr, "lr": downsample(hr, cfg.model.scale)}


def mse_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    """SRResNet's loss: the pixel MSE (Eq. 4) on [-1, 1] images."""
    with ctx.autocast():
        sr = ctx.nets["G"](b["lr"])
    mse = F.mse_loss(sr.float(), b["image"])
    return {"loss": mse, "G_MSE": mse}


def g_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    """SRGAN's perceptual loss (Eq. 3): content + ``adv_weight`` × adversarial (Eq. 6)."""
    m = ctx.cfg.model
    with ctx.autocast():
        sr = ctx.nets["G"](b["lr"])
        pred = ctx.plain["D"](sr)  # D is frozen
    scratch["sr"] = sr.detach()
    if m.content == "mse":
        content = F.mse_loss(sr.float(), b["image"])
    else:
        loss = vgg_content_loss(m.vgg_weights, sr.device, CONTENT_LAYERS[m.content], m.vgg_rescale)
        content = loss(sr, b["image"])
    adversarial = g_loss(m.gan, pred)
    return {"loss": content + m.adv_weight * adversarial, "G_content": content, "G_GAN": adversarial}


def d_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    """D on the real HR crops and on G's detached outputs, in separate calls (batch norm)."""
    D = ctx.nets["D"]
    with ctx.autocast():
        pred_real, pred_fake = D(b["image"]), D(scratch["sr"])
    l_real, l_fake = d_loss(ctx.cfg.model.gan, pred_real, pred_fake)
    return {"loss": l_real + l_fake, "D_real": l_real, "D_fake": l_fake}


def evaluations(cfg: Config, info: DataInfo, split: str) -> tuple[Evaluation, ...]:
    scale = cfg.model.scale
    return (Evaluation("", reference=split, generate=lambda nets, b: nets["G"](b["lr"]),
                       inputs=streams(cfg, info, split)[0], paired=True,
                       per_image=lambda nets, b, sr, lpips: psnr_ssim_y(sr, b["image"], border=scale)),)


@torch.no_grad()
def visualize(nets: dict, b: dict, info: DataInfo) -> list[torch.Tensor]:
    """Columns: the LR input (nearest-upsampled, to show its pixels) | bicubic ×scale | G | HR."""
    scale = b["image"].shape[-1] // b["lr"].shape[-1]
    lr = b["lr"] * 2 - 1
    bicubic = F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)
    return [F.interpolate(lr, scale_factor=scale, mode="nearest"), bicubic, nets["G"](b["lr"]).float(),
            b["image"]]


def optimizers(cfg: Config) -> tuple[Optimizer, ...]:
    m = cfg.model
    g = Optimizer("G", ("G",), m.lr_G, (m.beta1, m.beta2))
    return (g, Optimizer("D", ("D",), m.lr_D, (m.beta1, m.beta2))) if m.family == "srgan" else (g,)


SRRESNET = Family(
    name="srresnet",
    config=SRResNetConfig,
    build=build_srresnet,
    networks=(Network("G", ema=True, snapshot=True),),
    optimizers=optimizers,
    phases=lambda cfg: (Phase("G", ("G",), mse_step),),
    streams=streams,
    prepare=prepare,
    evaluations=evaluations,
    visualize=visualize,
)

SRGAN = Family(
    name="srgan",
    config=SRGANConfig,
    build=build_srgan,
    networks=(Network("G", ema=True, snapshot=True), Network("D")),
    optimizers=optimizers,
    phases=lambda cfg: (Phase("G", ("G",), g_step), Phase("D", ("D",), d_step, fetch=False)),
    streams=streams,
    prepare=prepare,
    evaluations=evaluations,
    visualize=visualize,
)
