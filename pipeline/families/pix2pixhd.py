"""Pix2PixHD (Wang et al. 2018): global or coarse-to-fine generator on one-hot labels (+ instance
boundaries, + instance-wise encoded features), multiscale discriminators, LSGAN, feature
matching and VGG losses. Defaults are the official ``base_options.py``/``train_options.py`` ones;
loss names are the official ones: G_GAN, G_GAN_Feat, G_VGG, D_real, D_fake.

As in the official ``Pix2PixHDModel``, G's and D's losses of an iteration are both computed
against the networks as they were before that iteration's updates: G's phase runs first (D
frozen for G's loss; D's output on the real image, computed once, gives the feature-matching
targets and is kept for D's phase), then D's phase reuses G's detached output. Three D calls per
iteration, as the official code, but no D weight gradients are computed in G's backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import Config, ConfigError, ModelConfig, bounded, choice
from ..data.device import float_image
from ..losses.adversarial import d_loss, g_loss
from ..losses.feature_matching import feature_matching_loss
from ..losses.perceptual import require_vgg_weights, vgg_loss
from ..models.pix2pixhd import Encoder, GlobalGenerator, LocalEnhancer, MultiscaleDiscriminator
from ..train.family import DataInfo, Evaluation, Family, Network, Optimizer, Phase, StepContext, Stream
from .labelmaps import colourised, semantic_input


@dataclass
class Pix2PixHDConfig(ModelConfig):
    family: str = "pix2pixhd"
    generator: str = choice("global", "global", "local")  # netG
    ngf: int = bounded(64, 1)
    n_downsample_global: int = bounded(4, 1, 8)
    n_blocks_global: int = bounded(9, 0)
    n_local_enhancers: int = bounded(1, 1, 3)
    n_blocks_local: int = bounded(3, 0)
    norm: str = choice("instance", "instance", "batch", "none")  # G and E
    ndf: int = bounded(64, 1)
    n_layers_D: int = bounded(3, 1, 8)
    num_D: int = bounded(2, 1, 5)
    norm_D: str = choice("instance", "instance", "batch", "none")  # the official D takes the same norm as G
    use_instance: bool = True  # instance-boundary map as an extra input channel (not no_instance)
    use_features: bool = False  # instance-wise feature encoder E (instance_feat)
    feat_num: int = bounded(3, 1)
    nef: int = bounded(16, 1)
    gan: str = choice("lsgan", "lsgan", "vanilla", "hinge")  # not no_lsgan
    feat_weight: float = bounded(10.0, 0.0)  # lambda_feat; 0 is no_ganFeat_loss
    vgg_weight: float = bounded(10.0, 0.0)  # lambda_feat for VGG; 0 is no_vgg_loss
    vgg_weights: str | None = None  # local torchvision vgg19 state_dict file (never downloaded)
    lr_G: float = bounded(2e-4, 0.0)
    lr_D: float = bounded(2e-4, 0.0)
    beta1: float = bounded(0.5, 0.0, 1.0)
    beta2: float = bounded(0.999, 0.0, 1.0)
    fix_global_kimg: float = bounded(0.0, 0.0)  # niter_fix_global, in kimg: the local stage's global G fixed

    def deepspeed_limits(self) -> None:
        if self.fix_global_kimg > 0:
            raise ConfigError("model.fix_global_kimg needs distributed.backend=ddp: ZeRO partitions the gradients, "
                              "so the fixed global generator's cannot be dropped before the step")

    def check_files(self) -> None:
        require_vgg_weights(self.vgg_weight, self.vgg_weights)


class HDGenerator(nn.Module):
    """G (global or local enhancer) with the optional instance-wise feature encoder E, which is
    optimised together with G as in the official code. ``forward(label_map, image, instance)``."""

    def __init__(self, net: nn.Module, encoder: Encoder | None = None):
        super().__init__()
        self.net = net
        self.encoder = encoder

    def forward(self, label_map: torch.Tensor, image: torch.Tensor | None = None,
                instance: torch.Tensor | None = None) -> torch.Tensor:
        """``label_map`` [N, C, H, W] (one-hot + edges) → [N, 3, H, W]; with an encoder, the
        features of ``image`` pooled over ``instance`` [N, 1, H, W] are appended first."""
        if self.encoder is not None:
            label_map = torch.cat([label_map, self.encoder(image, instance)], 1)
        return self.net(label_map)


def input_channels(cfg: Config, info: DataInfo) -> int:
    if info.task != "label2image":
        raise ValueError(f"pix2pixhd trains on label2image shards (label maps), not {info.task!r}")
    m = cfg.model
    return int(info.num_classes) + int(m.use_instance) + (m.feat_num if m.use_features else 0)


def build(cfg: Config, info: DataInfo) -> dict:
    m = cfg.model
    in_nc = input_channels(cfg, info)
    if m.generator == "global":
        net = GlobalGenerator(in_nc, output_nc=3, ngf=m.ngf, n_downsample=m.n_downsample_global,
                              n_blocks=m.n_blocks_global, norm=m.norm)
    else:
        net = LocalEnhancer(in_nc, output_nc=3, ngf=m.ngf, n_downsample_global=m.n_downsample_global,
                            n_blocks_global=m.n_blocks_global, n_local_enhancers=m.n_local_enhancers,
                            n_blocks_local=m.n_blocks_local, norm=m.norm)
    encoder = Encoder(input_nc=3, output_nc=m.feat_num, ngf=m.nef, norm=m.norm) if m.use_features else None
    D = MultiscaleDiscriminator(in_nc + 3, ndf=m.ndf, n_layers=m.n_layers_D, num_D=m.num_D, norm=m.norm_D)
    return {"G": HDGenerator(net, encoder), "D": D}


def streams(cfg: Config, info: DataInfo, split: str) -> tuple[Stream, ...]:
    return (Stream("data", split, tuple(f for f in ("label", "instance", "image") if f in info.fields)),)


def prepare(batches: dict[str, dict], device: torch.device, cfg: Config, info: DataInfo) -> dict:
    """``input`` [N, label_nc (+1 edges), H, W] built on the device (no per-step host work),
    ``image`` [N, 3, H, W] in [-1, 1], ``instance`` [N, 1, H, W] int32, ``label`` [N, H, W] int64.
    The loader's uint8 images and integer maps are converted on the device (``data.device``)."""
    batch, m = batches["data"], cfg.model
    inp, label, instance = semantic_input(batch, device, info.num_classes, edges=m.use_instance,
                                          instances=m.use_features)
    image = float_image(batch["image"].to(device, non_blocking=True))
    if cfg.train.channels_last:
        inp, image = (t.contiguous(memory_format=torch.channels_last) for t in (inp, image))
    return {"input": inp, "image": image, "instance": instance, "label": label}


