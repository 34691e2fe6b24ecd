"""pix2pixHD training iteration: the training loop's own iteration against an official-style one.

What runs. One fixed config, the official global-generator defaults at a CPU-sized scale:
label_nc 35 + instance edges (G input 36 channels, D input 39), 256x128, ngf 32, ndf 32,
n_downsample_global 4, n_blocks_global 9, instance norm, num_D 2, n_layers_D 3, LSGAN, feature
matching (lambda_feat 10), no VGG, batch 1, Adam(2e-4, 0.5, 0.999). Every variant trains the same
networks (built by ``families.pix2pixhd.build`` from the same seed) on the same batch: a fixed
random label map (piecewise-constant classes plus a few Cityscapes-style "thing" instances with
ids ``class * 1000 + k``), its instance map, and a random uint8 target image, all as the loader
hands them over (both sides convert the image to [-1, 1] with the loader's ``float_image``).

- ``ours fp32``: one iteration of the training loop's own code, ``loop.run_iteration``, over the
  pix2pixhd family's ``phases(cfg)`` (G, then D on the same batch and G's fake) and its
  ``optimizers(cfg)`` made into ``dist.DDPEngine`` engines as ``loop.train`` makes them (world
  size 1, so no DDP wrapper; Adam per ``optim.adam``; the loop's lr line before each iteration).
  The fetch is the family's ``prepare`` (one-hot + edges), ``agree`` the loop's any-rank
  reduction, the monitor a real ``stats.Monitor`` that writes nothing. So: freezing, backward,
  the engines' check (grad norm, ``isfinite``), agreement, Adam, ``zero_grad``, ``monitor.add``.
  Not included: EMA (the official code has none; the shipped cityscapes config turns it off),
  ``monitor.step``, checkpoints, data loading. For the breakdown the benchmark wraps the phase
  functions and the engines to stamp sections; what ``run_iteration`` does between them is the
  ``loop: requires_grad_, monitor.add`` section.
- ``ours bf16``: the same under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (the losses
  reduce in fp32, as the code does).
- ``official-style fp32``: one iteration of NVIDIA/pix2pixHD ``train.py`` + ``Pix2PixHDModel.
  forward`` restated here over the same network classes: ``encode_input`` (scatter one-hot, byte
  edge map), ``fake = G(input)``; ``D(cat(input, fake.detach()))`` -> ``D_fake``; ``D(cat(input,
  real))`` -> ``D_real``; ``D(cat(input, fake))`` with D *not* frozen -> ``G_GAN``; feature matching
  against the detached real features; ``optimizer_G.zero_grad(); loss_G.backward();
  optimizer_G.step(); optimizer_D.zero_grad(); ((D_fake + D_real) * 0.5).backward();
  optimizer_D.step()``. So D's weight gradients are computed in G's backward and thrown away,
  D runs three separate batch-1 forwards, and the optimizers are what the official code gets from
  today's torch: ``zero_grad()`` sets gradients to None and Adam on CPU tensors is the
  per-parameter loop. ``pool_size`` is 0 (the official default), so the fake pool returns its input.
- ``official-code`` (with ``--official-code PATH``): the NVIDIA/pix2pixHD code itself, imported
  from a checkout outside this repository: its option parser, ``create_model`` and
  ``Pix2PixHDModel.forward``, and the lines of its ``train.py`` iteration, on CPU, with our
  initial weights. It checks the restatement: relative to ``ours``, the two should land within
  +-5% of each other, and the report says whether they do; ratios are then taken against it.
- What-ifs (``--variants``): Adam as a per-parameter loop or fused; ``train.compile``;
  ``train.channels_last``. ``ours-bf16`` runs by default only where the CPU computes bf16
  natively (the same test as ``precision=auto``); elsewhere torch emulates bf16 and it is slow.

How it is measured. Each variant runs in its own fresh child process (this file with
``--child``), so peak RSS (``ru_maxrss``, startup included) belongs to that variant alone;
``torch.set_num_threads(1)`` and ``OMP_NUM_THREADS=1``. Per iteration, ``time.process_time()``
(process CPU time) and wall time; section boundaries inside the iteration are stamped too (a
``process_time`` call each) for the breakdown table. ``--rounds`` rounds (order rotated so drifting
load hits every variant alike), each child doing ``--warmup`` warm-up then ``--measure / rounds``
measured iterations; medians pool all rounds (default: 2 x (3 + 5), i.e. the median of 10
measured iterations, each after 3 warm-ups). Ratios use medians measured in this run; issue #23's
side-by-side figures from another machine are printed apart as external numbers.

Numerics. A separate child builds the networks once, copies them, and runs one iteration of
``ours fp32`` (each engine wrapper hands its gradients over just before the step) and one of
``official-style`` from the identical state and batch. Both compute G's and D's losses against
the pre-update networks with the same batch-1 D calls, so losses and gradients should agree
exactly and updated weights to float rounding (the Adam implementations differ). It reports
loss, gradient and weight differences after one iteration, apart for conv biases that feed an
instance norm: the norm cancels them, so their exact gradient is 0 and what autograd returns is
rounding noise, which Adam's first step (``lr * g / (|g| + eps)``) turns into steps of up to
``lr``, whichever code computes them.

    .venv/bin/python bench/pix2pixhd_step.py                  # 2 rounds, median of 10, ~2-3 min
    .venv/bin/python bench/pix2pixhd_step.py --size 512x256 --official-code ../pix2pixHD
    .venv/bin/python bench/pix2pixhd_step.py --quick          # 1 round, 2 warm-up + 3 measured
    .venv/bin/python bench/pix2pixhd_step.py --profile ours   # torch.profiler op table of one variant
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runnable from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from loop_iteration import Stamper  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.data.device import float_image  # noqa: E402
from pipeline.train.loop import adam_kwargs, native_bf16  # noqa: E402

RESULT_TAG = "RESULT "
TARGET_TIME_RATIO = 0.85  # ours fp32 / official-style fp32
# Issue #23: (official code, ours fp32) CPU s/iter side by side, per (W, H), on its machine.
EXTERNAL = {(256, 128): (1.105, 1.053), (512, 256): (3.494, 3.533)}
H, W, LABEL_NC, SEED = 128, 256, 35, 0  # --size sets W and H


@dataclass(frozen=True)
class Variant:
    label: str
    kind: str  # "ours" or "official"
    precision: str = "fp32"
    adam: str = "config"  # ours: "config" (optim.adam as configured), "single" (foreach=False), "fused"
    compile: bool = False  # ours: train.compile (torch.compile of G and D, inductor)
    channels_last: bool = False  # ours: train.channels_last (networks and inputs)
    default: bool = True  # part of the default comparison; extras are what-ifs, opt-in via --variants


VARIANTS = {
    "ours": Variant("OURS fp32", "ours"),
    "ours-bf16": Variant("OURS bf16", "ours", "bf16"),
    "official": Variant("OFFICIAL-STYLE fp32", "official"),
    # The NVIDIA/pix2pixHD code itself, from a checkout given by --official-code (never vendored).
    "official-code": Variant("OFFICIAL CODE fp32", "official-code", default=False),
    # What-ifs: Adam without foreach (optim.adam=for-loop) and fused (optim.adam=fused, the
    # default since this benchmark showed foreach's full-size temporaries on CPU).
    "ours-adam-single": Variant("OURS fp32 Adam single", "ours", adam="single", default=False),
    "ours-adam-fused": Variant("OURS fp32 Adam fused", "ours", adam="fused", default=False),
    "ours-compile": Variant("OURS fp32 compiled", "ours", compile=True, default=False),
    "ours-cl": Variant("OURS fp32 channels_last", "ours", channels_last=True, default=False),
    "ours-bf16-cl": Variant("OURS bf16 channels_last", "ours", "bf16", channels_last=True, default=False),
    "ours-bf16-compile": Variant("OURS bf16 compiled", "ours", "bf16", compile=True, default=False),
}
OVERRIDES = [
    "model.family=pix2pixhd", "model.generator=global", "model.ngf=32", "model.ndf=32",
    "model.n_downsample_global=4", "model.n_blocks_global=9", "model.norm=instance", "model.norm_D=instance",
    "model.num_D=2", "model.n_layers_D=3", "model.use_instance=true", "model.use_features=false",
    "model.gan=lsgan", "model.feat_weight=10", "model.vgg_weight=0",
    "model.lr_G=2e-4", "model.lr_D=2e-4", "model.beta1=0.5", "model.beta2=0.999", "optim.grad_clip=0",
    "train.batch_size=1", "train.precision=fp32", "train.channels_last=false",
]
Stamp = Callable[[str], None]


# ============================================================================= shared setup


def make_config():
    from pipeline.config import load_config
    from pipeline.train.family import DataInfo

    cfg = load_config(None, OVERRIDES)
    return cfg, DataInfo("label2image", LABEL_NC, ("image", "label", "instance"))


def make_batch(seed: int = SEED) -> dict:
    """A collated batch as the stream delivers it: ``label`` uint8 [1, H, W] (35 classes),
    ``instance`` uint16 [1, H, W] (from 16-bit PNGs), ``image`` uint8 [1, 3, H, W]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, LABEL_NC, (1, 1, H // 32, W // 32), generator=g).float()
    label = F.interpolate(coarse, size=(H, W), mode="nearest").to(torch.uint8)[:, 0]
    instance = label.clone().int()  # stuff classes: instance id = class id
    f = W // 256  # the instances are placed for 256x128 and scaled with the size
    for k, (cls, y, x, h, w) in enumerate([(26, 70, 20, 30, 60), (26, 75, 60, 28, 50), (24, 40, 150, 60, 18),
                                           (24, 45, 165, 55, 16), (33, 90, 200, 25, 30)]):
        y, x, h, w = y * f, x * f, h * f, w * f
        label[:, y:y + h, x:x + w] = cls
        instance[:, y:y + h, x:x + w] = cls * 1000 + k
    image = torch.randint(0, 256, (1, 3, H, W), generator=g, dtype=torch.uint8)
    return {"label": label, "instance": instance.to(torch.uint16), "image": image}


def build_nets(cfg, info, seed: int = SEED) -> tuple[nn.Module, nn.Module]:
    from pipeline.families import pix2pixhd

    torch.manual_seed(seed)
    nets = pix2pixhd.build(cfg, info)
    return nets["G"], nets["D"]


# ============================================================================= OURS: the loop's iteration


class StampedEngine:
    """A ``dist.DDPEngine`` as the loop drives it, stamping a section after its backward and after
    its check + step; in the numerics child it hands the gradients over just before the step."""

    def __init__(self, engine, runner: Ours):
        self.engine, self.runner = engine, runner
        self.name, self.modules = engine.name, engine.modules

    @property
    def param_groups(self) -> list[dict]:
        return self.engine.param_groups

    def sync_context(self, sync: bool):
        return self.engine.sync_context(sync)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.runner.stamp(f"{self.name}: backward")

    def check(self, nimg: int) -> bool:
        return self.engine.check(nimg)

    def step(self, skip: bool) -> torch.Tensor:
        if skip:
            raise RuntimeError(f"non-finite {self.name} step in the benchmark")
        if self.runner.capture is not None:
            self.runner.capture[self.name] = {n: p.grad.detach().clone() for m in self.modules.values()
                                              for n, p in m.named_parameters()}
        norm = self.engine.step(skip)
        self.runner.stamp(f"{self.name}: norm, checks, agree, Adam, zero_grad")
        return norm


class LossTap:
    """The monitor as ``run_iteration`` sees it, also keeping the losses (numerics child only)."""

    def __init__(self, monitor, losses: dict):
        self.monitor, self.losses = monitor, losses

    def add(self, phase: str, outs: list[dict], grad_norm: torch.Tensor, skipped: bool) -> None:
        self.monitor.add(phase, outs, grad_norm, skipped)
        self.losses.update({k: v.detach() for k, v in outs[-1].items() if k != "loss"})


GLUE = "loop: requires_grad_, monitor.add"


class Ours:
    """The pix2pixhd family driven by the loop's own ``run_iteration`` (world size 1, no DDP)."""

    def __init__(self, cfg, info, G: nn.Module, D: nn.Module, precision: str, adam: str = "config",
                 compile: bool = False, channels_last: bool = False):
        from pipeline import dist
        from pipeline.families import get_family
        from pipeline.train.family import StepContext
        from pipeline.train.stats import Monitor

        self.cfg, self.info = cfg, info
        self.family = get_family("pix2pixhd")
        self.stamp: Stamp = lambda name: None
        self.capture: dict | None = None
        nets = {"G": G, "D": D}
        if channels_last:  # as loop.train: the modules here, the inputs in the family's prepare
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, channels_last=True))
            self.cfg = cfg
            for m in nets.values():
                m.to(memory_format=torch.channels_last)
        kw = adam_kwargs(cfg.optim.adam) if adam == "config" else {"single": {"foreach": False},
                                                                    "fused": {"fused": True}}[adam]
        self.engines = {}
        for spec in self.family.optimizers(cfg):  # as loop.train (through dist.make_engine) makes them
            modules = {name: nets[name] for name in spec.nets}
            optimizer = torch.optim.Adam(spec.param_groups(modules), lr=spec.lr, betas=spec.betas, **kw)
            engine = dist.DDPEngine(spec.name, modules, optimizer, None, cfg.optim.grad_clip)
            for group in engine.param_groups:
                group.setdefault("initial_lr", group["lr"])
            self.engines[spec.name] = StampedEngine(engine, self)
        self.phases = tuple(dataclasses.replace(p, fn=self.stamped(p)) for p in self.family.phases(cfg))
        self.stream = self.family.streams(cfg, info, cfg.data.split)[0].name
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" \
            else contextlib.nullcontext
        wrapped = {k: torch.compile(m) for k, m in nets.items()} if compile else nets  # as loop.train
        self.ctx = StepContext(nets=wrapped, plain=nets, cfg=cfg, info=info, mean_over_ranks=dist.mean_over_ranks,
                               reuse_fake=True, autocast=autocast)
        self.monitor = Monitor(cfg, cfg.run.dir, self.family, info, torch.device("cpu"), enabled=False)
        self.agree = lambda ok: not dist.any_rank([not ok, False, False], "cpu")[0]  # the loop's agree

    def stamped(self, phase):
        """``phase.fn``, stamping the loop's work before it, then its own forward + losses."""

        def fn(ctx, b, scratch):
            self.stamp(GLUE)
            out = phase.fn(ctx, b, scratch)
            self.stamp(f"{phase.name}: forward + losses")
            return out

        return fn

    def iteration(self, raw: dict, stamp: Stamp, capture: dict | None = None) -> dict:
        from pipeline.train.loop import lr_factor, run_iteration

        self.stamp, self.capture, cpu = stamp, capture, torch.device("cpu")
        for engine in self.engines.values():
            for group in engine.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(self.cfg, self.ctx.nimg)

        def fetch() -> dict:
            b = self.family.prepare({self.stream: raw}, cpu, self.cfg, self.info)
            stamp("prepare (one-hot, edges)")
            return b

        losses: dict = {}
        monitor = self.monitor if capture is None else LossTap(self.monitor, losses)
        run_iteration(self.phases, self.ctx, self.engines, fetch, 1, self.agree, monitor)
        stamp(GLUE)
        self.ctx.step += 1
        self.ctx.nimg += self.cfg.train.batch_size
        return losses


