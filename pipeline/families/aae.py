"""The adversarial autoencoder (Makhzani et al. 2016): an autoencoder whose codes are matched to a
prior p(z) by a discriminator on codes. Each iteration runs the paper's phases in its order: the
reconstruction phase (E and the decoder Dec against the reconstruction error), then the
regularisation phase, D_z (prior samples against codes) and then E as its generator.

Networks: ``E`` (ConvEncoder), ``Dec`` (the DCGAN generator: generates from the prior),
``D_z`` (CodeDiscriminator). Each has its own Adam; E's steps in both of its phases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import Config, ModelConfig, bounded, choice
from ..data.device import float_image
from ..losses.adversarial import d_loss, g_loss
from ..models.aae import CodeDiscriminator, ConvEncoder
from ..models.dcgan import DCGANGenerator
from ..models.layers import init_weights
from ..train.family import DataInfo, Evaluation, Family, Network, Optimizer, Phase, StepContext, Stream


@dataclass
class AAEConfig(ModelConfig):
    """The paper's unsupervised AAE: a deterministic encoder, an 8-dimensional code (MNIST) with a
    Gaussian prior (or a mixture of Gaussians), D_z of two 1000-unit layers. The paper trains with
    SGD with momentum; the contract's optimizers are Adam (DCGAN's settings here)."""

    family: str = "aae"
    z_dim: int = bounded(8, 1)
    ngf: int = bounded(64, 1)
    ndf: int = bounded(64, 1)
    image_size: int = choice(64, 32, 64, 128)
    d_hidden: int = bounded(1000, 1)
    prior: str = choice("gaussian", "gaussian", "mixture")
    prior_std: float = bounded(1.0, 0.0)  # gaussian: N(0, std^2 I)
    # mixture: this many Gaussians of std prior_std / 2, means evenly on a circle of radius 2 * prior_std
    # in the first two code dimensions (the paper's 2-D mixture of 10, embedded in z_dim dimensions)
    prior_components: int = bounded(10, 2)
    recon: str = choice("mse", "mse", "l1")
    adv_weight: float = bounded(1.0, 0.0)  # E's adversarial loss against D_z
    lr_E: float = bounded(2e-4, 0.0)
    lr_Dec: float = bounded(2e-4, 0.0)
    lr_D: float = bounded(2e-4, 0.0)
    beta1: float = bounded(0.5, 0.0, 1.0)
    beta2: float = bounded(0.999, 0.0, 1.0)


def build(cfg: Config, info: DataInfo) -> dict:
    m = cfg.model
    E = ConvEncoder(ndf=m.ndf, image_size=m.image_size, z_dim=m.z_dim)
    Dec = DCGANGenerator(z_dim=m.z_dim, ngf=m.ngf, image_size=m.image_size)
    D_z = init_weights(CodeDiscriminator(z_dim=m.z_dim, hidden=m.d_hidden), "normal", 0.02)
    return {"E": E, "Dec": Dec, "D_z": D_z}


def sample_prior(m: AAEConfig, n: int, device: torch.device, z: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` codes from p(z) [n, z_dim], from the torch RNG (or from standard normal ``z``)."""
    z = torch.randn(n, m.z_dim, device=device) if z is None else z
    if m.prior == "gaussian":
        return z * m.prior_std
    k = torch.randint(m.prior_components, (n,), device=device)
    angle = 2 * math.pi * k.float() / m.prior_components
    means = torch.zeros(n, m.z_dim, device=device)
    means[:, 0], means[:, 1] = torch.cos(angle), torch.sin(angle)
    return means * 2 * m.prior_std + z * (m.prior_std / 2)


def streams(cfg: Config, info: DataInfo, split: str) -> tuple[Stream, ...]:
    return (Stream("data", split, ("image",)),)


