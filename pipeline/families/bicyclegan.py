"""BicycleGAN (Zhu et al. 2017): one-to-many translation from the cVAE-GAN and cLR-GAN cycles,
after the official junyanz/BicycleGAN ``models/bicycle_gan_model.py``.

Each device's batch is split in halves, as officially: the first half encodes its target B into
z (cVAE-GAN: ``G(A, z)`` reconstructs B, judged by D, z pulled to N(0, I) by the KL term), and
the same inputs A with a random z make the cLR-GAN sample, judged by D2 against the second
half's B, from which E must recover z (``z_L1``: G's loss alone, E gets no gradient from it).
One iteration: ``EG`` steps G and E, then ``D`` steps D and D2 on the detached samples. Loss
names are the official ``loss_names``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..config import Config, ConfigError, ModelConfig, bounded, choice
from ..eval.paired import lpips
from ..losses.adversarial import d_loss, g_loss
from ..losses.regularizers import kl_divergence
from ..models.bicyclegan import MultiscalePatchDiscriminator, ResNetEncoder, UnetAddInputGenerator
from ..models.layers import init_weights
from ..train.family import DataInfo, Evaluation, Family, Network, Optimizer, Phase, StepContext
from . import pix2pix
from .labelmaps import colourised

# Official names, plus the 64-pixel variants for small demos.
NUM_DOWNS = {"unet_256": 8, "unet_128": 7, "unet_64": 6}
ENCODER_BLOCKS = {"resnet_256": 5, "resnet_128": 4, "resnet_64": 3}
D_LAYERS = {"basic_256_multi": 3, "basic_128_multi": 2}


@dataclass
class BicycleGANConfig(ModelConfig):
    """The official train options (``base_options.py``, ``train_options.py``), with z added at
    G's input (``where_add=input``; the official default ``all`` adds it at every layer)."""

    family: str = "bicyclegan"
    nz: int = bounded(8, 1)
    generator: str = choice("unet_256", *NUM_DOWNS)  # netG
    encoder: str = choice("resnet_256", *ENCODER_BLOCKS)  # netE
    netD: str = choice("basic_256_multi", *D_LAYERS)  # D and D2
    num_Ds: int = bounded(2, 1, 4)
    ngf: int = bounded(64, 1)
    ndf: int = bounded(64, 1)
    nef: int = bounded(64, 1)
    norm: str = choice("instance", "instance", "batch", "none")
    dropout: bool = False  # use_dropout (the edges2shoes script turns it on)
    init_gain: float = bounded(0.02, 0.0)  # xavier, as init_type
    gan: str = choice("lsgan", "lsgan", "vanilla")  # gan_mode
    lambda_L1: float = bounded(10.0, 0.0)
    lambda_GAN: float = bounded(1.0, 0.0)
    lambda_GAN2: float = bounded(1.0, 0.0)
    lambda_z: float = bounded(0.5, 0.0)
    lambda_kl: float = bounded(0.01, 0.0)
    use_same_D: bool = False
    diversity_samples: int = bounded(3, 1)  # outputs per input in image grids
    lr: float = bounded(2e-4, 0.0)
    beta1: float = bounded(0.5, 0.0, 1.0)
    beta2: float = bounded(0.999, 0.0, 1.0)

    def check(self) -> None:
        size_g, size_e = 2 ** NUM_DOWNS[self.generator], 2 ** (ENCODER_BLOCKS[self.encoder] + 3)
        if size_g != size_e:
            raise ConfigError(f"model.generator={self.generator} takes {size_g}px images but model.encoder="
                              f"{self.encoder} takes {size_e}px: choose the two for one size")


def _size(cfg: Config) -> int:
    return 2 ** NUM_DOWNS[cfg.model.generator]


def build(cfg: Config, info: DataInfo) -> dict:
    m = cfg.model
    in_nc = pix2pix.input_channels(info)
    G = UnetAddInputGenerator(input_nc=in_nc, nz=m.nz, num_downs=NUM_DOWNS[m.generator], ngf=m.ngf, norm=m.norm,
                              use_dropout=m.dropout)
    E = ResNetEncoder(nz=m.nz, nef=m.nef, n_blocks=ENCODER_BLOCKS[m.encoder], norm=m.norm)
    nets = {"G": G, "E": E}
    for name in ("D",) if m.use_same_D else ("D", "D2"):
        nets[name] = MultiscalePatchDiscriminator(ndf=m.ndf, n_layers=D_LAYERS[m.netD], num_D=m.num_Ds, norm=m.norm)
    return {k: init_weights(v, "xavier", m.init_gain) for k, v in nets.items()}


def prepare(batches: dict[str, dict], device: torch.device, cfg: Config, info: DataInfo) -> dict:
    """pix2pix's batch (``input``, ``image``, ``label``), the images ``size``×``size``."""
    b = pix2pix.prepare(batches, device, cfg, info)
    size = _size(cfg)
    if b["image"].shape[-2:] != (size, size):
        raise ValueError(f"bicyclegan's {cfg.model.generator} and {cfg.model.encoder} take {size}x{size} images, got "
                         f"{tuple(b['image'].shape[-2:])}: set data.crop_size={size},{size}")
    return b


def _halves(b: dict) -> int:
    n = b["image"].shape[0]
    if n % 2:
        raise ValueError(f"bicyclegan splits each device's batch in halves (encoded, random), got {n} samples: make "
                         f"train.batch_size an even multiple of the number of processes")
    return n // 2