# ============================================================================= OFFICIAL-STYLE: one train.py iteration


class OfficialStyle:
    """One iteration of the official code, restated over our network classes (see the docstring)."""

    def __init__(self, cfg, G: nn.Module, D: nn.Module):
        self.G, self.D = G, D
        self.label_nc, self.num_D, self.n_layers_D = LABEL_NC, cfg.model.num_D, cfg.model.n_layers_D
        self.lambda_feat = cfg.model.feat_weight
        # Official: Adam(params, lr=opt.lr, betas=(opt.beta1, 0.999)), torch's default implementation.
        self.optimizer_G = torch.optim.Adam(G.parameters(), lr=cfg.model.lr_G, betas=(cfg.model.beta1, 0.999))
        self.optimizer_D = torch.optim.Adam(D.parameters(), lr=cfg.model.lr_D, betas=(cfg.model.beta1, 0.999))
        self.targets: dict = {}

    def encode_input(self, label: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
        """One-hot by ``scatter_`` into zeros, then the byte edge map, concatenated."""
        n, _, h, w = label.shape
        one_hot = torch.zeros(n, self.label_nc, h, w).scatter_(1, label.long(), 1.0)
        edge = torch.zeros(inst.shape, dtype=torch.uint8)
        edge[:, :, :, 1:] = edge[:, :, :, 1:] | (inst[:, :, :, 1:] != inst[:, :, :, :-1])
        edge[:, :, :, :-1] = edge[:, :, :, :-1] | (inst[:, :, :, 1:] != inst[:, :, :, :-1])
        edge[:, :, 1:, :] = edge[:, :, 1:, :] | (inst[:, :, 1:, :] != inst[:, :, :-1, :])
        edge[:, :, :-1, :] = edge[:, :, :-1, :] | (inst[:, :, 1:, :] != inst[:, :, :-1, :])
        return torch.cat((one_hot, edge.float()), dim=1)

    def gan_loss(self, pred: list, target_is_real: bool) -> torch.Tensor:
        """Official ``GANLoss`` with ``use_lsgan``: ``MSELoss`` of each scale's logits against a
        (cached) constant target, summed over scales starting from the int 0."""
        loss = 0
        for scale in pred:
            logits = scale[-1]
            key = (target_is_real, logits.shape)
            if key not in self.targets:
                self.targets[key] = torch.full(logits.shape, 1.0 if target_is_real else 0.0)
            loss += F.mse_loss(logits, self.targets[key])
        return loss

    def forward(self, raw: dict) -> dict:
        input_label = self.encode_input(raw["label"].unsqueeze(1), raw["instance"].unsqueeze(1))
        real_image = float_image(raw["image"])  # the loader's conversion: both sides see the same floats
        fake_image = self.G(input_label)
        pred_fake_pool = self.D(torch.cat((input_label, fake_image.detach()), dim=1))  # pool_size 0
        loss_D_fake = self.gan_loss(pred_fake_pool, False)
        pred_real = self.D(torch.cat((input_label, real_image.detach()), dim=1))
        loss_D_real = self.gan_loss(pred_real, True)
        pred_fake = self.D(torch.cat((input_label, fake_image), dim=1))
        loss_G_GAN = self.gan_loss(pred_fake, True)
        loss_G_GAN_Feat = 0
        feat_weights, D_weights = 4.0 / (self.n_layers_D + 1), 1.0 / self.num_D
        for i in range(self.num_D):
            for j in range(len(pred_fake[i]) - 1):
                loss_G_GAN_Feat += D_weights * feat_weights * \
                    F.l1_loss(pred_fake[i][j], pred_real[i][j].detach()) * self.lambda_feat
        # train.py: losses = [torch.mean(x) ...] (per-GPU averaging), then the two totals.
        return {k: torch.mean(v) for k, v in (("G_GAN", loss_G_GAN), ("G_GAN_Feat", loss_G_GAN_Feat),
                                               ("D_real", loss_D_real), ("D_fake", loss_D_fake))}

    def iteration(self, raw: dict, stamp: Stamp, capture: dict | None = None) -> dict:
        stamp("prepare (one-hot, edges)")  # encode_input is inside forward; its cost lands there
        loss_dict = self.forward(raw)
        loss_D = (loss_dict["D_fake"] + loss_dict["D_real"]) * 0.5
        loss_G = loss_dict["G_GAN"] + loss_dict.get("G_GAN_Feat", 0) + loss_dict.get("G_VGG", 0)
        stamp("forward: G, 3 x D, losses")
        self.optimizer_G.zero_grad()
        loss_G.backward()
        stamp("G: zero_grad + backward (incl. D weight grads)")
        if capture is not None:
            capture["G"] = self.grads("G")
        self.optimizer_G.step()
        stamp("G: Adam")
        self.optimizer_D.zero_grad()
        loss_D.backward()
        stamp("D: zero_grad + backward")
        if capture is not None:
            capture["D"] = self.grads("D")
        self.optimizer_D.step()
        stamp("D: Adam")
        if capture is not None:
            self.numerics_done()
        return {k: v.detach() for k, v in loss_dict.items()}

    def grads(self, net: str) -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().clone() for n, p in getattr(self, net).named_parameters()}

    def numerics_done(self) -> None:
        """The numerics child reads the updated weights from the modules it passed in."""


