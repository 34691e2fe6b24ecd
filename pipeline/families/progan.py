"""Progressive growing of GANs (Karras et al. 2018; official code tkarras/progressive_growing_of_gans):
G and D grow from ``initial_resolution`` to ``resolution``, each new block faded in over
``lod_transition_kimg`` after ``lod_training_kimg`` at the previous level, the official
``TrainingSchedule``; WGAN-GP with the ε-drift term (the paper's loss) or any of the DCGAN
family's adversarial losses; Adam(0.001, 0, 0.99) whose state starts afresh whenever the level
changes (the official ``reset_opt_for_new_lod``).

The level of detail is a function of the images seen, so a resumed run continues at the same
resolution and fade weight; it is also kept in G's and D's ``lod`` buffers, so snapshots generate
at their own resolution (the evaluator upscales to the full size, as the official G does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import Config, ConfigError, ModelConfig, bounded, choice
from ..data.device import float_image
from ..losses.adversarial import d_loss, g_loss
from ..losses.regularizers import gradient_penalty
from ..models.progan import ProGANDiscriminator, ProGANGenerator, fade_reals
from ..train.family import DataInfo, Evaluation, Family, Network, Optimizer, Phase, StepContext, Stream


@dataclass
class ProGANConfig(ModelConfig):
    family: str = "progan"
    resolution: int = bounded(1024, 8)  # the final one; the stream delivers images of this size
    z_dim: int = bounded(512, 1)  # the official latent_size (z_dim: the name the evaluator and gan-generate read)
    fmap_base: int = bounded(8192, 1)
    fmap_max: int = bounded(512, 1)
    mbstd_group_size: int = bounded(4, 1)
    initial_resolution: int = bounded(4, 4)  # official lod_initial_resolution
    lod_training_kimg: float = bounded(600.0, 0.0)
    lod_transition_kimg: float = bounded(600.0, 0.0)
    reset_optimizer: bool = True  # official reset_opt_for_new_lod
    gan: str = choice("wgan", "wgan", "vanilla", "lsgan", "hinge")
    gp_weight: float = bounded(10.0, 0.0)  # wgan_lambda (the penalty divided by wgan_target², as official)
    gp_target: float = bounded(1.0, 0.0)  # wgan_target
    drift: float = bounded(0.001, 0.0)  # wgan_epsilon: ε · D(real)²
    lr: float = bounded(0.001, 0.0)
    beta1: float = bounded(0.0, 0.0, 1.0)
    beta2: float = bounded(0.99, 0.0, 1.0)
    ema_kimg: float = bounded(10.0, 0.0)  # ~ the official G_smoothing 0.999 per step at batch 16

    def check(self) -> None:
        for name in ("resolution", "initial_resolution"):
            value = getattr(self, name)
            if 2 ** int(math.log2(value)) != value:
                raise ConfigError(f"model.{name} must be a power of 2, got {value}")
        if self.initial_resolution > self.resolution:
            raise ConfigError(f"model.initial_resolution ({self.initial_resolution}) exceeds model.resolution "
                              f"({self.resolution})")
        if self.gp_weight and not self.gp_target:
            raise ConfigError("model.gp_target must be > 0 with a gradient penalty (the official wgan_target)")

    def deepspeed_limits(self) -> None:
        if self.reset_optimizer:
            raise ConfigError("model.reset_optimizer needs distributed.backend=ddp: the ZeRO engines' optimizer state "
                              "cannot be reset; or set model.reset_optimizer=false")


def lod_at(m: ProGANConfig, nimg: int) -> float:
    """The official ``TrainingSchedule`` level of detail after ``nimg`` images: ``log2(resolution
    / initial_resolution)`` minus one per finished phase of ``lod_training_kimg`` +
    ``lod_transition_kimg``, minus the fraction of the current transition done; never below 0."""
    train, fade = round(m.lod_training_kimg * 1000), round(m.lod_transition_kimg * 1000)  # in images: exact
    index = nimg // (train + fade) if train + fade > 0 else 0
    lod = math.log2(m.resolution) - math.log2(m.initial_resolution) - index
    if fade > 0:
        lod -= max(nimg - index * (train + fade) - train, 0) / fade
    return max(lod, 0.0)


def optimizer_epoch(cfg: Config, nimg: int):
    """Changes when floor or ceil of the lod does, as the official reset condition."""
    if not cfg.model.reset_optimizer:
        return None
    lod = lod_at(cfg.model, nimg)
    return math.floor(lod), math.ceil(lod)


def build(cfg: Config, info: DataInfo) -> dict:
    m = cfg.model
    G = ProGANGenerator(m.resolution, m.z_dim, m.fmap_base, m.fmap_max)
    D = ProGANDiscriminator(m.resolution, m.fmap_base, m.fmap_max, mbstd_group_size=m.mbstd_group_size)
    lod = lod_at(m, 0)
    G.lod.fill_(lod)
    D.lod.fill_(lod)
    return {"G": G, "D": D}


def streams(cfg: Config, info: DataInfo, split: str) -> tuple[Stream, ...]:
    return (Stream("data", split, ("image",)),)


def prepare(batches: dict[str, dict], device: torch.device, cfg: Config, info: DataInfo) -> dict:
    """``image`` [N, 3, R, R] in [-1, 1] at the final resolution, ``z`` [N, z_dim]."""
    image = float_image(batches["data"]["image"].to(device, non_blocking=True))
    size = cfg.model.resolution
    if image.shape[-1] != size or image.shape[-2] != size:
        raise ValueError(f"progan expects {size}x{size} images (model.resolution), got {tuple(image.shape[-2:])}: "
                         f"set data.load_size / data.crop_size")
    return {"image": image, "z": torch.randn(image.shape[0], cfg.model.z_dim, device=device)}


def _level(ctx: StepContext) -> float:
    """The step's lod, written into G's and D's buffers (for snapshots, and G's EMA copy)."""
    lod = lod_at(ctx.cfg.model, ctx.nimg)
    for name in ("G", "D"):
        ctx.plain[name].lod.fill_(lod)
    return lod


def d_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    m, D = ctx.cfg.model, ctx.nets["D"]
    lod = _level(ctx)
    with torch.no_grad(), ctx.autocast():
        fake = ctx.nets["G"](b["z"], lod)
    real = fade_reals(b["image"], lod, m.resolution)
    with ctx.autocast():  # separate calls: the minibatch stddev must not mix reals and fakes
        pred_real, pred_fake = D(real, lod), D(fake, lod)
    l_real, l_fake = d_loss(m.gan, pred_real, pred_fake)
    out = {"D_real": l_real, "D_fake": l_fake, "Progress/lod": torch.tensor(lod)}
    loss = l_real + l_fake
    if m.gp_weight > 0:
        gp = gradient_penalty(lambda x: ctx.plain["D"](x, lod), real, fake.float(), center=m.gp_target)
        out["D_gp"] = gp
        loss = loss + gp * (m.gp_weight / m.gp_target**2)
    if m.drift > 0:
        out["D_drift"] = pred_real.float().square().mean()
        loss = loss + m.drift * out["D_drift"]
    out["loss"] = loss
    return out


def g_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    lod = _level(ctx)
    with ctx.autocast():
        fake = ctx.nets["G"](torch.randn_like(b["z"]), lod)
        pred = ctx.plain["D"](fake, lod)  # D is frozen
    g = g_loss(ctx.cfg.model.gan, pred)
    return {"loss": g, "G_GAN": g}


def phases(cfg: Config) -> tuple[Phase, ...]:
    return (Phase("D", ("D",), d_step), Phase("G", ("G",), g_step, fetch=False))


def optimizers(cfg: Config) -> tuple[Optimizer, ...]:
    m = cfg.model
    return (Optimizer("G", ("G",), m.lr, (m.beta1, m.beta2)), Optimizer("D", ("D",), m.lr, (m.beta1, m.beta2)))


def evaluations(cfg: Config, info: DataInfo, split: str) -> tuple[Evaluation, ...]:
    return (Evaluation("", reference=split, generate=lambda nets, b: nets["G"](b["z"], full=True)),)


@torch.no_grad()
def visualize(nets: dict, b: dict, info: DataInfo) -> list[torch.Tensor]:
    """Columns: a generated image from a fixed latent at the current level (upscaled) | a real one."""
    return [nets["G"](b["z"], full=True).float(), b["image"].float()]


FAMILY = Family(
    name="progan",
    config=ProGANConfig,
    build=build,
    networks=(Network("G", ema=True, snapshot=True), Network("D")),
    optimizers=optimizers,
    phases=phases,
    streams=streams,
    prepare=prepare,
    evaluations=evaluations,
    visualize=visualize,
    optimizer_epoch=optimizer_epoch,
)
