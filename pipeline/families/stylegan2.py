"""StyleGAN2 with adaptive discriminator augmentation (Karras et al. 2020a, config F; Karras et al.
2020b, ADA), following NVlabs/stylegan2-ada-pytorch ``training/loss.py`` and
``training/training_loop.py``: non-saturating logistic loss, lazy R1 and path-length
regularisation with the optimizer correction for their intervals, style mixing, G EMA with a
half-life in kimg, and ADA's p steered by the sign of D on reals (mean over all ranks).

The official phase order, one real batch per iteration: ``Gmain``, ``Greg`` (every
``G_reg_interval``), ``Dmain``, ``Dreg`` (every ``D_reg_interval``); each draws its own latents.
Loss names are the official ``training_stats`` names (``Loss/G/loss``, ``Loss/D/reg``,
``Loss/signs/real``, ``Progress/augment``), so curves compare. Unlike the official snapshots, a
checkpoint here keeps both optimizers, ``p`` (a buffer of D's augment pipe) and each rank's
path-length mean, so a resume continues exactly. ``model.loss=rpgan`` replaces the logistic loss
with the relativistic pairing loss of R3GAN (Huang et al. 2024), and the lazy R1 by R1 + R2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, ConfigError, ModelConfig, bounded, choice
from ..data.device import float_image
from ..losses.adversarial import rpgan_d_loss, rpgan_g_loss
from ..models.ada import AUGPIPES, AugmentPipe, ada_adjust, augment_preset
from ..models.stylegan2 import Discriminator, Generator
from ..train.family import DataInfo, Evaluation, Family, Network, Optimizer, Phase, StepContext, Stream


@dataclass
class StyleGAN2Config(ModelConfig):
    """Defaults: the official ``--cfg=stylegan2`` (config F) at 1024², except that fp16 layers
    (``num_fp16_res``) are off: bf16 autocast is the precision policy here."""

    family: str = "stylegan2"
    resolution: int = bounded(1024, 4, 4096)  # img_resolution, a power of two: the crop size
    z_dim: int = bounded(512, 1)
    w_dim: int = bounded(512, 1)
    map: int = bounded(8, 1)  # mapping network layers
    cbase: int = bounded(32768, 1)  # channel_base: channels at resolution r are min(cbase / r, cmax)
    cmax: int = bounded(512, 1)  # channel_max
    mbstd: int = bounded(4, 1)  # minibatch-stddev group size
    num_fp16_res: int = bounded(0, 0)  # fp16 in the highest resolutions (CUDA only), with conv_clamp
    conv_clamp: float = bounded(256.0, 0.0)  # activation clamp (official 256); 0: none
    architecture_D: str = choice("resnet", "resnet", "skip", "orig")
    lr_G: float = bounded(0.002, 0.0)
    lr_D: float = bounded(0.002, 0.0)
    beta1: float = bounded(0.0, 0.0, 1.0)
    beta2: float = bounded(0.99, 0.0, 1.0)
    r1_gamma: float = bounded(10.0, 0.0)
    # rpgan: D(real) - D(fake) in the logistic loss, pairs as R3GAN; Dreg then adds R2 on fakes (γ = r1_gamma)
    loss: str = choice("logistic", "logistic", "rpgan")
    G_reg_interval: int = bounded(4, 1)  # lazy path-length regularisation
    D_reg_interval: int = bounded(16, 1)  # lazy R1
    pl_weight: float = bounded(2.0, 0.0)
    pl_decay: float = bounded(0.01, 0.0, 1.0)
    pl_batch_shrink: int = bounded(2, 1)
    style_mixing_prob: float = bounded(0.9, 0.0, 1.0)
    # ADA: ada (p steered toward ada_target), fixed (p stays at augment_p), noaug (no pipe).
    aug: str = choice("ada", "ada", "fixed", "noaug")
    augpipe: str = choice("bgc", *AUGPIPES)
    augment_p: float = bounded(0.0, 0.0, 1.0)  # initial (ada) or fixed p
    ada_target: float = bounded(0.6, 0.0, 1.0)
    ada_interval: int = bounded(4, 1)  # iterations between adjustments
    ada_kimg: float = bounded(500.0, 0.0)  # kimg for p to move by 1
    truncation_psi: float = bounded(1.0, 0.0)  # image grids; metrics always use 1
    ema_kimg: float = bounded(10.0, 0.0)
    ema_rampup: float | None = None

    def check(self) -> None:
        if self.resolution & (self.resolution - 1):
            raise ConfigError(f"model.resolution={self.resolution} must be a power of two (64, 256, 1024, ...)")
        if self.aug == "fixed" and self.augment_p == 0:
            raise ConfigError("model.aug=fixed needs model.augment_p > 0 (or model.aug=noaug)")
        if self.aug != "noaug" and self.ada_kimg == 0 and self.aug == "ada":
            raise ConfigError("model.ada_kimg must be > 0 with model.aug=ada")


class StyleMixingGenerator(Generator):
    """The official Generator, whose forward also runs the training-time extras inside one call
    (so one DDP forward covers both mapping calls): style mixing with probability
    ``style_mixing_prob`` (``loss.py run_G``: a second latent from a random layer cutoff on), and
    ``return_ws`` for path-length regularisation. State dict keys are the official ones."""

    def forward(self, z: Tensor, c: Tensor, truncation_psi: float = 1, truncation_cutoff: int | None = None,
                style_mixing_prob: float = 0.0, return_ws: bool = False, **synthesis_kwargs):
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        if style_mixing_prob > 0:
            cutoff = torch.empty([], dtype=torch.int64, device=ws.device).random_(1, ws.shape[1])
            cutoff = torch.where(torch.rand([], device=ws.device) < style_mixing_prob, cutoff,
                                 torch.full_like(cutoff, ws.shape[1]))
            mixed = self.mapping(torch.randn_like(z), c, skip_w_avg_update=True)
            keep = torch.arange(ws.shape[1], device=ws.device) < cutoff  # ws[:, cutoff:] = mixed[:, cutoff:]
            ws = torch.where(keep[None, :, None], ws, mixed)
        img = self.synthesis(ws, **synthesis_kwargs)
        return (img, ws) if return_ws else img


class AugmentedDiscriminator(Discriminator):
    """The official Discriminator with ADA's pipe in front of it (``loss.py run_D``), so that
    everything D sees is augmented and ``p`` (a buffer of the pipe) is saved and restored with
    D's weights. ``augment_pipe`` None: no augmentation. Keys: the official ones plus
    ``augment_pipe.*``."""

    def __init__(self, augment_pipe: AugmentPipe | None = None, **kwargs):
        super().__init__(**kwargs)
        self.augment_pipe = augment_pipe

    def forward(self, img: Tensor, c: Tensor, **kwargs) -> Tensor:
        if self.augment_pipe is not None:
            img = self.augment_pipe(img)
        return super().forward(img, c, **kwargs)


def network_kwargs(m: StyleGAN2Config) -> tuple[dict, dict]:
    """(G's, D's) constructor keyword arguments from the config, as the official train.py sets them."""
    clamp = m.conv_clamp or None
    G = dict(z_dim=m.z_dim, c_dim=0, w_dim=m.w_dim, img_resolution=m.resolution, img_channels=3,
             mapping_kwargs=dict(num_layers=m.map),
             synthesis_kwargs=dict(channel_base=m.cbase, channel_max=m.cmax, num_fp16_res=m.num_fp16_res,
                                   conv_clamp=clamp))
    D = dict(c_dim=0, img_resolution=m.resolution, img_channels=3, architecture=m.architecture_D,
             channel_base=m.cbase, channel_max=m.cmax, num_fp16_res=m.num_fp16_res, conv_clamp=clamp,
             epilogue_kwargs=dict(mbstd_group_size=m.mbstd))
    return G, D


def build(cfg: Config, info: DataInfo) -> dict:
    m = cfg.model
    G_kwargs, D_kwargs = network_kwargs(m)
    pipe = None
    if m.aug != "noaug":
        pipe = AugmentPipe(**augment_preset(m.augpipe))
        pipe.set_p(m.augment_p)
    return {"G": StyleMixingGenerator(**G_kwargs), "D": AugmentedDiscriminator(augment_pipe=pipe, **D_kwargs)}


def streams(cfg: Config, info: DataInfo, split: str) -> tuple[Stream, ...]:
    return (Stream("data", split, ("image",)),)


def prepare(batches: dict[str, dict], device: torch.device, cfg: Config, info: DataInfo) -> dict:
    """``image`` [N, 3, R, R] in [-1, 1] and ``z`` [N, z_dim] (its batch size; each phase draws
    its own latents)."""
    image = float_image(batches["data"]["image"].to(device, non_blocking=True))
    size = cfg.model.resolution
    if image.shape[-2:] != (size, size):
        raise ValueError(f"stylegan2 expects {size}x{size} images (model.resolution), got "
                         f"{tuple(image.shape[-2:])}: set data.load_size / data.crop_size")
    return {"image": image, "z": torch.randn(image.shape[0], cfg.model.z_dim, device=device)}


def _no_c(z: Tensor) -> Tensor:
    return z.new_zeros(z.shape[0], 0)


def _z(ctx: StepContext, n: int, like: Tensor) -> Tensor:
    return torch.randn(n, ctx.cfg.model.z_dim, device=like.device)


def _signs(ctx: StepContext, logits: Tensor) -> Tensor:
    """Adds D's signs on reals to this rank's ADA accumulator (the official ``Loss/signs/real``)."""
    signs = logits.detach().float().sign()
    acc = ctx.state.get("ada_signs")
    if acc is None:
        acc = ctx.state["ada_signs"] = torch.zeros(2, device=logits.device)
    acc += torch.stack([signs.sum(), torch.tensor(float(signs.numel()), device=signs.device)])
    return signs.mean()


def _adjust_p(ctx: StepContext) -> None:
    """Every ``ada_interval`` iterations (the official heuristic, after iterations k·interval):
    move p toward the target from the mean sign of D on reals over all ranks. Every rank calls
    the collective at the same steps, and all get the same p."""
    m = ctx.cfg.model
    pipe = ctx.plain["D"].augment_pipe
    if m.aug != "ada" or ctx.step == 0 or ctx.step % m.ada_interval:
        return
    acc = ctx.state.get("ada_signs")
    if acc is None:  # a resume after a change of world size starts the window afresh
        acc = torch.zeros(2, device=pipe.p.device)
    total = ctx.mean_over_ranks(acc)
    if total[1] > 0:
        rt = float(total[0] / total[1])
        new = ada_adjust(pipe.p_host, rt, target=m.ada_target, batch_size=ctx.cfg.train.batch_size,
                         interval=m.ada_interval, ada_kimg=m.ada_kimg)
        pipe.set_p(new)
    ctx.state["ada_signs"] = torch.zeros(2, device=pipe.p.device)


def g_main(ctx: StepContext, b: dict, scratch: dict) -> dict:
    """Gmain: maximise D's logits for generated images (non-saturating logistic loss)."""
    _adjust_p(ctx)
    m = ctx.cfg.model
    z = _z(ctx, b["z"].shape[0], b["z"])
    with ctx.autocast():
        img = ctx.nets["G"](z, _no_c(z), style_mixing_prob=m.style_mixing_prob)
        logits = ctx.plain["D"](img, _no_c(z)).float()  # D frozen
        if m.loss == "rpgan":
            real_logits = ctx.plain["D"](b["image"], _no_c(z)).float()
    loss = rpgan_g_loss(logits, real_logits) if m.loss == "rpgan" else F.softplus(-logits).mean()
    out = {"loss": loss, "G/loss": loss, "scores/fake": logits.detach().mean()}
    if ctx.plain["D"].augment_pipe is not None:
        out["Progress/augment"] = ctx.plain["D"].augment_pipe.p.detach().clone()
    return out