def eg_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    """G and E: cVAE-GAN (L1, GAN via D, KL) and cLR-GAN (GAN via D2), then z_L1 for G alone."""
    m = ctx.cfg.model
    h = _halves(b)
    a, real_b = b["input"][:h], b["image"][:h]
    with ctx.autocast():
        mu, logvar = ctx.nets["E"](real_b)
    mu, logvar = mu.float(), logvar.float()
    z_encoded = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    z_random = torch.randn_like(mu)
    with ctx.autocast():
        # One G call for both samples of each input (instance norm: each image on its own).
        fake_encoded, fake_random = ctx.nets["G"](torch.cat([a, a]), torch.cat([z_encoded, z_random])).chunk(2)
        D2 = ctx.plain["D" if m.use_same_D else "D2"]
        g_gan = g_loss(m.gan, ctx.plain["D"](fake_encoded)) * m.lambda_GAN  # D and D2 are frozen
        g_gan2 = g_loss(m.gan, D2(fake_random)) * m.lambda_GAN2
    kl = kl_divergence(mu, logvar) * m.lambda_kl
    l1 = F.l1_loss(fake_encoded.float(), real_b) * m.lambda_L1
    losses = {"G_GAN": g_gan, "G_GAN2": g_gan2, "kl": kl, "G_L1": l1}
    if m.lambda_z > 0:
        # E with its weights detached: the gradient of |E(G(A, z)) - z| reaches G through E's
        # input only, as the official set_requires_grad([netE], False) around backward_G_alone.
        E = ctx.plain["E"]
        frozen = {k: v.detach() for k, v in E.state_dict(keep_vars=True).items()}
        with ctx.autocast():
            mu2, _ = functional_call(E, frozen, (fake_random,))
        losses["z_L1"] = F.l1_loss(mu2.float(), z_random) * m.lambda_z
    scratch.update(fake_encoded=fake_encoded.detach(), fake_random=fake_random.detach())
    return {"loss": sum(losses.values()), **losses}


def d_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    """D on (B of the first half, cVAE-GAN sample), D2 (or D again) on (B of the second half,
    cLR-GAN sample); each D's loss is D_fake + D_real, as officially."""
    m = ctx.cfg.model
    h = _halves(b)
    D2 = ctx.nets["D" if m.use_same_D else "D2"]
    with ctx.autocast():
        d1 = d_loss(m.gan, ctx.nets["D"](b["image"][:h]), ctx.nets["D"](scratch["fake_encoded"]))
        d2 = d_loss(m.gan, D2(b["image"][h:]), D2(scratch["fake_random"]))
    loss_d, loss_d2 = d1[0] + d1[1], d2[0] + d2[1]
    return {"loss": loss_d + loss_d2, "D": loss_d, "D2": loss_d2}


def _z(n: int, nz: int, device: torch.device) -> torch.Tensor:
    return torch.randn(n, nz, device=device)


def diversity(nets: dict, b: dict, out: torch.Tensor, lpips_net) -> dict[str, torch.Tensor]:
    """The paper's diversity: LPIPS between the output and another one of the same input under
    another random z, per input (needs the evaluator's LPIPS weights)."""
    if lpips_net is None:
        return {}
    other = nets["G"](b["input"], _z(len(out), nets["G"].nz, out.device)).float().clamp(-1, 1)
    return {"diversity_lpips": lpips(lpips_net, out, other)}


def evaluations(cfg: Config, info: DataInfo, split: str) -> tuple[Evaluation, ...]:
    """The main evaluation translates the split's inputs with random z (the official test mode):
    FID/KID against the split's images and the LPIPS diversity; ``encoded`` reconstructs each
    target from its own code, G(A, μ(E(B))): PSNR/SSIM against it (``psnr_encoded``)."""
    stream = pix2pix.streams(cfg, info, split)[0]
    nz = cfg.model.nz
    return (Evaluation("", reference=split, inputs=stream, per_image=diversity,
                       generate=lambda nets, b: nets["G"](b["input"], _z(len(b["input"]), nz, b["input"].device))),
            Evaluation("encoded", reference=split, inputs=stream, paired=True,
                       generate=lambda nets, b: nets["G"](b["input"], nets["E"](b["image"])[0])))


@torch.no_grad()
def visualize(nets: dict, b: dict, info: DataInfo) -> list[torch.Tensor]:
    """Columns: input | G(A, μ(E(B))) | G(A, z) for fixed random z, one column each | target."""
    G, a = nets["G"], b["input"]
    shown = colourised(b["label"], info) if b["label"] is not None else a.float()
    columns = [shown, G(a, nets["E"](b["image"])[0]).float()]
    for k in range(3):
        z = torch.randn(len(a), G.nz, generator=torch.Generator().manual_seed(k)).to(a.device)
        columns.append(G(a, z).float())
    return [*columns, b["image"].float()]


def optimizers(cfg: Config) -> tuple[Optimizer, ...]:
    m = cfg.model
    betas = (m.beta1, m.beta2)
    names = ("G", "E", "D") if m.use_same_D else ("G", "E", "D", "D2")
    return tuple(Optimizer(n, (n,), m.lr, betas) for n in names)


def phases(cfg: Config) -> tuple[Phase, ...]:
    ds = ("D",) if cfg.model.use_same_D else ("D", "D2")
    return (Phase("EG", ("G", "E"), eg_step), Phase("D", ds, d_step, fetch=False))


FAMILY = Family(
    name="bicyclegan",
    config=BicycleGANConfig,
    build=build,
    networks=(Network("G", ema=True, snapshot=True), Network("E", snapshot=True), Network("D"), Network("D2")),
    optimizers=optimizers,
    phases=phases,
    streams=pix2pix.streams,
    prepare=prepare,
    evaluations=evaluations,
    visualize=visualize,
)
