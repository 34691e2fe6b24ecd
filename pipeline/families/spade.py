"""SPADE / GauGAN (Park et al. 2019): SPADE generator on one-hot labels (+ instance edges), SPADE's
multiscale spectral-norm discriminators, hinge loss, feature matching and VGG losses, and the
optional VAE style encoder. Defaults are the official NVlabs/SPADE options; loss names are the
official ones: GAN, GAN_Feat, VGG, KLD, D_real, D_Fake.

One iteration, as pix2pixHD's here: G's phase (D frozen) makes the fake and computes D on the
real image once, with D trainable, so that its graph serves D's phase (D_real) and its features
are the detached feature-matching targets; D's phase scores, as the official code, a fake made
again by the updated G (without a graph), or with ``reuse_fake`` G's detached fake from its
phase (one G forward less). D runs three times on N samples per iteration instead of four. Spectral norm makes
one power iteration per D call: three per iteration here, two in the official code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import Config, ConfigError, ModelConfig, bounded, choice
from ..data.device import float_image
from ..losses.adversarial import d_loss, g_loss
from ..losses.feature_matching import feature_matching_loss
from ..losses.perceptual import require_vgg_weights, vgg_loss
from ..losses.regularizers import kl_divergence
from ..models.spade import ConvEncoder, SPADEGenerator, parse_plain_norm, parse_spade_norm, spade_discriminator
from ..train.family import DataInfo, Evaluation, Family, Network, Optimizer, Phase, StepContext, Stream
from .labelmaps import colourised, semantic_input
from .pix2pixhd import trainable


@dataclass
class SPADEConfig(ModelConfig):
    family: str = "spade"
    ngf: int = bounded(64, 1)
    ndf: int = bounded(64, 1)
    num_upsampling_layers: str = choice("normal", "normal", "more", "most")
    norm_G: str = "spectralspadesyncbatch3x3"  # [spectral]spade(syncbatch|batch|instance)<k>x<k>
    norm_D: str = "spectralinstance"  # [spectral](instance|batch|syncbatch|none)
    norm_E: str = "spectralinstance"
    spade_hidden: int = bounded(128, 1)  # nhidden of every SPADE layer (hard-coded 128 officially)
    n_layers_D: int = bounded(4, 2, 8)  # the official count: first conv, n_layers_D - 1 normalised convs
    num_D: int = bounded(2, 1, 5)
    use_instance: bool = True  # instance-boundary map as an extra channel (not no_instance)
    use_vae: bool = False  # the style encoder E, trained with G (its KL term) and z ~ N(0, I) to generate
    z_dim: int = bounded(256, 1)
    gan: str = choice("hinge", "hinge", "lsgan", "vanilla", "wgan")  # gan_mode hinge | ls | original | w
    feat_weight: float = bounded(10.0, 0.0)  # lambda_feat; 0 is no_ganFeat_loss
    vgg_weight: float = bounded(10.0, 0.0)  # lambda_vgg; 0 is no_vgg_loss
    vgg_weights: str | None = None  # local torchvision vgg19 state_dict file (never downloaded)
    kld_weight: float = bounded(0.05, 0.0)  # lambda_kld, with use_vae
    lr_G: float = bounded(1e-4, 0.0)  # TTUR: the official lr 2e-4 halved for G,
    lr_D: float = bounded(4e-4, 0.0)  # and doubled for D
    beta1: float = bounded(0.0, 0.0, 1.0)
    beta2: float = bounded(0.9, 0.0, 1.0)
    # true: D's update scores the fake of this iteration's G before its update instead of a fake
    # made again by the updated G (the official order): one G forward less per iteration (~22%
    # of it), but a worse FID on the demo in the runs of docs/spade.md, so not the default.
    reuse_fake: bool = False

    def check_files(self) -> None:
        require_vgg_weights(self.vgg_weight, self.vgg_weights)

    def check(self) -> None:
        for key, parse in (("norm_G", parse_spade_norm), ("norm_D", parse_plain_norm), ("norm_E", parse_plain_norm)):
            try:
                parse(getattr(self, key))
            except ValueError as e:
                raise ConfigError(f"model.{key}: {e}") from None


class SPADEModel(nn.Module):
    """G (``net``) with the optional VAE style encoder E (``encoder``), optimised together as in
    the official ``Pix2PixModel``. ``forward(seg, image, z)`` → ``(fake, mu, logvar)``: with an
    encoder and an image, the style is encoded and sampled (reparameterisation); otherwise ``z``
    or z ~ N(0, I) is used, and ``mu``, ``logvar`` are None."""

    def __init__(self, net: SPADEGenerator, encoder: ConvEncoder | None = None):
        super().__init__()
        self.net = net
        self.encoder = encoder

    def forward(self, seg: torch.Tensor, image: torch.Tensor | None = None, z: torch.Tensor | None = None):
        mu = logvar = None
        if self.encoder is not None and image is not None:
            mu, logvar = self.encoder(image)
            z = mu + torch.randn_like(logvar) * torch.exp(0.5 * logvar)
        return self.net(seg, z), mu, logvar


def build(cfg: Config, info: DataInfo) -> dict:
    if info.task != "label2image":
        raise ValueError(f"spade trains on label2image shards (label maps), not {info.task!r}")
    m = cfg.model
    semantic_nc = int(info.num_classes) + int(m.use_instance)
    g_norm, d_norm, e_norm = parse_spade_norm(m.norm_G), parse_plain_norm(m.norm_D), parse_plain_norm(m.norm_E)
    g_norm.pop("sync")  # the loop synchronises G's batch norms across GPUs (Network.sync_batchnorm)
    crop_w, aspect = 256, 1.0
    if m.use_vae:
        size = cfg.data.crop_size or cfg.data.load_size
        if size is None:
            raise ConfigError("model.use_vae needs data.crop_size (or data.load_size): the VAE's latent grid "
                              "is fixed by the training size, e.g. data.crop_size=256,256")
        crop_w, aspect = size[0], size[0] / size[1]
    G = SPADEGenerator(semantic_nc, ngf=m.ngf, num_upsampling_layers=m.num_upsampling_layers, use_vae=m.use_vae,
                       z_dim=m.z_dim, crop_size=crop_w, aspect_ratio=aspect, hidden=m.spade_hidden, **g_norm)
    E = ConvEncoder(ndf=m.ngf, z_dim=m.z_dim, **e_norm) if m.use_vae else None  # the official E's width is ngf
    D = spade_discriminator(semantic_nc + 3, ndf=m.ndf, n_layers_D=m.n_layers_D, num_D=m.num_D, **d_norm)
    return {"G": SPADEModel(G, E), "D": D}


def streams(cfg: Config, info: DataInfo, split: str) -> tuple[Stream, ...]:
    return (Stream("data", split, tuple(f for f in ("label", "instance", "image") if f in info.fields)),)


def prepare(batches: dict[str, dict], device: torch.device, cfg: Config, info: DataInfo) -> dict:
    """``input`` [N, label_nc (+1 edges), H, W] one-hot built once per batch on the device,
    ``image`` [N, 3, H, W] in [-1, 1], ``label`` [N, H, W] int64."""
    batch = batches["data"]
    inp, label, _ = semantic_input(batch, device, info.num_classes, edges=cfg.model.use_instance)
    image = float_image(batch["image"].to(device, non_blocking=True))
    if cfg.train.channels_last:
        inp, image = (t.contiguous(memory_format=torch.channels_last) for t in (inp, image))
    return {"input": inp, "image": image, "label": label}


def g_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    m, D = ctx.cfg.model, ctx.plain["D"]
    with ctx.autocast():
        fake, mu, logvar = ctx.nets["G"](b["input"], b["image"] if m.use_vae else None)
        scratch["fake"] = fake.detach()
        with trainable(D):  # kept for D's phase; here only its detached features are used
            pred_real = D(torch.cat([b["input"], b["image"]], 1))
        scratch["pred_real"] = pred_real
        pred_fake = D(torch.cat([b["input"], fake], 1))
    losses = {"GAN": g_loss(m.gan, pred_fake, scale_reduction="mean")}
    if m.feat_weight > 0:
        losses["GAN_Feat"] = feature_matching_loss(pred_real, pred_fake, m.num_D, m.n_layers_D - 1,
                                                   weight=m.feat_weight, layer_weight=1.0)
    if m.vgg_weight > 0:
        losses["VGG"] = vgg_loss(m.vgg_weights, fake.device)(fake, b["image"]) * m.vgg_weight
    if mu is not None:
        losses["KLD"] = kl_divergence(mu, logvar) * m.kld_weight
    losses["loss"] = sum(losses.values())
    return losses


def d_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    fake, pred_real = scratch.pop("fake"), scratch.pop("pred_real")
    m = ctx.cfg.model
    with ctx.autocast():
        if not m.reuse_fake:  # the official order: a new fake from the updated G, without a graph
            with torch.no_grad():
                fake = ctx.plain["G"](b["input"], b["image"] if m.use_vae else None)[0]
        pred_fake = ctx.nets["D"](torch.cat([b["input"], fake], 1))
    l_real, l_fake = d_loss(m.gan, pred_real, pred_fake, scale_reduction="mean")
    return {"loss": l_real + l_fake, "D_real": l_real, "D_Fake": l_fake}


def optimizers(cfg: Config) -> tuple[Optimizer, ...]:
    m = cfg.model
    betas = (m.beta1, m.beta2)
    return (Optimizer("G", ("G",), m.lr_G, betas), Optimizer("D", ("D",), m.lr_D, betas))


def generate(nets: dict, b: dict) -> torch.Tensor:
    """The official test mode: without an image the VAE's style is z ~ N(0, I)."""
    return nets["G"](b["input"])[0]