def g_reg(ctx: StepContext, b: dict, scratch: dict) -> dict:
    """Greg: path-length regularisation on a batch shrunk by ``pl_batch_shrink``, in fp32; the
    path-length mean is this rank's, as officially. Weighted by the interval (lazy)."""
    m = ctx.cfg.model
    n = max(1, b["z"].shape[0] // m.pl_batch_shrink)
    z = _z(ctx, n, b["z"])
    img, ws = ctx.nets["G"](z, _no_c(z), style_mixing_prob=m.style_mixing_prob, return_ws=True)
    noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
    grads, = torch.autograd.grad(outputs=[(img * noise).sum()], inputs=[ws], create_graph=True, only_inputs=True)
    lengths = grads.square().sum(2).mean(1).sqrt()
    # As loss.py: the penalty's mean keeps this batch's graph; the state keeps its value.
    mean = ctx.state.get("pl_mean", torch.zeros([], device=img.device)).lerp(lengths.mean(), m.pl_decay)
    ctx.state["pl_mean"] = mean.detach()
    penalty = (lengths - mean).square()
    reg = penalty * m.pl_weight
    loss = (img[:, 0, 0, 0] * 0 + reg).mean() * m.G_reg_interval
    return {"loss": loss, "G/reg": reg.mean().detach(), "pl_penalty": penalty.mean().detach()}


def d_main(ctx: StepContext, b: dict, scratch: dict) -> dict:
    """Dmain: minimise D's logits for generated images, maximise them for reals; D sees the
    fake and the real batch in separate calls (minibatch stddev must not mix them)."""
    m = ctx.cfg.model
    z = _z(ctx, b["z"].shape[0], b["z"])
    with torch.no_grad(), ctx.autocast():
        fake = ctx.plain["G"](z, _no_c(z), style_mixing_prob=m.style_mixing_prob)  # G frozen
    with ctx.autocast():
        fake_logits = ctx.nets["D"](fake.float(), _no_c(z)).float()
        real_logits = ctx.nets["D"](b["image"], _no_c(z)).float()
    if m.loss == "rpgan":
        loss = rpgan_d_loss(real_logits, fake_logits)
    else:
        loss = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
    return {"loss": loss, "D/loss": loss.detach(), "scores/fake": fake_logits.detach().mean(),
            "scores/real": real_logits.detach().mean(), "signs/real": _signs(ctx, real_logits)}


def d_reg(ctx: StepContext, b: dict, scratch: dict) -> dict:
    """Dreg: R1 on the non-augmented reals (the gradient flows back through the augment pipe), in
    fp32, weighted by gamma/2 and the interval; ``logits * 0`` reaches every parameter of D. With
    ``loss=rpgan`` also R2, the same penalty on fakes of the frozen G, weighted alike."""
    m = ctx.cfg.model
    real = b["image"].detach().requires_grad_(True)
    logits = ctx.nets["D"](real, _no_c(real)).float()
    grads, = torch.autograd.grad(outputs=[logits.sum()], inputs=[real], create_graph=True, only_inputs=True)
    penalty = grads.square().sum([1, 2, 3])
    out = {"r1_penalty": penalty.mean().detach(), "signs/real": _signs(ctx, logits)}
    total = logits * 0
    if m.loss == "rpgan":
        z = _z(ctx, real.shape[0], real)
        with torch.no_grad():
            fake = ctx.plain["G"](z, _no_c(z), style_mixing_prob=m.style_mixing_prob).float()
        fake.requires_grad_(True)
        fake_logits = ctx.nets["D"](fake, _no_c(z)).float()
        grads, = torch.autograd.grad(outputs=[fake_logits.sum()], inputs=[fake], create_graph=True, only_inputs=True)
        r2 = grads.square().sum([1, 2, 3])
        out["r2_penalty"] = r2.mean().detach()
        penalty, total = penalty + r2, total + fake_logits * 0
    reg = penalty * (m.r1_gamma / 2)
    loss = (total + reg[:, None]).mean() * m.D_reg_interval
    return {"loss": loss, "D/reg": reg.mean().detach(), **out}


def phases(cfg: Config) -> tuple[Phase, ...]:
    m = cfg.model
    out = [Phase("Gmain", ("G",), g_main)]
    if m.pl_weight > 0:
        out.append(Phase("Greg", ("G",), g_reg, fetch=False, every=m.G_reg_interval))
    out.append(Phase("Dmain", ("D",), d_main, fetch=False))
    if m.r1_gamma > 0:
        out.append(Phase("Dreg", ("D",), d_reg, fetch=False, every=m.D_reg_interval))
    return tuple(out)


def optimizers(cfg: Config) -> tuple[Optimizer, ...]:
    """Adam with the lazy-regularisation correction (``training_loop.py``): with interval k,
    lr·c and betas^c, c = k/(k+1); without the regulariser, none."""
    m = cfg.model

    def corrected(name: str, lr: float, k: int, on: bool) -> Optimizer:
        c = k / (k + 1) if on else 1.0
        return Optimizer(name, (name,), lr * c, (m.beta1 ** c, m.beta2 ** c))

    return (corrected("G", m.lr_G, m.G_reg_interval, m.pl_weight > 0),
            corrected("D", m.lr_D, m.D_reg_interval, m.r1_gamma > 0))


def evaluations(cfg: Config, info: DataInfo, split: str) -> tuple[Evaluation, ...]:
    """Unconditional FID/KID from fixed latents against ``split`` (ψ = 1, random noise, as the
    official metrics); ``gan-generate --truncation`` passes its ψ in the batch."""
    def generate(nets: dict, b: dict) -> Tensor:
        return nets["G"](b["z"], _no_c(b["z"]), truncation_psi=b.get("truncation_psi", 1.0))

    return (Evaluation("", reference=split, generate=generate),)


@torch.no_grad()
def visualize(nets: dict, b: dict, info: DataInfo) -> list[torch.Tensor]:
    """Columns: G(z) with constant noise | the same latents truncated (ψ = 0.5) | a real image."""
    G, z = nets["G"], b["z"]
    return [G(z, _no_c(z), noise_mode="const").float(),
            G(z, _no_c(z), truncation_psi=0.5, noise_mode="const").float(), b["image"].float()]


def init_source(url: str, storage_options: dict | None) -> Callable[[str], dict | None] | None:
    """``model.init_from`` naming an official network pickle (``*.pkl``): its ``G`` and ``D`` (and
    ADA's p), read without running any code from it; None for our own checkpoints."""
    if not url.endswith(".pkl"):
        return None
    from ..models.stylegan2_pickle import load_official_pickle

    nets = load_official_pickle(url, storage_options)
    return nets.get


def init_from(nets: dict[str, nn.Module], load: Callable[[str], dict | None]) -> None:
    """G and D from the source, as saved; an official pickle's D has no ``augment_pipe.*`` (its
    pipe is separate): D then keeps this run's initial p."""
    for name in ("G", "D"):
        state = load(name)
        if state is None:
            raise ValueError(f"model.init_from holds no {name}")
        ours = nets[name].state_dict()
        misfit = [k for k in ours if not k.startswith("augment_pipe.") and
                  (k not in state or state[k].shape != ours[k].shape)] + [k for k in state if k not in ours]
        if misfit:
            raise ValueError(f"model.init_from: its {name} does not fit this config's network ({len(misfit)} "
                             f"tensors differ, e.g. {misfit[0]}): set model.resolution, cbase, cmax, map, "
                             f"z_dim and w_dim as the source was trained")
        nets[name].load_state_dict(state, strict=False)


FAMILY = Family(
    name="stylegan2",
    config=StyleGAN2Config,
    build=build,
    networks=(Network("G", ema=True, snapshot=True), Network("D")),
    optimizers=optimizers,
    phases=phases,
    streams=streams,
    prepare=prepare,
    evaluations=evaluations,
    visualize=visualize,
    init_from=init_from,
    init_source=init_source,
)