class OfficialCode(OfficialStyle):
    """One iteration of NVIDIA/pix2pixHD itself: its ``Pix2PixHDModel`` built by its own
    ``create_model`` from its own option parser, and the loss/backward/step lines of its
    ``train.py``, on CPU. The checkout is imported from ``--official-code`` (outside this
    repository). Its CUDA-only calls (``.cuda()``, ``torch.cuda.FloatTensor``/``ByteTensor``) are
    redirected to CPU tensors; nothing else is changed. Its networks get our G and D weights
    (the parameter names are the official ones), so it trains the same state on the same batch.
    Its ``forward`` is the official model's; the backward and step lines it inherits are
    ``train.py``'s, which the restatement already follows."""

    def __init__(self, cfg, G: nn.Module, D: nn.Module, path: str):  # not the restatement's: its own model
        if not (Path(path) / "models" / "pix2pixHD_model.py").is_file():
            raise SystemExit(f"--official-code {path}: no models/pix2pixHD_model.py there; give a checkout "
                             f"of https://github.com/NVIDIA/pix2pixHD")
        sys.path.insert(0, str(Path(path).resolve()))
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.cuda.FloatTensor = lambda size: torch.empty(size)
        torch.cuda.ByteTensor = lambda size: torch.empty(size, dtype=torch.uint8)
        from models.models import create_model
        from options.train_options import TrainOptions

        options = TrainOptions()
        options.initialize()
        m = cfg.model
        opt = options.parser.parse_args([
            "--gpu_ids", "-1", "--label_nc", str(LABEL_NC), "--ngf", str(m.ngf), "--ndf", str(m.ndf),
            "--n_downsample_global", str(m.n_downsample_global), "--n_blocks_global", str(m.n_blocks_global),
            "--num_D", str(m.num_D), "--n_layers_D", str(m.n_layers_D), "--lambda_feat", str(m.feat_weight),
            "--no_vgg_loss", "--batchSize", "1", "--lr", str(m.lr_G), "--beta1", str(m.beta1)])
        opt.isTrain, opt.gpu_ids, opt.verbose = True, [], False
        with contextlib.redirect_stdout(io.StringIO()):  # it prints both networks
            self.model = create_model(opt)  # gpu_ids empty: no DataParallel, as the CPU path of train.py
        # Key maps: our G may wrap the official one as ``.net``; our D's ``scales.{i}.layers.{j}`` is
        # the official ``scale{num_D-1-i}_layer{j}`` (see MultiscaleDiscriminator).
        num_D = cfg.model.num_D
        self.names = {  # official name -> ours, per network
            "G": {k.removeprefix("net."): k for k in G.state_dict()},
            "D": {re.sub(r"^scales\.(\d+)\.layers\.(\d+)\.",
                         lambda m: f"scale{num_D - 1 - int(m[1])}_layer{m[2]}.", k): k for k in D.state_dict()}}
        self.ours = {"G": G, "D": D}
        for net, official in (("G", self.model.netG), ("D", self.model.netD)):
            state = self.ours[net].state_dict()
            official.load_state_dict({k: state[ours] for k, ours in self.names[net].items()})
        self.G, self.D = self.model.netG, self.model.netD
        self.optimizer_G, self.optimizer_D = self.model.optimizer_G, self.model.optimizer_D

    def forward(self, raw: dict) -> dict:
        # What its AlignedDataset hands over: the label map as floats, the instance map as its
        # integer ids, the image in [-1, 1], feat 0; then train.py's per-device mean of each loss.
        data = {"label": raw["label"].unsqueeze(1).float(), "inst": raw["instance"].unsqueeze(1).int(),
                "image": float_image(raw["image"]), "feat": 0}
        losses, _ = self.model(data["label"], data["inst"], data["image"], data["feat"], infer=False)
        losses = [torch.mean(x) if not isinstance(x, int) else x for x in losses]
        return dict(zip(self.model.loss_names, losses))

    def grads(self, net: str) -> dict[str, torch.Tensor]:
        return self.in_our_names(net, {n: p.grad for n, p in getattr(self, net).named_parameters()})

    def numerics_done(self) -> None:
        for net, official in (("G", self.G), ("D", self.D)):
            self.ours[net].load_state_dict(self.in_our_names(net, official.state_dict()))

    def in_our_names(self, net: str, tensors: dict) -> dict:
        return {self.names[net][k]: v.detach().clone() for k, v in tensors.items()}