def evaluations(cfg: Config, info: DataInfo, split: str) -> tuple[Evaluation, ...]:
    return (Evaluation("", reference=split, generate=generate, inputs=streams(cfg, info, split)[0], paired=True),)


@torch.no_grad()
def visualize(nets: dict, b: dict, info: DataInfo) -> list[torch.Tensor]:
    """Columns: label map (colourised) | output (three fixed styles with the VAE) | target."""
    G = nets["G"]
    outputs = [generate(nets, b).float()]
    if G.encoder is not None:
        gen = torch.Generator().manual_seed(0)
        zs = [torch.randn(b["input"].shape[0], G.net.z_dim, generator=gen) for _ in range(3)]
        outputs = [G(b["input"], z=z.to(b["input"].device))[0].float() for z in zs]
    return [colourised(b["label"], info), *outputs, b["image"].float()]


def _phases(cfg: Config) -> tuple[Phase, ...]:
    return (Phase("G", ("G",), g_step), Phase("D", ("D",), d_step, fetch=False))


FAMILY = Family(
    name="spade",
    config=SPADEConfig,
    build=build,
    networks=(Network("G", ema=True, snapshot=True, sync_batchnorm=True), Network("D")),
    optimizers=optimizers,
    phases=_phases,
    streams=streams,
    prepare=prepare,
    evaluations=evaluations,
    visualize=visualize,
)
