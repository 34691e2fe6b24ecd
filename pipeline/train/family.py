"""The family contract: what a GAN family declares, and what the loop, the checkpoint module and
the evaluator do with it. Types only; the families live in ``pipeline/families/``.

A family names its networks (any names; ``build`` may leave one out when a config turns it off),
which have an EMA copy and which are snapshotted; the
optimizers that step them (each with its own parameter groups); its phases (step functions that
return named losses), built from the config so that intervals and repeats are config; the data
streams it reads; its per-rank state; how it prepares a batch, generates for evaluation, and
shows an image grid. The loop does backward, gradient sync, the non-finite guard, clipping,
optimizer steps, EMA, logging and checkpoints; a step function never does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import Config


@dataclass(frozen=True)
class DataInfo:
    """What a family needs to know about the shards it trains on. ``palette``: the dataset's own
    colour of each class id (``(r, g, b)`` tuples) for image grids, where its source has one."""

    task: str
    num_classes: int | None
    fields: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...] | None = None

    @classmethod
    def of(cls, manifest) -> DataInfo:
        """The shards' description from their ``Manifest``."""
        own = manifest.palette
        return cls(manifest.task, manifest.num_classes, tuple(manifest.fields),
                   tuple(map(tuple, own.tolist())) if own is not None else None)


@dataclass(frozen=True)
class Network:
    """A trained network. ``ema``: an exponential moving average ``<name>_ema`` is kept when
    ``model.ema_kimg > 0``; ``snapshot``: saved (its EMA copy in its place when there is one) in
    every snapshot, for evaluation, image grids and inference. ``sync_batchnorm``: its batch
    norms use statistics over all ranks' samples (``nn.SyncBatchNorm``, CUDA only: on CPU each
    rank normalises its own samples)."""

    name: str
    ema: bool = False
    snapshot: bool = False
    sync_batchnorm: bool = False


@dataclass(frozen=True)
class Optimizer:
    """An Adam that steps the parameters of ``nets``. ``groups`` gives its parameter groups,
    each a dict with ``params`` and, where they differ from the optimizer's, ``lr`` and ``betas``
    (StyleGAN2's lazy regularisation, lr multipliers); a group with ``fixed_until_nimg`` keeps
    its parameters (and their Adam state) unchanged until that many images were seen
    (pix2pixHD's fixed global generator). Without ``groups``: one group of all of ``nets``."""

    name: str
    nets: tuple[str, ...]
    lr: float
    betas: tuple[float, float]
    groups: Callable[[dict[str, nn.Module]], list[dict]] | None = None

    def param_groups(self, nets: dict[str, nn.Module]) -> list[dict]:
        if self.groups is not None:
            return self.groups(nets)
        return [{"params": [p for name in self.nets for p in nets[name].parameters()]}]