OFFICIAL_CODE: str | None = None  # --official-code


def make_runner(key: str, cfg, info, G: nn.Module, D: nn.Module):
    v = VARIANTS[key]
    if v.kind == "official-code":
        return OfficialCode(cfg, G, D, OFFICIAL_CODE)
    if v.kind == "ours":
        return Ours(cfg, info, G, D, v.precision, v.adam, v.compile, v.channels_last)
    return OfficialStyle(cfg, G, D)


# ============================================================================= children


def child_measure(key: str, warmup: int, measure: int, profile: bool) -> dict:
    cfg, info = make_config()
    G, D = build_nets(cfg, info)
    runner = make_runner(key, cfg, info, G, D)
    raw = make_batch()
    stamper = Stamper()
    cpu, wall = [], []
    for _ in range(warmup):
        runner.iteration(raw, stamper)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(measure):
                runner.iteration(raw, lambda name: None)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=40)
        print(f"torch.profiler, {measure} iterations of {VARIANTS[key].label} (after {warmup} warm-up; its times "
              f"are wall clock, so other load on the machine inflates them):\n{table}")
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(measure):
        stamper.start()
        c0, w0 = time.process_time(), time.perf_counter()
        runner.iteration(raw, stamper)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        stamper.keep()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"key": key, "cpu": cpu, "wall": wall, "sections": stamper.sections,
            "sys_cpu_per_iter": (usage.ru_stime - usage0.ru_stime) / measure,
            "faults_per_iter": (usage.ru_minflt - usage0.ru_minflt) / measure,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "threads": torch.get_num_threads()}


