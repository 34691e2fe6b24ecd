"""pix2pix (Isola et al. 2017): U-Net G, PatchGAN D on (input, image) pairs, GAN loss + λ·L1.

Defaults are the official ``pix2pix_model.py``/``base_options.py`` ones; loss names follow the
official code (``G_GAN``, ``G_L1``, ``D_real``, ``D_fake``). D's loss is halved as there, so D
learns at half G's rate. Order as officially: D's step, then G's on the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import Config, ConfigError, ModelConfig, bounded, choice
from ..data.device import class_ids, float_image
from ..losses.adversarial import d_loss, g_loss
from ..losses.regularizers import instance_noise
from ..models.layers import init_weights
from ..models.pix2pix import NLayerDiscriminator, UnetGenerator
from ..train.family import DataInfo, Evaluation, Family, Network, Optimizer, Phase, StepContext, Stream
from .labelmaps import colourised, one_hot


@dataclass
class Pix2PixConfig(ModelConfig):
    family: str = "pix2pix"
    generator: str = choice("unet_256", "unet_256", "unet_128")  # netG
    ngf: int = bounded(64, 1)
    ndf: int = bounded(64, 1)
    n_layers_D: int = bounded(3, 1, 8)  # netD basic: the 70x70 PatchGAN
    norm: str = choice("batch", "batch", "instance", "none")
    norm_D: str = choice("batch", "batch", "instance", "layer", "none")
    dropout: bool = True  # not no_dropout
    attention: tuple[int, ...] = ()  # SAGAN self-attention in G's decoder at 1/f of the image size, per f
    init_gain: float = bounded(0.02, 0.0)
    gan: str = choice("vanilla", "vanilla", "lsgan", "hinge", "wgan")  # gan_mode
    l1_weight: float = bounded(100.0, 0.0)  # lambda_L1
    instance_noise: float = bounded(0.0, 0.0)  # sigma at kimg 0 (not in the paper; 0 is off)
    instance_noise_kimg: float = bounded(0.0, 0.0)  # linear decay to 0 over this long
    lr_G: float = bounded(2e-4, 0.0)
    lr_D: float = bounded(2e-4, 0.0)
    beta1: float = bounded(0.5, 0.0, 1.0)
    beta2: float = bounded(0.999, 0.0, 1.0)

    def check(self) -> None:
        allowed = [2**i for i in range(1, NUM_DOWNS[self.generator])]
        if any(f not in allowed for f in self.attention):
            raise ConfigError(f"model.attention: {list(self.attention)} are not decoder scales of {self.generator}; "
                              f"choose factors from {allowed} (features at 1/f of the image size)")


NUM_DOWNS = {"unet_256": 8, "unet_128": 7}


def input_channels(info: DataInfo) -> int:
    if info.task == "label2image":
        return int(info.num_classes)
    if info.task == "paired":
        return 3
    raise ValueError(f"pix2pix trains on label2image or paired shards, not {info.task!r}")


def build(cfg: Config, info: DataInfo) -> dict:
    m = cfg.model
    in_nc = input_channels(info)
    num_downs = NUM_DOWNS[m.generator]
    G = UnetGenerator(input_nc=in_nc, output_nc=3, num_downs=num_downs, ngf=m.ngf, norm=m.norm,
                      use_dropout=m.dropout, attention=m.attention)
    D = NLayerDiscriminator(input_nc=in_nc + 3, ndf=m.ndf, n_layers=m.n_layers_D, norm=m.norm_D)
    return {"G": init_weights(G, "normal", m.init_gain), "D": init_weights(D, "normal", m.init_gain)}


def streams(cfg: Config, info: DataInfo, split: str) -> tuple[Stream, ...]:
    fields = ("label", "image") if info.task == "label2image" else ("input", "image")
    return (Stream("data", split, fields),)


def prepare(batches: dict[str, dict], device: torch.device, cfg: Config, info: DataInfo) -> dict:
    """``input`` [N, C_in, H, W] (one-hot labels built on the device), ``image`` [N, 3, H, W] in
    [-1, 1], ``label`` [N, H, W] int64 (label2image) or None."""
    batch = batches["data"]
    image = float_image(batch["image"].to(device, non_blocking=True))
    label = None
    if info.task == "label2image":
        label = class_ids(batch["label"].to(device, non_blocking=True))
        inp = one_hot(label, info.num_classes)
    else:
        inp = float_image(batch["input"].to(device, non_blocking=True))
    if cfg.train.channels_last:
        inp, image = (t.contiguous(memory_format=torch.channels_last) for t in (inp, image))
    return {"input": inp, "image": image, "label": label}


def _noisy(ctx: StepContext, x: torch.Tensor) -> torch.Tensor:
    m = ctx.cfg.model
    return instance_noise(x, m.instance_noise, m.instance_noise_kimg, ctx.nimg)


def d_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    G, D = ctx.nets["G"], ctx.nets["D"]
    with ctx.autocast():
        if ctx.reuse_fake:
            fake = G(b["input"])
            scratch["fake"] = fake
        else:
            with torch.no_grad():
                fake = G(b["input"])
        # Separate real and fake calls: with batch norm in D, one batched call would mix their
        # statistics, which the official code does not do.
        pred_real = D(torch.cat([b["input"], _noisy(ctx, b["image"])], 1))
        pred_fake = D(torch.cat([b["input"], _noisy(ctx, fake.detach())], 1))
    l_real, l_fake = d_loss(ctx.cfg.model.gan, pred_real, pred_fake)
    return {"loss": 0.5 * (l_real + l_fake), "D_real": l_real, "D_fake": l_fake}


def g_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    m = ctx.cfg.model
    with ctx.autocast():
        fake = scratch.pop("fake", None)
        if fake is None:
            fake = ctx.nets["G"](b["input"])
        pred_fake = ctx.plain["D"](torch.cat([b["input"], _noisy(ctx, fake)], 1))  # D is frozen
    g_gan = g_loss(m.gan, pred_fake)
    l1 = F.l1_loss(fake.float(), b["image"].float()) * m.l1_weight
    return {"loss": g_gan + l1, "G_GAN": g_gan, "G_L1": l1}


def evaluations(cfg: Config, info: DataInfo, split: str) -> tuple[Evaluation, ...]:
    return (Evaluation("", reference=split, generate=lambda nets, b: nets["G"](b["input"]),
                       inputs=streams(cfg, info, split)[0], paired=True),)


@torch.no_grad()
def visualize(nets: dict, b: dict, info: DataInfo) -> list[torch.Tensor]:
    """Columns of the image grid: input | output | target, each [N, 3, H, W] in [-1, 1]."""
    out = nets["G"](b["input"]).float()
    shown = colourised(b["label"], info) if b["label"] is not None else b["input"].float()
    return [shown, out, b["image"].float()]


def optimizers(cfg: Config) -> tuple[Optimizer, ...]:
    m = cfg.model
    return (Optimizer("G", ("G",), m.lr_G, (m.beta1, m.beta2)), Optimizer("D", ("D",), m.lr_D, (m.beta1, m.beta2)))


FAMILY = Family(
    name="pix2pix",
    config=Pix2PixConfig,
    build=build,
    networks=(Network("G", ema=True, snapshot=True), Network("D")),
    optimizers=optimizers,
    phases=lambda cfg: (Phase("D", ("D",), d_step, trainable=("G",)), Phase("G", ("G",), g_step, fetch=False)),
    streams=streams,
    prepare=prepare,
    evaluations=evaluations,
    visualize=visualize,
)