StepFn = Callable[["StepContext", dict, dict], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Phase:
    """One optimizer step (or several, ``repeats``) per iteration, every ``every`` iterations.

    ``fn(ctx, batch, scratch)`` returns its losses by name, the total under ``"loss"`` (logged
    as ``Loss/<name>``; a name under ``Progress/`` is logged as it is: ADA's p). The
    networks of the optimizers in ``steps``, and those in ``trainable``, are trainable during the
    phase; every other network is frozen (``requires_grad_(False)``), so no gradient reaches it
    (D in G's phase). ``trainable`` is for a forward whose graph a later phase uses: pix2pix's D
    phase runs G and leaves the fake, with its graph, for G's phase. ``fetch=False``
    reuses the previous phase's micro-batches and their ``scratch`` dicts (a fake made there);
    ``after_step(nets, cfg)`` follows a successful step (WGAN weight clipping)."""

    name: str
    steps: tuple[str, ...]
    fn: StepFn
    fetch: bool = True
    every: int = 1
    repeats: int = 1
    trainable: tuple[str, ...] = ()
    after_step: Callable[[dict[str, nn.Module], Config], None] | None = None


@dataclass(frozen=True)
class Stream:
    """A stream of samples from one split: ``prepare`` receives its batch under ``name``.
    Training streams are drawn independently, each resuming from its own position."""

    name: str
    split: str
    fields: tuple[str, ...]


@dataclass(frozen=True)
class Evaluation:
    """What the evaluator scores: the outputs of ``generate(nets, prepared batch)`` ([N, 3, H, W]
    in [-1, 1]) against the real images of the ``reference`` split (FID/KID). With ``inputs`` the
    outputs translate that stream's samples (exactly once over all evaluators); without, they are
    generated from ``eval.num_samples`` fixed latents (``prepare`` receives ``{"z": [N, z_dim]}``).
    ``paired``: the prepared batch's ``image`` is the ground truth of each output (PSNR, SSIM,
    LPIPS). ``name`` suffixes the metric names when a family has several (``fid_AtoB``).
    ``per_image(nets, batch, output, lpips)`` adds the family's own per-image metrics,
    ``{name: [N]}`` averaged over the samples like the paired ones (SRGAN's Y-channel PSNR,
    BicycleGAN's diversity); ``lpips`` is the evaluator's LPIPS network, or None without its
    weights. ``classes``: a class-conditional model of that many classes; fixed latent ``i`` gets
    class ``i mod classes`` (``y`` [N] beside ``z``), and the evaluator adds the intra-FID: the FID
    of each class against the reference images of that class (their ``class`` field), averaged."""

    name: str
    reference: str
    generate: Callable[[dict[str, nn.Module], dict], torch.Tensor]
    inputs: Stream | None = None
    paired: bool = False
    per_image: Callable[[dict[str, nn.Module], dict, torch.Tensor, Any], dict[str, torch.Tensor]] | None = None
    classes: int = 0


@dataclass
class StepContext:
    """What a step function may use; one per run, its counters updated by the loop.

    ``nets[name]`` may be a DDP wrapper (or a DeepSpeed engine): a network being trained must
    run through it at least once in its phase's backward. ``plain[name]`` is the module inside:
    for frozen networks (D in G's phase), whose forwards must not touch DDP's reducer.
    ``state`` is per rank, outlives iterations and is checkpointed per rank (image pools, path
    length means); ``mean_over_ranks`` averages a tensor over ranks (every rank must call it)."""

    nets: dict[str, nn.Module]
    plain: dict[str, nn.Module]
    cfg: Config
    info: DataInfo
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    nimg: int = 0
    step: int = 0
    reuse_fake: bool = True  # no gradient accumulation: a D phase may keep G's graph for G's phase
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass(frozen=True)
class Family:
    """A GAN family: declarations (see the module docstring and ``docs/families.md``)."""

    name: str
    config: type  # its ``model`` section: a ``config.ModelConfig`` subclass, paper defaults
    build: Callable[[Config, DataInfo], dict[str, nn.Module]]
    networks: tuple[Network, ...]
    optimizers: Callable[[Config], tuple[Optimizer, ...]]
    phases: Callable[[Config], tuple[Phase, ...]]
    streams: Callable[[Config, DataInfo, str], tuple[Stream, ...]]  # for a split: data.split, val_split
    prepare: Callable[[dict[str, dict], torch.device, Config, DataInfo], dict]
    evaluations: Callable[[Config, DataInfo, str], tuple[Evaluation, ...]]  # for a split: data.val_split
    visualize: Callable[[dict[str, nn.Module], dict, DataInfo], list[torch.Tensor]]
    # Load ``model.init_from``: ``load(name)`` is that network's saved state dict, or None.
    init_from: Callable[[dict[str, nn.Module], Callable[[str], dict | None]], None] | None = None
    # ``init_source(url, storage_options)``: ``load`` for a ``model.init_from`` URL in another
    # project's format that this family reads (StyleGAN2's official pickles), else None.
    init_source: Callable[[str, dict | None], Callable[[str], dict | None] | None] | None = None
    # ``optimizer_epoch(cfg, nimg)``: any value; whenever it differs from the previous iteration's,
    # every optimizer's state starts afresh (ProGAN's reset at each change of resolution). DDP only.
    optimizer_epoch: Callable[[Config, int], Any] | None = None

    def network(self, name: str) -> Network:
        return next(n for n in self.networks if n.name == name)

    def snapshotted(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.networks if n.snapshot)


def default_init_from(nets: dict[str, nn.Module], load: Callable[[str], dict | None]) -> None:
    """Each network whose state the source holds starts from it, as saved."""
    for name, net in nets.items():
        state = load(name)
        if state is not None:
            net.load_state_dict(state)


def describe(value: Any) -> str:
    """A network's class name and parameter count, for dry runs and logs."""
    n = sum(p.numel() for p in value.parameters())
    return f"{type(value).__name__}, {n:,} parameters ({n / 1e6:.3f}M)"