def prepare(batches: dict[str, dict], device: torch.device, cfg: Config, info: DataInfo) -> dict:
    """``image`` [N, 3, S, S] in [-1, 1] and ``z`` [N, z_dim], prior samples from the rank's RNG."""
    image = float_image(batches["data"]["image"].to(device, non_blocking=True))
    size = cfg.model.image_size
    if image.shape[-2:] != (size, size):
        raise ValueError(f"aae expects {size}x{size} images, got {tuple(image.shape[-2:])}: set data.load_size / "
                         f"data.crop_size")
    return {"image": image, "z": sample_prior(cfg.model, image.shape[0], device)}


def _recon_error(kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(x.float(), y) if kind == "mse" else F.l1_loss(x.float(), y)


def recon_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    """The reconstruction phase: E and Dec minimise the reconstruction error of x."""
    with ctx.autocast():
        rec = ctx.nets["Dec"](ctx.nets["E"](b["image"]))
    loss = _recon_error(ctx.cfg.model.recon, rec, b["image"])
    return {"loss": loss, "recon": loss}


def d_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    """The regularisation phase, D_z: prior samples are "real", E's codes (E frozen) "fake"."""
    with torch.no_grad(), ctx.autocast():
        code = ctx.plain["E"](b["image"]).float()
    with ctx.autocast():
        pred = ctx.nets["D_z"](torch.cat([b["z"], code]))  # no batch norm in D_z: one call for both
    pred_real, pred_fake = pred.chunk(2)
    l_real, l_fake = d_loss("vanilla", pred_real, pred_fake)
    return {"loss": l_real + l_fake, "D_real": l_real, "D_fake": l_fake}


def g_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    """The regularisation phase, E as the generator: its codes should pass D_z (frozen) as prior
    samples (the non-saturating form)."""
    with ctx.autocast():
        pred = ctx.plain["D_z"](ctx.nets["E"](b["image"]))
    g = g_loss("vanilla", pred) * ctx.cfg.model.adv_weight
    return {"loss": g, "E_GAN": g}


def optimizers(cfg: Config) -> tuple[Optimizer, ...]:
    m = cfg.model
    betas = (m.beta1, m.beta2)
    return (Optimizer("E", ("E",), m.lr_E, betas), Optimizer("Dec", ("Dec",), m.lr_Dec, betas),
            Optimizer("D_z", ("D_z",), m.lr_D, betas))


def phases(cfg: Config) -> tuple[Phase, ...]:
    return (Phase("recon", ("E", "Dec"), recon_step), Phase("D_z", ("D_z",), d_step, fetch=False),
            Phase("E_gan", ("E",), g_step, fetch=False))


def evaluations(cfg: Config, info: DataInfo, split: str) -> tuple[Evaluation, ...]:
    """FID/KID (and diversity) of decoded prior samples: the generative model, under the plain
    metric names; ``recon``: the split's images reconstructed, PSNR/SSIM (and LPIPS) their error
    (``psnr_recon``, ...)."""
    m = cfg.model
    return (Evaluation("", reference=split, generate=lambda nets, b: nets["Dec"](sample_prior(m, len(b["z"]),
                                                                                       b["z"].device, b["z"]))),
            Evaluation("recon", reference=split, generate=lambda nets, b: nets["Dec"](nets["E"](b["image"])),
                       inputs=streams(cfg, info, split)[0], paired=True))


@torch.no_grad()
def visualize(nets: dict, b: dict, info: DataInfo) -> list[torch.Tensor]:
    """Columns: the image | its reconstruction | a decoded prior sample (the grid's fixed ``z``)."""
    return [b["image"], nets["Dec"](nets["E"](b["image"])).float(), nets["Dec"](b["z"]).float()]


FAMILY = Family(
    name="aae",
    config=AAEConfig,
    build=build,
    networks=(Network("E", snapshot=True), Network("Dec", ema=True, snapshot=True), Network("D_z")),
    optimizers=optimizers,
    phases=phases,
    streams=streams,
    prepare=prepare,
    evaluations=evaluations,
    visualize=visualize,
)
