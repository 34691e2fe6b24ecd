"""Unconditional DCGAN-family training (Radford et al. 2016): non-saturating, LSGAN, hinge,
WGAN with gradient penalty (Gulrajani et al. 2017) or weight clipping (Arjovsky et al. 2017), or
the relativistic pairing loss with R1 + R2 (``gan=rpgan``, Huang et al. 2024),
class-conditional generation (``conditional=projection`` or ``acgan``),
``model.n_critic`` D steps per G step, optional spectral norm, SAGAN's self-attention (Zhang et
al. 2019) and decaying instance noise. Defaults are DCGAN's: Adam(2e-4, 0.5, 0.999),
non-saturating loss, batch norm in G and D; ``configs/sagan_*.yaml`` hold SAGAN's."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..config import Config, ConfigError, ModelConfig, bounded, choice
from ..data.device import float_image
from ..losses.adversarial import d_loss, g_loss, rpgan_d_loss, rpgan_g_loss
from ..losses.regularizers import cosine_decay, gradient_penalty, instance_noise, weight_clip_, zero_centred_penalty
from ..models.dcgan import DCGANDiscriminator, DCGANGenerator, check_attention
from ..models.layers import init_weights
from ..train.family import DataInfo, Evaluation, Family, Network, Optimizer, Phase, StepContext, Stream


@dataclass
class DCGANConfig(ModelConfig):
    family: str = "dcgan"
    z_dim: int = bounded(100, 1)
    ngf: int = bounded(64, 1)
    ndf: int = bounded(64, 1)
    image_size: int = choice(64, 32, 64, 128)
    norm_D: str = choice("batch", "batch", "instance", "layer", "none")  # layer: WGAN-GP's critic
    spectral_norm: bool = False  # Miyato et al. 2018, on every D layer
    spectral_norm_G: bool = False  # and on every G layer (SAGAN)
    attention: tuple[int, ...] = ()  # feature-map sizes with a self-attention block in G and D (SAGAN: 32 at 64)
    init_gain: float = bounded(0.02, 0.0)
    gan: str = choice("vanilla", "vanilla", "lsgan", "hinge", "wgan", "rpgan")
    gp_weight: float = bounded(0.0, 0.0)  # WGAN-GP: 10
    # rpgan (R3GAN): D's loss + gamma/2 (R1 + R2); gamma follows a cosine to gamma_final over
    # gamma_decay_kimg (None: the whole run), then stays (the official presets: 20,000 kimg).
    gamma: float = bounded(0.0, 0.0)
    gamma_final: float | None = None
    gamma_decay_kimg: float | None = None
    weight_clip: float = bounded(0.0, 0.0)  # original WGAN: 0.01; 0 disables
    n_critic: int = bounded(1, 1)  # D steps per G step (WGAN: 5)
    instance_noise: float = bounded(0.0, 0.0)  # sigma at kimg 0, decays linearly to 0
    instance_noise_kimg: float = bounded(0.0, 0.0)
    lr_G: float = bounded(2e-4, 0.0)
    lr_D: float = bounded(2e-4, 0.0)
    beta1: float = bounded(0.5, 0.0, 1.0)
    beta2: float = bounded(0.999, 0.0, 1.0)
    # Class-conditional generation, on shards with a class field (`gan-shard write folder --classes`):
    # D by projection (Miyato & Koyama 2018) or an auxiliary classifier (ACGAN, Odena et al. 2017),
    # G by conditional batch norm (the projection paper's, SAGAN's) or y one-hot beside z (cGAN).
    conditional: str = choice("none", "none", "projection", "acgan")
    g_conditioning: str = choice("cbn", "cbn", "concat")
    acgan_weight: float = bounded(1.0, 0.0)  # the class loss's weight in D's and G's objectives

    def check(self) -> None:
        if self.gp_weight and self.weight_clip:
            raise ConfigError("model.gp_weight and model.weight_clip are alternatives; set one of them to 0")
        if self.gan == "rpgan" and (self.gp_weight or self.weight_clip):
            raise ConfigError("model.gan=rpgan regularises D with R1 + R2 (model.gamma); set model.gp_weight=0 and "
                              "model.weight_clip=0")
        if (self.gamma or self.gamma_final is not None) and self.gan != "rpgan":
            raise ConfigError(f"model.gamma (R1 + R2) belongs to model.gan=rpgan, not {self.gan}; set model.gan=rpgan "
                              f"or model.gamma=0")
        try:
            check_attention(self.attention, self.image_size)
        except ValueError as exc:
            raise ConfigError(f"model.attention: {exc}") from None

    def deepspeed_limits(self) -> None:
        if self.weight_clip > 0:
            raise ConfigError("model.weight_clip needs distributed.backend=ddp: ZeRO keeps the fp32 master weights "
                              "inside its optimizer, where clipping the module's copy does not reach")


def num_classes(cfg: Config, info: DataInfo) -> int:
    """The class count of a class-conditional run (the manifest's), 0 for an unconditional one."""
    if cfg.model.conditional == "none":
        return 0
    if "class" not in info.fields or not info.num_classes:
        raise ValueError(f"model.conditional={cfg.model.conditional} needs shards with a class field; "
                         f"{cfg.data.url} has {', '.join(info.fields)}: write them with "
                         f"`gan-shard write folder --classes --root DIR --out URL` (one sub-folder per class)")
    return info.num_classes


def build(cfg: Config, info: DataInfo) -> dict:
    m, k = cfg.model, num_classes(cfg, info)
    G = DCGANGenerator(z_dim=m.z_dim, ngf=m.ngf, out_channels=3, image_size=m.image_size, attention=m.attention,
                       spectral_norm=m.spectral_norm_G, num_classes=k, conditioning=m.g_conditioning)
    D = DCGANDiscriminator(in_channels=3, ndf=m.ndf, image_size=m.image_size, norm=m.norm_D,
                           spectral_norm=m.spectral_norm, attention=m.attention, num_classes=k,
                           conditioning=m.conditional)
    return {"G": init_weights(G, "normal", m.init_gain), "D": init_weights(D, "normal", m.init_gain)}


def streams(cfg: Config, info: DataInfo, split: str) -> tuple[Stream, ...]:
    return (Stream("data", split, ("image", "class") if cfg.model.conditional != "none" else ("image",)),)


def prepare(batches: dict[str, dict], device: torch.device, cfg: Config, info: DataInfo) -> dict:
    """``image`` [N, 3, S, S] in [-1, 1] and ``z`` [N, z_dim] drawn from the rank's RNG;
    class-conditional: also the images' classes ``y`` [N] and the fakes' ``y_fake`` [N], drawn
    uniformly (as the projection paper's code draws them)."""
    image = float_image(batches["data"]["image"].to(device, non_blocking=True))
    size = cfg.model.image_size
    if image.shape[-1] != size or image.shape[-2] != size:
        raise ValueError(f"dcgan expects {size}x{size} images, got {tuple(image.shape[-2:])}: set "
                         f"data.load_size / data.crop_size")
    out = {"image": image, "z": torch.randn(image.shape[0], cfg.model.z_dim, device=device)}
    if cfg.model.conditional != "none":
        out["y"] = batches["data"]["class"].to(device).long()
        out["y_fake"] = torch.randint(num_classes(cfg, info), (image.shape[0],), device=device)
    return out


def _critic(ctx: StepContext, D, x: torch.Tensor, y: torch.Tensor | None):
    """D's logits of ``x`` [N], and its class logits [N, K] with ACGAN (else None)."""
    cond = ctx.cfg.model.conditional
    if cond == "acgan":
        return D(x)
    return D(x, y) if cond == "projection" else D(x), None


def _class_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), y)


