"""Unconditional DCGAN-family training (Radford et al. 2016): non-saturating, LSGAN, hinge, or
WGAN with gradient penalty (Gulrajani et al. 2017) or weight clipping (Arjovsky et al. 2017),
``optim.n_critic`` D steps per G step, optional spectral norm and decaying instance noise."""

from __future__ import annotations

import torch

from ..config import Config
from ..data.device import float_image
from ..losses.adversarial import d_loss, g_loss
from ..losses.regularizers import gradient_penalty, weight_clip_
from ..models.dcgan import DCGANDiscriminator, DCGANGenerator
from ..models.layers import init_weights
from .family import DataInfo, Family, Phase, StepContext


def build(cfg: Config, info: DataInfo) -> dict:
    m = cfg.model
    G = DCGANGenerator(z_dim=m.z_dim, ngf=m.ngf, out_channels=3, image_size=m.image_size)
    D = DCGANDiscriminator(in_channels=3, ndf=m.ndf, image_size=m.image_size, norm=m.norm_D,
                           spectral_norm=m.spectral_norm)
    return {"G": init_weights(G, "normal", m.init_gain), "D": init_weights(D, "normal", m.init_gain)}


def fields(info: DataInfo) -> tuple[str, ...]:
    return ("image",)


def prepare(batch: dict, device: torch.device, cfg: Config, info: DataInfo) -> dict:
    """``image`` [N, 3, S, S] in [-1, 1] (the loader's uint8, converted on the device) and ``z``
    [N, z_dim] drawn from the rank's RNG."""
    image = float_image(batch["image"].to(device, non_blocking=True))
    if image.shape[-1] != cfg.model.image_size or image.shape[-2] != cfg.model.image_size:
        raise ValueError(f"dcgan expects {cfg.model.image_size}x{cfg.model.image_size} images, got "
                         f"{tuple(image.shape[-2:])}: set data.load_size / data.crop_size")
    z = torch.randn(image.shape[0], cfg.model.z_dim, device=device)
    return {"image": image, "z": z}


def _noisy(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x + sigma * torch.randn_like(x) if sigma > 0 else x


def d_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    cfg = ctx.cfg
    sigma = ctx.instance_noise()
    with torch.no_grad(), ctx.autocast():
        fake = ctx.G(b["z"])
    real_in, fake_in = _noisy(b["image"], sigma), _noisy(fake.float(), sigma)
    with ctx.autocast():
        pred_real, pred_fake = ctx.D(torch.cat([real_in, fake_in])).chunk(2) if cfg.model.norm_D != "batch" \
            else (ctx.D(real_in), ctx.D(fake_in))
    l_real, l_fake = d_loss(cfg.loss.gan, pred_real, pred_fake)
    losses = {"D_real": l_real, "D_fake": l_fake}
    loss = l_real + l_fake
    if cfg.loss.gp_weight > 0:
        # Through the plain module: the penalty's double backward must not run DDP's reducer twice.
        gp = gradient_penalty(ctx.D_plain, b["image"], fake)
        losses["D_gp"] = gp
        loss = loss + cfg.loss.gp_weight * gp
    losses["loss"] = loss
    return losses


def g_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    with ctx.autocast():
        fake = ctx.G(torch.randn_like(b["z"]))
        pred = ctx.D_plain(_noisy(fake, ctx.instance_noise()))
    g = g_loss(ctx.cfg.loss.gan, pred)
    return {"loss": g, "G_GAN": g}


def clip_after_step(D, cfg: Config) -> None:
    if cfg.loss.weight_clip > 0:
        weight_clip_(D, cfg.loss.weight_clip)


@torch.no_grad()
def visualize(G, b: dict, info: DataInfo) -> list[torch.Tensor]:
    """Columns: a generated image from a fixed latent | a real image."""
    return [G(b["z"]).float(), b["image"].float()]


FAMILY = Family(
    name="dcgan",
    build=build,
    phases=(Phase("D", "D", d_step, after_step=clip_after_step), Phase("G", "G", g_step, fetch=False)),
    prepare=prepare,
    visualize=visualize,
    fields=fields,
)
