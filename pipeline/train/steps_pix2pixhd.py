"""Pix2PixHD (Wang et al. 2018): global or coarse-to-fine generator on one-hot labels (+ instance
boundaries, + instance-wise encoded features), multiscale discriminators, LSGAN, feature
matching and VGG losses. Loss names are the official ones: G_GAN, G_GAN_Feat, G_VGG, D_real,
D_fake.

As in the official ``Pix2PixHDModel``, G's and D's losses of an iteration are both computed
against the networks as they were before that iteration's updates: G's phase runs first (D
frozen for G's loss; D's output on the real image, computed once, gives the feature-matching
targets and is kept for D's phase), then D's phase reuses G's detached output. Three D calls per
iteration, as the official code, but no D weight gradients are computed in G's backward.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..config import Config
from ..data.device import class_ids, float_image, instance_ids
from ..losses.adversarial import d_loss, g_loss
from ..losses.feature_matching import feature_matching_loss
from ..models.pix2pixhd import Encoder, GlobalGenerator, LocalEnhancer, MultiscaleDiscriminator
from .family import DataInfo, Family, Phase, StepContext, one_hot


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
    return int(info.num_classes) + int(cfg.model.use_instance) + (cfg.model.feat_num if cfg.model.use_features else 0)


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


def fields(info: DataInfo) -> tuple[str, ...]:
    return tuple(f for f in ("label", "instance", "image") if f in info.fields)


def edges(instance: torch.Tensor) -> torch.Tensor:
    """Instance boundaries [N, 1, H, W] (1.0 where a 4-neighbour has another id), on the device."""
    t = instance
    edge = torch.zeros_like(t, dtype=torch.bool)
    dx = t[..., :, 1:] != t[..., :, :-1]
    dy = t[..., 1:, :] != t[..., :-1, :]
    edge[..., :, 1:] |= dx
    edge[..., :, :-1] |= dx
    edge[..., 1:, :] |= dy
    edge[..., :-1, :] |= dy
    return edge.float()


def prepare(batch: dict, device: torch.device, cfg: Config, info: DataInfo) -> dict:
    """``input`` [N, label_nc (+1 edges), H, W] built on the device (no per-step host work),
    ``image`` [N, 3, H, W] in [-1, 1], ``instance`` [N, 1, H, W] int32, ``label`` [N, H, W] int64.
    The loader's uint8 images and integer maps are converted on the device (``data.device``)."""
    label = class_ids(batch["label"].to(device, non_blocking=True))
    parts = [one_hot(label, info.num_classes)]
    instance = None
    if cfg.model.use_instance or cfg.model.use_features:
        if "instance" not in batch:
            raise ValueError("model.use_instance / use_features need instance maps in the shards")
        instance = instance_ids(batch["instance"].to(device, non_blocking=True)).unsqueeze(1)  # uint16 from PNG
    if cfg.model.use_instance:
        parts.append(edges(instance))
    inp = torch.cat(parts, 1)
    image = float_image(batch["image"].to(device, non_blocking=True))
    if cfg.train.channels_last:
        inp, image = (t.contiguous(memory_format=torch.channels_last) for t in (inp, image))
    return {"input": inp, "image": image, "instance": instance, "label": label}


@contextlib.contextmanager
def _trainable(module: nn.Module):
    """Parameters of ``module`` require grad inside, as they did before afterwards."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def g_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    cfg = ctx.cfg
    with ctx.autocast():
        fake = ctx.G(b["input"], b["image"], b["instance"])
        scratch["fake"] = fake.detach()
        # D(real) once per iteration, as the official model: its graph is kept for D's phase
        # (D_real), and its features are the (detached) feature-matching targets here, so G's
        # backward never reaches it and D stays frozen for everything G's loss touches.
        with _trainable(ctx.D_plain):
            pred_real = ctx.D_plain(torch.cat([b["input"], b["image"]], 1))
        scratch["pred_real"] = pred_real
        pred_fake = ctx.D_plain(torch.cat([b["input"], fake], 1))
    losses = {"G_GAN": g_loss(cfg.loss.gan, pred_fake)}
    if cfg.loss.feat_weight > 0:
        losses["G_GAN_Feat"] = feature_matching_loss(pred_real, pred_fake, cfg.model.num_D, cfg.model.n_layers_D,
                                                     weight=cfg.loss.feat_weight)
    if cfg.loss.vgg_weight > 0:
        losses["G_VGG"] = vgg_loss(cfg, fake.device)(fake, b["image"]) * cfg.loss.vgg_weight
    losses["loss"] = sum(losses.values())
    return losses


def d_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    fake, pred_real = scratch.pop("fake"), scratch.pop("pred_real")  # both from G's phase
    with ctx.autocast():
        pred_fake = ctx.D(torch.cat([b["input"], fake], 1))
    l_real, l_fake = d_loss(ctx.cfg.loss.gan, pred_real, pred_fake)
    return {"loss": 0.5 * (l_real + l_fake), "D_real": l_real, "D_fake": l_fake}


_VGG: dict = {}


def vgg_loss(cfg: Config, device: torch.device):
    """The VGG19 loss, loaded once per process from ``loss.vgg_weights`` (a local file)."""
    key = (cfg.loss.vgg_weights, str(device))
    if key not in _VGG:
        from ..losses.perceptual import VGGLoss

        if not cfg.loss.vgg_weights:
            raise FileNotFoundError("loss.vgg_weight > 0 needs loss.vgg_weights=PATH to a local torchvision VGG19 "
                                    "state dict (see pipeline/losses/perceptual.py for how to make one), or "
                                    "turn the loss off with loss.vgg_weight=0")
        _VGG[key] = VGGLoss(cfg.loss.vgg_weights).to(device)
    return _VGG[key]


def fixed_params(G: nn.Module, cfg: Config, nimg: int) -> list[nn.Parameter]:
    """The global generator (and coarser enhancers) while ``train.fix_global_kimg`` lasts."""
    if cfg.model.generator != "local" or nimg >= cfg.train.fix_global_kimg * 1000:
        return []
    return list(G.net.global_parameters())


def init_from(G: nn.Module, state: dict) -> None:
    """Coarse-to-fine: a local-enhancer G starts from a global run's G (its global part);
    otherwise the state is loaded as it is."""
    if isinstance(G.net, LocalEnhancer) and any(k.startswith("net.model.") for k in state):
        G.net.load_global({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
        if G.encoder is not None:
            G.encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()
                                       if k.startswith("encoder.")})
        return
    G.load_state_dict(state)


@torch.no_grad()
def visualize(G, b: dict, info: DataInfo) -> list[torch.Tensor]:
    """Columns: label map (colourised) | output | target, [N, 3, H, W] in [-1, 1]."""
    from ..data.verify import palette

    out = G(b["input"], b["image"], b["instance"]).float()
    pal = torch.from_numpy(palette(max(256, info.num_classes))).to(out.device).float() / 127.5 - 1
    return [pal[b["label"]].permute(0, 3, 1, 2), out, b["image"].float()]


FAMILY = Family(
    name="pix2pixhd",
    build=build,
    phases=(Phase("G", "G", g_step), Phase("D", "D", d_step, fetch=False)),
    prepare=prepare,
    visualize=visualize,
    fields=fields,
    d_repeats=lambda cfg: 1,
    fixed_params=fixed_params,
    init_from=init_from,
)