def cancelled_biases(module: nn.Module, prefix: str) -> set[str]:
    """Names of conv biases directly followed by an affine-free InstanceNorm2d in a Sequential:
    the norm subtracts them again, so their true gradient is exactly 0."""
    names = set()
    for mod_name, mod in module.named_modules():
        if isinstance(mod, nn.Sequential):
            children = list(mod.named_children())
            for (n1, c1), (_, c2) in zip(children, children[1:]):
                if isinstance(c1, (nn.Conv2d, nn.ConvTranspose2d)) and c1.bias is not None \
                        and isinstance(c2, nn.InstanceNorm2d) and not c2.affine:
                    names.add(f"{prefix}{mod_name}.{n1}.bias".replace("..", "."))
    return names


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: set[str]) -> dict:
    """Max abs difference (and where) over all tensors, and over those not in ``skip``."""
    out = {}
    for label, names in (("all", list(a)), ("rest", [n for n in a if n not in skip]),
                         ("cancelled", [n for n in a if n in skip])):
        if not names:
            continue
        diffs = {n: float((a[n].float() - b[n].float()).abs().max()) for n in names}
        worst = max(diffs, key=diffs.get)
        scale = max(float(a[n].abs().max()) for n in names)
        out[label] = {"max": diffs[worst], "where": worst, "ref_max_abs": scale,
                      "bitwise_equal": sum(torch.equal(a[n], b[n]) for n in names), "count": len(names)}
    return out