@contextlib.contextmanager
def trainable(module: nn.Module):
    """Parameters of ``module`` require grad inside, as they did before afterwards."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def g_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    m, D = ctx.cfg.model, ctx.plain["D"]
    with ctx.autocast():
        fake = ctx.nets["G"](b["input"], b["image"], b["instance"])
        scratch["fake"] = fake.detach()
        # D(real) once per iteration, as the official model: its graph is kept for D's phase
        # (D_real), and its features are the (detached) feature-matching targets here, so G's
        # backward never reaches it and D stays frozen for everything G's loss touches.
        with trainable(D):
            pred_real = D(torch.cat([b["input"], b["image"]], 1))
        scratch["pred_real"] = pred_real
        pred_fake = D(torch.cat([b["input"], fake], 1))
    losses = {"G_GAN": g_loss(m.gan, pred_fake)}
    if m.feat_weight > 0:
        losses["G_GAN_Feat"] = feature_matching_loss(pred_real, pred_fake, m.num_D, m.n_layers_D, weight=m.feat_weight)
    if m.vgg_weight > 0:
        losses["G_VGG"] = vgg_loss(m.vgg_weights, fake.device)(fake, b["image"]) * m.vgg_weight
    losses["loss"] = sum(losses.values())
    return losses


def d_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    fake, pred_real = scratch.pop("fake"), scratch.pop("pred_real")  # both from G's phase
    with ctx.autocast():
        pred_fake = ctx.nets["D"](torch.cat([b["input"], fake], 1))
    l_real, l_fake = d_loss(ctx.cfg.model.gan, pred_real, pred_fake)
    return {"loss": 0.5 * (l_real + l_fake), "D_real": l_real, "D_fake": l_fake}


def optimizers(cfg: Config) -> tuple[Optimizer, ...]:
    m = cfg.model
    betas = (m.beta1, m.beta2)
    groups = None
    if m.generator == "local" and m.fix_global_kimg > 0:
        # niter_fix_global: the global generator (and coarser enhancers) stay as initialised.
        def groups(nets: dict) -> list[dict]:
            fixed = {id(p) for p in nets["G"].net.global_parameters()}
            return [{"params": [p for p in nets["G"].parameters() if id(p) in fixed],
                     "fixed_until_nimg": int(m.fix_global_kimg * 1000)},
                    {"params": [p for p in nets["G"].parameters() if id(p) not in fixed]}]
    return (Optimizer("G", ("G",), m.lr_G, betas, groups), Optimizer("D", ("D",), m.lr_D, betas))


def init_from(nets: dict, load: Callable[[str], dict | None]) -> None:
    """Coarse-to-fine (``load_pretrain``): a local-enhancer G starts from a global run's G (its
    global part); otherwise each saved network is loaded as it is."""
    G, state = nets["G"], load("G")
    if state is None:
        raise ValueError("model.init_from holds no G")
    if isinstance(G.net, LocalEnhancer) and any(k.startswith("net.model.") for k in state):
        G.net.load_global({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
        if G.encoder is not None:
            G.encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()
                                       if k.startswith("encoder.")})
        return
    G.load_state_dict(state)


def generate(nets: dict, b: dict) -> torch.Tensor:
    return nets["G"](b["input"], b["image"], b["instance"])


def evaluations(cfg: Config, info: DataInfo, split: str) -> tuple[Evaluation, ...]:
    return (Evaluation("", reference=split, generate=generate, inputs=streams(cfg, info, split)[0], paired=True),)


@torch.no_grad()
def visualize(nets: dict, b: dict, info: DataInfo) -> list[torch.Tensor]:
    """Columns: label map (colourised) | output | target, [N, 3, H, W] in [-1, 1]."""
    return [colourised(b["label"], info), generate(nets, b).float(), b["image"].float()]


FAMILY = Family(
    name="pix2pixhd",
    config=Pix2PixHDConfig,
    build=build,
    networks=(Network("G", ema=True, snapshot=True), Network("D")),
    optimizers=optimizers,
    phases=lambda cfg: (Phase("G", ("G",), g_step), Phase("D", ("D",), d_step, fetch=False)),
    streams=streams,
    prepare=prepare,
    evaluations=evaluations,
    visualize=visualize,
    init_from=init_from,
)
