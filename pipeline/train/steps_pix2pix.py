"""pix2pix (Isola et al. 2017): U-Net G, PatchGAN D on (input, image) pairs, GAN loss + λ·L1.

Loss names follow the official code (``G_GAN``, ``G_L1``, ``D_real``, ``D_fake``); D's loss is
halved as there, so D learns at half G's rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Config
from ..data.device import class_ids, float_image
from ..losses.adversarial import d_loss, g_loss
from ..models.layers import init_weights
from ..models.pix2pix import NLayerDiscriminator, UnetGenerator
from .family import DataInfo, Family, Phase, StepContext, one_hot


def input_channels(info: DataInfo) -> int:
    if info.task == "label2image":
        return int(info.num_classes)
    if info.task == "paired":
        return 3
    raise ValueError(f"pix2pix trains on label2image or paired shards, not {info.task!r}")


def build(cfg: Config, info: DataInfo) -> dict:
    m = cfg.model
    in_nc = input_channels(info)
    num_downs = {"unet_256": 8, "unet_128": 7}[m.generator]
    G = UnetGenerator(input_nc=in_nc, output_nc=3, num_downs=num_downs, ngf=m.ngf, norm=m.norm,
                      use_dropout=m.dropout)
    D = NLayerDiscriminator(input_nc=in_nc + 3, ndf=m.ndf, n_layers=m.n_layers_D, norm=m.norm_D)
    return {"G": init_weights(G, "normal", m.init_gain), "D": init_weights(D, "normal", m.init_gain)}


def fields(info: DataInfo) -> tuple[str, ...]:
    return ("label", "image") if info.task == "label2image" else ("input", "image")


def prepare(batch: dict, device: torch.device, cfg: Config, info: DataInfo) -> dict:
    """``input`` [N, C_in, H, W] (one-hot labels built on the device), ``image`` [N, 3, H, W] in
    [-1, 1], ``label`` [N, H, W] int64 (label2image) or None. The loader's uint8 images and integer
    label maps are moved as they are and converted on the device (``data.device``)."""
    image = float_image(batch["image"].to(device, non_blocking=True))
    label = None
    if info.task == "label2image":
        label = class_ids(batch["label"].to(device, non_blocking=True))
        inp = one_hot(label, info.num_classes)
    else:
        inp = float_image(batch["input"].to(device, non_blocking=True))
    if cfg.train.channels_last:
        inp, image = inp.contiguous(memory_format=torch.channels_last), image.contiguous(
            memory_format=torch.channels_last)
    return {"input": inp, "image": image, "label": label}


def _noisy(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x + sigma * torch.randn_like(x) if sigma > 0 else x


def d_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    kind = ctx.cfg.loss.gan
    with ctx.autocast():
        if ctx.reuse_fake:
            fake = ctx.G(b["input"])
            scratch["fake"] = fake
        else:
            with torch.no_grad():
                fake = ctx.G(b["input"])
        sigma = ctx.instance_noise()
        # Separate real and fake calls: with batch norm in D, one batched call would mix their
        # statistics, which the official code does not do.
        pred_real = ctx.D(torch.cat([b["input"], _noisy(b["image"], sigma)], 1))
        pred_fake = ctx.D(torch.cat([b["input"], _noisy(fake.detach(), sigma)], 1))
    l_real, l_fake = d_loss(kind, pred_real, pred_fake)
    return {"loss": 0.5 * (l_real + l_fake), "D_real": l_real, "D_fake": l_fake}


def g_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    cfg = ctx.cfg
    with ctx.autocast():
        fake = scratch.pop("fake", None)
        if fake is None:
            fake = ctx.G(b["input"])
        pred_fake = ctx.D_plain(torch.cat([b["input"], _noisy(fake, ctx.instance_noise())], 1))
    g_gan = g_loss(cfg.loss.gan, pred_fake)
    l1 = F.l1_loss(fake.float(), b["image"].float()) * cfg.loss.l1_weight
    return {"loss": g_gan + l1, "G_GAN": g_gan, "G_L1": l1}


@torch.no_grad()
def visualize(G, b: dict, info: DataInfo) -> list[torch.Tensor]:
    """Columns of the image grid: input | output | target, each [N, 3, H, W] in [-1, 1]."""
    out = G(b["input"]).float()
    if info.task == "label2image":
        from ..data.verify import palette

        pal = torch.from_numpy(palette(max(256, info.num_classes))).to(out.device).float() / 127.5 - 1
        shown = pal[b["input"].argmax(1)].permute(0, 3, 1, 2)
    else:
        shown = b["input"].float()
    return [shown, out, b["image"].float()]


FAMILY = Family(
    name="pix2pix",
    build=build,
    phases=(Phase("D", "D", d_step), Phase("G", "G", g_step, fetch=False)),
    prepare=prepare,
    visualize=visualize,
    fields=fields,
)