def child_numerics(others: list[str]) -> dict:
    """One iteration of ``ours`` and of each of ``others`` from identical weights and batch."""
    cfg, info = make_config()
    G0, D0 = build_nets(cfg, info)
    raw = make_batch()
    skip = {"G": cancelled_biases(G0, ""), "D": cancelled_biases(D0, "")}
    runs = {}
    for key in ["ours", *others]:
        G, D = copy.deepcopy(G0), copy.deepcopy(D0)
        capture: dict = {}
        losses = make_runner(key, cfg, info, G, D).iteration(raw, lambda name: None, capture)
        runs[key] = {"losses": {k: float(v) for k, v in losses.items()}, "grads": capture,
                     "weights": {"G": {n: p.detach().clone() for n, p in G.named_parameters()},
                                 "D": {n: p.detach().clone() for n, p in D.named_parameters()}}}
    before = {"G": dict(G0.named_parameters()), "D": dict(D0.named_parameters())}
    result: dict = {"losses": {k: runs[k]["losses"] for k in runs}, "others": others,
                    "cancelled": {k: len(v) for k, v in skip.items()}}
    for other in others:
        for net in ("G", "D"):
            result[f"{other}/{net}/weights"] = compare(runs["ours"]["weights"][net], runs[other]["weights"][net],
                                                       skip[net])
            result[f"{other}/{net}/grads"] = compare(runs["ours"]["grads"][net], runs[other]["grads"][net], skip[net])
    ours_w = runs["ours"]["weights"]
    result["update_max"] = {net: max(float((ours_w[net][n] - p.detach()).abs().max()) for n, p in before[net].items())
                            for net in ("G", "D")}
    return result


# ============================================================================= the parent


def run_child(args_list: list[str]) -> dict:
    cmd = [sys.executable, __file__, *args_list, "--size", f"{W}x{H}",
           *(["--official-code", OFFICIAL_CODE] if OFFICIAL_CODE else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if r.returncode != 0 or not lines:
        sys.stderr.write(f"--- child {args_list} failed (exit {r.returncode})\n"
                         f"{r.stdout[-4000:]}\n{r.stderr[-6000:]}\n")
        raise SystemExit(1)
    other = [ln for ln in r.stdout.splitlines() if not ln.startswith(RESULT_TAG)]
    if other:
        print("\n".join(other))
    return json.loads(lines[-1][len(RESULT_TAG):])


def header(args, start_load) -> None:
    print("pix2pixHD training-iteration benchmark (bench/pix2pixhd_step.py)")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in start_load)}   cpus: {os.cpu_count()}")
    print(f"torch {torch.__version__}   python {platform.python_version()}   {platform.machine()}   "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}   native bf16: "
          f"{'yes' if native_bf16('cpu') else 'no (bf16 is emulated; precision=auto picks fp32)'}")
    print(f"config: label_nc {LABEL_NC} + edges (G in 36, D in 39), {W}x{H}, ngf 32, ndf 32, global G "
          f"(n_downsample 4, 9 blocks, instance norm), num_D 2, n_layers_D 3, LSGAN, FM 10, no VGG, batch 1, "
          f"Adam(2e-4, 0.5, 0.999)")
    per = math.ceil(args.measure / args.rounds)
    print(f"each variant in a fresh child process, torch.set_num_threads(1); {args.rounds} round(s) of "
          f"{args.warmup} warm-up + {per} measured iterations; process CPU time per iteration")