def _generate(ctx: StepContext, G, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return G(z, y) if ctx.cfg.model.conditional != "none" else G(z)


def _noisy(ctx: StepContext, x: torch.Tensor) -> torch.Tensor:
    m = ctx.cfg.model
    return instance_noise(x, m.instance_noise, m.instance_noise_kimg, ctx.nimg)


def d_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    m, D = ctx.cfg.model, ctx.nets["D"]
    y, y_fake = b.get("y"), b.get("y_fake")
    with torch.no_grad(), ctx.autocast():
        fake = _generate(ctx, ctx.nets["G"], b["z"], y_fake)
    if m.gan == "rpgan":
        return rpgan_d_step(ctx, b["image"], fake, y, y_fake)
    real_in, fake_in = _noisy(ctx, b["image"]), _noisy(ctx, fake.float())
    with ctx.autocast():
        # One call for both unless D has batch norm, whose statistics must not mix them.
        if m.norm_D != "batch":
            both, cls = _critic(ctx, D, torch.cat([real_in, fake_in]),
                                None if y is None else torch.cat([y, y_fake]))
            (pred_real, pred_fake), cls = both.chunk(2), None if cls is None else cls.chunk(2)
        else:
            (pred_real, cls_real), (pred_fake, cls_fake) = _critic(ctx, D, real_in, y), _critic(ctx, D, fake_in, y_fake)
            cls = None if cls_real is None else (cls_real, cls_fake)
    l_real, l_fake = d_loss(m.gan, pred_real, pred_fake)
    losses = {"D_real": l_real, "D_fake": l_fake}
    loss = l_real + l_fake
    if cls is not None:  # ACGAN: D classifies reals and fakes alike
        losses["D_cls"] = _class_loss(cls[0], y) + _class_loss(cls[1], y_fake)
        loss = loss + m.acgan_weight * losses["D_cls"]
    if m.gp_weight > 0:
        # Through the plain module: the penalty's double backward must not run DDP's reducer twice.
        gp = gradient_penalty(lambda x: _critic(ctx, ctx.plain["D"], x, y)[0], b["image"], fake)
        losses["D_gp"] = gp
        loss = loss + m.gp_weight * gp
    losses["loss"] = loss
    return losses


def rpgan_d_step(ctx: StepContext, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor | None = None,
                 y_fake: torch.Tensor | None = None) -> dict:
    """RpGAN + R1 + R2 (Huang et al. 2024): each real paired with a fake in the relativistic
    loss, and zero-centred gradient penalties on both, weighted γ/2. With γ > 0, D runs in fp32
    (the penalties differentiate its input gradients)."""
    m, D = ctx.cfg.model, ctx.nets["D"]
    span = m.gamma_decay_kimg if m.gamma_decay_kimg is not None else ctx.cfg.train.total_kimg
    gamma = cosine_decay(m.gamma, m.gamma_final, ctx.nimg, span * 1000)
    real_in = _noisy(ctx, real).detach().float().requires_grad_(gamma > 0)
    fake_in = _noisy(ctx, fake.float()).detach().requires_grad_(gamma > 0)
    with ctx.autocast() if gamma == 0 else contextlib.nullcontext():
        # Separate calls: batch norm must not mix them.
        (pred_real, cls_real), (pred_fake, cls_fake) = _critic(ctx, D, real_in, y), _critic(ctx, D, fake_in, y_fake)
    loss = rpgan_d_loss(pred_real, pred_fake)
    out = {"D_rpgan": loss}
    if cls_real is not None:
        out["D_cls"] = _class_loss(cls_real, y) + _class_loss(cls_fake, y_fake)
        loss = loss + m.acgan_weight * out["D_cls"]
    if gamma > 0:
        r1, r2 = zero_centred_penalty(pred_real, real_in), zero_centred_penalty(pred_fake, fake_in)
        out.update(D_r1=r1.mean().detach(), D_r2=r2.mean().detach(), **{"Progress/gamma": torch.tensor(gamma)})
        loss = loss + (gamma / 2) * (r1 + r2).mean()
    out["loss"] = loss
    return out


def g_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    m = ctx.cfg.model
    y = None if m.conditional == "none" else torch.randint_like(b["y_fake"], num_classes(ctx.cfg, ctx.info))
    with ctx.autocast():
        fake = _generate(ctx, ctx.nets["G"], torch.randn_like(b["z"]), y)
        pred, cls = _critic(ctx, ctx.plain["D"], _noisy(ctx, fake), y)  # D is frozen
        if m.gan == "rpgan":
            g = rpgan_g_loss(pred, _critic(ctx, ctx.plain["D"], _noisy(ctx, b["image"]), b.get("y"))[0])
            out = {"loss": g, "G_rpgan": g}
        else:
            g = g_loss(m.gan, pred)
            out = {"loss": g, "G_GAN": g}
    if cls is not None:  # ACGAN: G makes fakes D classifies as their class
        out["G_cls"] = _class_loss(cls, y)
        out["loss"] = out["loss"] + m.acgan_weight * out["G_cls"]
    return out


def clip_after_step(nets: dict, cfg: Config) -> None:
    weight_clip_(nets["D"], cfg.model.weight_clip)


def phases(cfg: Config) -> tuple[Phase, ...]:
    m = cfg.model
    return (Phase("D", ("D",), d_step, repeats=m.n_critic, after_step=clip_after_step if m.weight_clip > 0 else None),
            Phase("G", ("G",), g_step, fetch=False))


def optimizers(cfg: Config) -> tuple[Optimizer, ...]:
    m = cfg.model
    return (Optimizer("G", ("G",), m.lr_G, (m.beta1, m.beta2)), Optimizer("D", ("D",), m.lr_D, (m.beta1, m.beta2)))


def evaluations(cfg: Config, info: DataInfo, split: str) -> tuple[Evaluation, ...]:
    k = num_classes(cfg, info)
    if k:
        return (Evaluation("", reference=split, generate=lambda nets, b: nets["G"](b["z"], b["y"]), classes=k),)
    return (Evaluation("", reference=split, generate=lambda nets, b: nets["G"](b["z"])),)


GRID_CLASSES = 16  # rows of a class-conditional grid: the first classes, one each


@torch.no_grad()
def visualize(nets: dict, b: dict, info: DataInfo) -> list[torch.Tensor]:
    """Columns: a generated image from a fixed latent | a real image. Class-conditional: one row
    per class (the first ``GRID_CLASSES``), a column per fixed latent (up to 8, the same latent
    across the row's classes), then the first real image of the row's class in the batch (black
    when it has none)."""
    G = nets["G"]
    k = getattr(G, "num_classes", 0)
    if not k:
        return [G(b["z"]).float(), b["image"].float()]
    rows = torch.arange(min(k, GRID_CLASSES), device=b["z"].device)
    columns = [G(z.expand(len(rows), -1), rows).float() for z in b["z"][:8, None]]
    real = torch.full_like(columns[0], -1.0)
    for c in rows.tolist():
        hits = (b["y"] == c).nonzero()
        if len(hits):
            real[c] = b["image"][hits[0, 0]].float()
    return columns + [real]


FAMILY = Family(
    name="dcgan",
    config=DCGANConfig,
    build=build,
    networks=(Network("G", ema=True, snapshot=True), Network("D")),
    optimizers=optimizers,
    phases=phases,
    streams=streams,
    prepare=prepare,
    evaluations=evaluations,
    visualize=visualize,
)
