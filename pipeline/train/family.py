"""How a GAN family plugs into the loop: networks + phases (step functions returning named
losses) + batch preparation + what to show in image grids. No trainer classes, no hooks.

A phase's ``fn(ctx, batch, scratch)`` returns a dict of losses with the total under ``"loss"``;
the loop does backward, gradient sync, clipping, the optimizer step of ``phase.net``, EMA,
logging and checkpoints. ``scratch`` is per micro-batch and lets a later phase reuse a tensor
of an earlier one (pix2pix's G step reuses the fake that the D step made).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import Config


@dataclass(frozen=True)
class DataInfo:
    """What a family needs to know about the shards it trains on."""

    task: str
    num_classes: int | None
    fields: tuple[str, ...]


@dataclass
class StepContext:
    """What a step function may use. ``G``/``D`` may be DDP wrappers; ``G_plain``/``D_plain``
    are the modules inside, for forwards that must not touch DDP's gradient reducer (D while it
    is frozen in G's step)."""

    G: nn.Module
    D: nn.Module
    G_plain: nn.Module
    D_plain: nn.Module
    cfg: Config
    info: DataInfo
    nimg: int = 0
    reuse_fake: bool = True
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def instance_noise(self) -> float:
        """Instance-noise sigma now: linear decay from ``loss.instance_noise`` to 0."""
        sigma, span = self.cfg.loss.instance_noise, self.cfg.loss.instance_noise_kimg
        if sigma <= 0:
            return 0.0
        if span <= 0:
            return sigma
        return sigma * max(0.0, 1.0 - self.nimg / (span * 1000))


def one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``label`` [N, H, W] int64 -> float [N, num_classes, H, W], built in place on its device."""
    n, h, w = label.shape
    out = torch.zeros(n, num_classes, h, w, device=label.device)
    return out.scatter_(1, label.unsqueeze(1), 1.0)


StepFn = Callable[[StepContext, dict, dict], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Phase:
    name: str
    net: str  # "G" or "D": whose optimizer steps after this phase
    fn: StepFn
    fetch: bool = True  # draw new micro-batches; False reuses the previous phase's (and its scratch)
    every: int = 1  # lazy interval in iterations (regularization phases)
    after_step: Callable[[nn.Module, Config], None] | None = None  # e.g. WGAN weight clipping


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[Config, DataInfo], dict[str, nn.Module]]
    phases: tuple[Phase, ...]
    prepare: Callable[[dict, torch.device, Config, DataInfo], dict]
    visualize: Callable[[nn.Module, dict, DataInfo], list[torch.Tensor]]
    fields: Callable[[DataInfo], tuple[str, ...]]
    d_repeats: Callable[[Config], int] = field(default=lambda cfg: cfg.optim.n_critic)
    # Parameters of G that must not change yet (pix2pixHD's global generator during
    # fix_global_kimg): their gradients are dropped before G's step, so Adam leaves them, and
    # their optimizer state, untouched. Freezing by requires_grad would break DDP's reducer.
    fixed_params: Callable[[nn.Module, Config, int], list[nn.Parameter]] | None = None
    # Load ``model.init_from`` (a checkpoint or snapshot URL's G.pt state) into a fresh G.
    init_from: Callable[[nn.Module, dict], None] | None = None

    def generate(self, G: nn.Module, batch: dict, info: DataInfo) -> torch.Tensor:
        """G's output for a prepared batch, [N, 3, H, W] in [-1, 1]: the grid's output column
        (``visualize`` puts the output second to last and the real image last)."""
        return self.visualize(G, batch, info)[-2]


def get_family(name: str) -> Family:
    from . import steps_dcgan, steps_pix2pix, steps_pix2pixhd

    families = {"pix2pix": steps_pix2pix.FAMILY, "pix2pixhd": steps_pix2pixhd.FAMILY, "dcgan": steps_dcgan.FAMILY}
    if name not in families:
        raise KeyError(f"unknown model.family {name!r}; choose one of: {', '.join(families)}")
    return families[name]