def pooled(rounds: list[dict], name: str) -> list[float]:
    return [v for r in rounds for v in r[name]]


def report(results: dict[str, list[dict]], numerics: dict | None) -> None:
    med = {k: statistics.median(pooled(r, "cpu")) for k, r in results.items()}
    rss = {k: max(x["peak_rss_gb"] for x in r) for k, r in results.items()}
    print(f"\n{'variant':<22} {'iters':>5} {'CPU s/iter':>10} {'min-max':>15} {'range':>6} {'rounds':>6} "
          f"{'wall s/iter':>11} {'sys s/it':>8} {'faults/it':>9} {'peak RSS GB':>11}")
    for key, rounds in results.items():
        cpu = pooled(rounds, "cpu")
        meds = [statistics.median(r["cpu"]) for r in rounds]
        rspread = (max(meds) - min(meds)) / statistics.median(meds)
        print(f"{VARIANTS[key].label:<22} {len(cpu):>5} {med[key]:>10.4f} {min(cpu):>7.4f}-{max(cpu):<7.4f} "
              f"{(max(cpu) - min(cpu)) / med[key]:>6.1%} {rspread:>6.1%} "
              f"{statistics.median(pooled(rounds, 'wall')):>11.4f} "
              f"{statistics.mean(r['sys_cpu_per_iter'] for r in rounds):>8.4f} "
              f"{statistics.mean(r['faults_per_iter'] for r in rounds):>9.0f} {rss[key]:>11.3f}")
    threads = sorted({r["threads"] for rounds in results.values() for r in rounds})
    print(f"(range = (max - min) / median over the pooled measured iterations; rounds = spread of per-round "
          f"medians; torch threads in the children: {threads})")

    print("\nwhere the time goes (median process CPU s per section):")
    for key, rounds in results.items():
        sections: dict[str, list[float]] = {}
        for r in rounds:
            for name, values in r["sections"].items():
                sections.setdefault(name, []).extend(values)
        parts = "  ".join(f"{name} {statistics.median(v):.4f}" for name, v in sections.items())
        print(f"  {VARIANTS[key].label:<20} {parts}")

    print("\nratios (same run):")
    # The reference: the official code itself when it ran (--official-code), else its restatement.
    ref = "official-code" if "official-code" in med else "official" if "official" in med else None
    if "ours" in med and ref:
        name = VARIANTS[ref].label
        ratio = med["ours"] / med[ref]
        verdict = "MET" if ratio <= TARGET_TIME_RATIO else "NOT MET"
        print(f"  OURS fp32 / {name}, CPU time   {ratio:6.3f}x   target <= {TARGET_TIME_RATIO}: {verdict}")
        mem = rss["ours"] / rss[ref]
        print(f"  OURS fp32 / {name}, peak RSS   {mem:6.3f}x   target <= 1: "
              f"{'MET' if mem <= 1 else 'NOT MET'}  ({rss['ours']:.3f} vs {rss[ref]:.3f} GB)")
    if "ours" in med and "official" in med and "official-code" in med:
        style, real = med["official"] / med["ours"], med["official-code"] / med["ours"]
        print(f"  baseline check: OFFICIAL-STYLE at {style:.3f}x OURS, OFFICIAL CODE at {real:.3f}x OURS: "
              f"{style / real - 1:+.1%} ({'within' if abs(style / real - 1) <= 0.05 else 'OUTSIDE'} +-5%)")
    for key in med:
        if not VARIANTS[key].default and key != ref and ref:
            print(f"  what-if {VARIANTS[key].label} / {VARIANTS[ref].label}: CPU {med[key] / med[ref]:6.3f}x, "
                  f"peak RSS {rss[key] / rss[ref]:6.3f}x")
    if "ours-bf16" in med and "ours" in med:
        print(f"  OURS bf16 / OURS fp32, CPU time             {med['ours-bf16'] / med['ours']:6.3f}x")
        print(f"  OURS bf16 / OURS fp32, peak RSS             {rss['ours-bf16'] / rss['ours']:6.3f}x")
    external = EXTERNAL.get((W, H))
    if external and "ours" in med and ref:
        official, ours = external
        print(f"\nagainst the issue's EXTERNAL figures at {W}x{H} (official pix2pixHD {official} s, ours {ours} s "
              f"CPU/iter on a CPU with native bf16; not measured here): official / ours there {official / ours:.3f}x, "
              f"{VARIANTS[ref].label} / OURS here {med[ref] / med['ours']:.3f}x")
    if numerics:
        report_numerics(numerics)


def report_numerics(n: dict) -> None:
    print("\nnumerics: one iteration from identical weights and batch (fresh child process)")
    names = list(n["losses"]["ours"])
    print(f"  {'losses':<22}" + "".join(f"{k:>16}" for k in names))
    for key, losses in n["losses"].items():
        print(f"  {VARIANTS[key].label:<22}" + "".join(f"{losses[k]:>16.9g}" for k in names))
    print(f"  largest weight change of the update itself (ours fp32): G {n['update_max']['G']:.3g}, "
          f"D {n['update_max']['D']:.3g} (Adam's first step ~ lr = 2e-4)")
    print(f"  conv biases cancelled by a following instance norm: G {n['cancelled']['G']}, D {n['cancelled']['D']}")
    print("  (expected: losses and gradients identical to the official code's, since both run the same "
          "batch-1 D calls and loss terms; weights within rounding, since ours steps with optim.adam and the "
          "official code with torch's default Adam, and Adam's first step lr * g / (|g| + 1e-8) turns "
          "rounding into up to ~lr where |g| is near 1e-8 or is pure noise, as for the cancelled biases)")
    for other in n["others"]:
        print(f"  OURS fp32 vs {VARIANTS[other].label}:")
        for net in ("G", "D"):
            for what in ("grads", "weights"):
                for group, label in (("rest", "other params"), ("cancelled", "cancelled biases")):
                    c = n[f"{other}/{net}/{what}"].get(group)
                    if c:
                        print(f"    {net} {what:<7} {label:<16} max |diff| {c['max']:.3g} at {c['where']:<28} "
                              f"(max |value| {c['ref_max_abs']:.3g}; {c['bitwise_equal']}/{c['count']} "
                              f"tensors bitwise equal)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="every variant runs once per round, order rotated")
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations per child")
    p.add_argument("--measure", type=int, default=10, help="measured iterations over all rounds")
    p.add_argument("--quick", action="store_true", help="1 round, 2 warm-up + 3 measured")
    p.add_argument("--variants", help="comma-separated, from: " + ", ".join(VARIANTS) + " (default: the first "
                   "three; ours-bf16 only where the CPU computes bf16 natively, as precision=auto decides)")
    p.add_argument("--no-numerics", action="store_true", help="skip the one-iteration numerics check")
    p.add_argument("--profile", choices=list(VARIANTS), help="print a torch.profiler op table for one variant "
                   "(--measure iterations after --warmup) instead of the comparison")
    p.add_argument("--size", default="256x128", help="WxH of the batch (the issue's: 256x128, 512x256)")
    p.add_argument("--official-code", metavar="PATH", help="a checkout of NVIDIA/pix2pixHD: adds the variant "
                   "'official-code', its own model and train.py iteration, to the comparison")
    p.add_argument("--child", choices=[*VARIANTS, "numerics"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.measure = 1, 2, 3
    if args.variants is None:
        args.variants = ",".join(k for k, v in VARIANTS.items()
                                 if v.default and (v.precision != "bf16" or native_bf16("cpu")))
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        args.size = tuple(int(v) for v in args.size.lower().split("x"))
        assert len(args.size) == 2 and all(v % 256 == 0 for v in args.size[:1]) and args.size[0] == 2 * args.size[1]
    except (ValueError, AssertionError):
        p.error(f"--size {args.size}: give WxH with W a multiple of 256 and W = 2H, e.g. 512x256")
    if args.official_code and "official-code" not in args.variants:
        args.variants.append("official-code")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv=None) -> int:
    global OFFICIAL_CODE, W, H
    args = parse_args(argv)
    OFFICIAL_CODE = args.official_code
    W, H = args.size
    if args.child:
        torch.set_num_threads(1)
        if args.child == "numerics":
            result = child_numerics(sorted((v for v in args.variants if v != "ours"), key=lambda v: v != "official"))
        else:
            result = child_measure(args.child, args.warmup, args.measure, args.profile is not None)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    start_load = os.getloadavg()  # before this benchmark adds its own busy core
    start = time.perf_counter()
    if args.profile:
        run_child(["--child", args.profile, "--warmup", str(args.warmup), "--measure", str(args.measure),
                   "--profile", args.profile])
        return 0
    header(args, start_load)
    per = math.ceil(args.measure / args.rounds)
    results: dict[str, list[dict]] = {k: [] for k in args.variants}
    for r in range(args.rounds):
        k = r % len(args.variants)
        for key in args.variants[k:] + args.variants[:k]:
            t0 = time.perf_counter()
            results[key].append(run_child(["--child", key, "--warmup", str(args.warmup), "--measure", str(per)]))
            print(f"  round {r + 1}: {VARIANTS[key].label:<22} {time.perf_counter() - t0:5.1f} s wall", flush=True)
    others = sorted((v for v in args.variants if v != "ours"), key=lambda v: v != "official")
    numerics = None if args.no_numerics or not others else \
        run_child(["--child", "numerics", "--variants", ",".join(args.variants)])
    report(results, numerics)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
