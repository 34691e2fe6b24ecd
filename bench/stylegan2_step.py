"""StyleGAN2(-ADA) training iteration: the training loop's own phases against the official code.

The config (issue #19): 64x64, z = w = 512, 2 mapping layers, channel_base 8192, channel_max 512,
conv_clamp 256, resnet D with minibatch-stddev groups of 4, batch 8, fp32, no augmentation; lazy
regularisation as config F: Gmain, Greg (path length, weight 2, every 4), Dmain, Dreg (R1, gamma
0.0002 * 64² / 8 = 0.1024 as the official ``--cfg=auto``, every 16); style mixing 0.9; Adam
(0.0025, betas 0 / 0.99, corrected for the intervals); G EMA (2.5 kimg, ramp-up 0.05).

- ``official fp32``: NVlabs/stylegan2-ada-pytorch, imported at run time from ``--official`` (an
  unpacked copy kept outside this repository; default ``$SG2_OFFICIAL`` or /work/sg2-official).
  The networks (``training.networks.Generator``/``Discriminator``) and the loss
  (``training.loss.StyleGAN2Loss``) are built through ``dnnlib.util.construct_class_by_name`` with
  the kwargs its ``train.py`` gives them (``num_fp16_res`` 0: its fp16 runs on CUDA only); the
  phases, optimizers (lr and betas corrected by ``k / (k + 1)``) and ``G_ema`` as its
  ``training_loop.py`` sets them up. One phase is that file's loop body: ``opt.zero_grad``,
  ``requires_grad_(True)``, ``loss.accumulate_gradients(gain=interval)``, ``requires_grad_(False)``,
  ``misc.nan_to_num`` of every gradient, ``opt.step``; the iteration starts with its data fetch
  (image to [-1, 1], one ``randn`` for all phases' latents, empty labels; no ``pin_memory``, which
  needs CUDA) and ends with its ``G_ema`` update. No official file is edited; on CPU its custom ops
  take their reference paths by themselves (``bias_act``/``upfirdn2d`` ``impl='cuda'`` only on CUDA
  tensors; ``conv2d_gradfix`` only on CUDA) and it compiles nothing.
- ``ours fp32``: ``loop.run_iteration`` over one of the stylegan2 family's ``phases(cfg)`` at a
  time, with its ``optimizers(cfg)`` as ``dist.DDPEngine`` engines made as ``loop.train`` makes
  them (world size 1, no DDP; ``optim.adam`` fused), ``prepare`` as the fetch (the later phases
  reuse its batch, as the loop does), the loop's agreement, a ``stats.Monitor`` that writes
  nothing; then the loop's EMA update (``train.ema``). Config: ``stylegan2_demo`` with the
  overrides ``OURS_ARGS``. ``ours bf16``: the same under CPU bf16 autocast (the regularisers run in
  fp32, as the family does); without native bf16 (no AVX512-BF16/AMX) its convolutions are far
  slower, so it runs in the first process only (``--bf16-rounds``). ``ours fp32 ADA``: ``model.aug=ada``
  with the ``bgc`` pipe at ``augment_p`` 0.6 (p then moves by 3.2e-5 per adjustment: ada_kimg 500).

An amortised iteration is every phase over its interval: T(Gmain) + T(Greg) / 4 + T(Dmain) +
T(Dreg) / 16 + fetch + G_ema, i.e. the mean over 16 consecutive iterations. Each measured round runs
the fetch, all four phases once and the EMA update, timing each; its amortised time is that
weighted sum. Not included on either side: logging, snapshots, the ADA tick bookkeeping, checkpoints,
data loading.

Measured as ``bench/spade_step.py``: a fresh child process per variant and process slot (the
official child imports nothing of ``pipeline``), so peak RSS (``ru_maxrss``) is the variant's own;
1 thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``); ``time.process_time()``;
``--procs`` processes per variant, the order rotated between slots so drifting load hits every
variant alike; each child ``--warmup`` warm-up rounds, then ``--measure`` measured rounds; medians
pool rounds and processes; ratios against the official code measured in the same run; the issue's
official figure printed apart. The breakdown stamps sections with forward hooks on G.mapping,
G.synthesis, D (and ours' augment pipe) and around ``Tensor.backward`` and ``torch.autograd.grad``.

Numerics (a child of its own, ``--no-numerics`` skips it): both sides from the same weights (the
official initial ones, loaded into ours key for key) and the same random draws, each phase once
from those weights: its loss terms, and the gradients it hands to Adam against the official ones.

    .venv/bin/python bench/stylegan2_step.py                      # 3 processes per side, ~15-20 min (bf16 ~7)
    .venv/bin/python bench/stylegan2_step.py --variants official,ours,ours-ada   # without bf16, ~10-13 min
    .venv/bin/python bench/stylegan2_step.py --quick --variants official,ours
    .venv/bin/python bench/stylegan2_step.py --profile ours       # torch.profiler op table, one round
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runnable from a checkout; the official child imports nothing from it

import torch  # noqa: E402
from loop_iteration import loop_context, loop_engines, put_official_on_path  # noqa: E402
from torch import nn  # noqa: E402

RESULT_TAG = "RESULT "
TARGET = 0.85  # ours fp32 CPU time / official's, per amortised iteration
EXTERNAL_SEC = 6.95  # the issue: official code, this config, quiet machine of this type, 1 thread, same torch
RES, BATCH, Z_DIM, SEED = 64, 8, 512, 0
R1_GAMMA = 0.0002 * RES ** 2 / BATCH  # the official --cfg=auto heuristic: 0.1024
LR, EMA_KIMG, EMA_RAMPUP = 0.0025, BATCH * 10 / 32, 0.05  # --cfg=auto at 64²
PHASES = ("Gmain", "Greg", "Dmain", "Dreg")
INTERVALS = {"Gmain": 1, "Greg": 4, "Dmain": 1, "Dreg": 16}

# The official train.py's kwargs for this config (--cfg=auto, map 2, cbase 8192, cmax 512, mbstd 4).
OFFICIAL_G = dict(class_name="training.networks.Generator", z_dim=Z_DIM, w_dim=512,
                  mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(channel_base=8192, channel_max=512, num_fp16_res=0, conv_clamp=256))
OFFICIAL_D = dict(class_name="training.networks.Discriminator", block_kwargs={}, mapping_kwargs={},
                  epilogue_kwargs=dict(mbstd_group_size=4), architecture="resnet", channel_base=8192,
                  channel_max=512, num_fp16_res=0, conv_clamp=256)
OFFICIAL_OPT = dict(class_name="torch.optim.Adam", lr=LR, betas=[0, 0.99], eps=1e-8)
OFFICIAL_LOSS = dict(class_name="training.loss.StyleGAN2Loss", r1_gamma=R1_GAMMA)  # pl 2, mixing 0.9: defaults
OURS_ARGS = [
    f"model.resolution={RES}", "model.cbase=8192", "model.cmax=512", "model.map=2", f"model.z_dim={Z_DIM}",
    "model.w_dim=512", "model.mbstd=4", "model.conv_clamp=256", "model.architecture_D=resnet",
    f"model.r1_gamma={R1_GAMMA}", "model.pl_weight=2", "model.style_mixing_prob=0.9", f"model.lr_G={LR}",
    f"model.lr_D={LR}", "model.beta1=0", "model.beta2=0.99", "model.G_reg_interval=4", "model.D_reg_interval=16",
    f"model.ema_kimg={EMA_KIMG}", f"model.ema_rampup={EMA_RAMPUP}", f"train.batch_size={BATCH}",
    "train.precision=fp32", "train.channels_last=false", "optim.grad_clip=0",
]
ADA_ARGS = ["model.aug=ada", "model.augpipe=bgc", "model.augment_p=0.6", "model.ada_target=0.6", "model.ada_kimg=500"]


@dataclass(frozen=True)
class Variant:
    label: str
    kind: str  # "ours" or "official"
    precision: str = "fp32"
    ada: bool = False


VARIANTS = {
    "official": Variant("OFFICIAL fp32", "official"),
    "ours": Variant("OURS fp32", "ours"),
    "ours-bf16": Variant("OURS bf16", "ours", "bf16"),
    "ours-ada": Variant("OURS fp32 ADA p=0.6", "ours", ada=True),
}


def make_raw(seed: int = SEED) -> torch.Tensor:
    """A batch of real images as the loader hands them over: uint8 [BATCH, 3, RES, RES]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (BATCH, 3, RES, RES), generator=g, dtype=torch.uint8)


# ============================================================================= timing


class Stamper:
    """Process-CPU time per named section; ``phase`` prefixes the sections of the current phase."""

    def __init__(self):
        self.rounds: list[dict[str, float]] = []
        self.current: dict[str, float] = {}
        self.phase, self.last = "iteration", time.process_time()

    def start(self) -> None:
        self.current, self.phase, self.last = {}, "iteration", time.process_time()

    def begin(self, phase: str) -> None:
        """A phase starts: the bench's own glue since the last stamp is dropped."""
        self.phase, self.last = phase, time.process_time()

    def __call__(self, name: str) -> None:
        now = time.process_time()
        key = f"{self.phase}: {name}"
        self.current[key] = self.current.get(key, 0.0) + now - self.last
        self.last = now

    def keep(self) -> None:
        self.rounds.append(self.current)


REST = "rest (zero_grad, requires_grad_, style-mix glue, losses)"
STEP = "Adam & loop (after the last backward)"
SECTION_ORDER = ["mapping forward", "synthesis forward", "augment", "D forward", "reg grad (autograd.grad)",
                 "backward", REST, STEP]


def instrument(stamper: Stamper, modules: dict[str, nn.Module]) -> None:
    """Forward hooks on ``modules`` (what precedes a forward is the phase's rest), and stamps around
    ``Tensor.backward`` and ``torch.autograd.grad`` (the regularisers' gradient graphs). Nested
    modules (ours' augment pipe inside D) get their own section: D's pre-hook fires first."""
    for name, module in modules.items():
        module.register_forward_pre_hook(lambda m, a: stamper(REST))
        module.register_forward_hook(lambda m, a, o, name=name: stamper(name))
    backward, grad = torch.Tensor.backward, torch.autograd.grad

    def stamped_backward(self, *args, **kwargs):
        stamper(REST)
        out = backward(self, *args, **kwargs)
        stamper("backward")
        return out

    def stamped_grad(*args, **kwargs):
        stamper(REST)
        out = grad(*args, **kwargs)
        stamper("reg grad (autograd.grad)")
        return out

    torch.Tensor.backward, torch.autograd.grad = stamped_backward, stamped_grad


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ============================================================================= OFFICIAL: NVlabs/stylegan2-ada-pytorch


def import_official(path: str) -> None:
    put_official_on_path(path, "training/loss.py", "Unpack NVlabs/stylegan2-ada-pytorch outside this repository, "
                         f"e.g. git clone https://github.com/NVlabs/stylegan2-ada-pytorch {path}, or pass --official "
                         "/ set $SG2_OFFICIAL")


class Official:
    """The official training loop's iteration (``training_loop.py`` lines 258-305), every phase due."""

    def __init__(self, path: str):
        import_official(path)
        import dnnlib
        from torch_utils import misc
        from torch_utils.ops import conv2d_gradfix, grid_sample_gradfix

        conv2d_gradfix.enabled = grid_sample_gradfix.enabled = True  # as training_loop (no-ops on CPU)
        self.misc, self.device = misc, torch.device("cpu")
        torch.manual_seed(SEED)
        common = dict(c_dim=0, img_resolution=RES, img_channels=3)
        self.G = dnnlib.util.construct_class_by_name(**OFFICIAL_G, **common).train().requires_grad_(False)
        self.D = dnnlib.util.construct_class_by_name(**OFFICIAL_D, **common).train().requires_grad_(False)
        self.G_ema = copy.deepcopy(self.G).eval()
        self.loss = dnnlib.util.construct_class_by_name(device=self.device, G_mapping=self.G.mapping,
                                                        G_synthesis=self.G.synthesis, D=self.D, augment_pipe=None,
                                                        **OFFICIAL_LOSS)
        self.phases = {}
        for name, module, reg_interval in [("G", self.G, 4), ("D", self.D, 16)]:  # lazy regularisation
            mb_ratio = reg_interval / (reg_interval + 1)
            kw = dnnlib.EasyDict(OFFICIAL_OPT)
            kw.lr, kw.betas = kw.lr * mb_ratio, [beta ** mb_ratio for beta in kw.betas]
            opt = dnnlib.util.construct_class_by_name(module.parameters(), **kw)
            self.phases[name + "main"] = dnnlib.EasyDict(name=name + "main", module=module, opt=opt, interval=1)
            self.phases[name + "reg"] = dnnlib.EasyDict(name=name + "reg", module=module, opt=opt,
                                                        interval=reg_interval)
        self.nets = {"G": self.G, "D": self.D}
        self.cur_nimg = 0

    def instrument(self, stamper: Stamper) -> None:
        instrument(stamper, {"mapping forward": self.G.mapping, "synthesis forward": self.G.synthesis,
                             "D forward": self.D})

    def fetch(self, raw: torch.Tensor, num_phases: int) -> tuple:
        real = (raw.to(self.device).to(torch.float32) / 127.5 - 1).split(BATCH)
        real_c = torch.zeros([BATCH, 0]).split(BATCH)  # an unconditional dataset's labels
        all_gen_z = torch.randn([num_phases * BATCH, Z_DIM], device=self.device)
        all_gen_z = [z.split(BATCH) for z in all_gen_z.split(BATCH)]
        all_gen_c = torch.zeros([num_phases * BATCH, 0])  # get_label of label_dim 0 (pin_memory: CUDA only)
        all_gen_c = [c.split(BATCH) for c in all_gen_c.split(BATCH)]
        return real, real_c, all_gen_z, all_gen_c

    def run_phase(self, name: str, real, real_c, gen_z, gen_c) -> None:
        phase = self.phases[name]
        phase.opt.zero_grad(set_to_none=True)
        phase.module.requires_grad_(True)
        for real_img, rc, gz, gc in zip(real, real_c, gen_z, gen_c):
            self.loss.accumulate_gradients(phase=name, real_img=real_img, real_c=rc, gen_z=gz, gen_c=gc, sync=True,
                                           gain=phase.interval)
        phase.module.requires_grad_(False)
        for param in phase.module.parameters():
            if param.grad is not None:
                self.misc.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        phase.opt.step()

    def iteration(self, raw: torch.Tensor, stamper: Stamper) -> None:
        real, real_c, all_gen_z, all_gen_c = self.fetch(raw, len(PHASES))
        stamper("fetch")
        for name, gen_z, gen_c in zip(PHASES, all_gen_z, all_gen_c):
            stamper.begin(name)
            self.run_phase(name, real, real_c, gen_z, gen_c)
            stamper(STEP)
        stamper.phase = "iteration"
        with torch.no_grad():  # training_loop.py's Gema block
            ema_nimg = min(EMA_KIMG * 1000, self.cur_nimg * EMA_RAMPUP)
            ema_beta = 0.5 ** (BATCH / max(ema_nimg, 1e-8))
            for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
                p_ema.copy_(p.lerp(p_ema, ema_beta))
            for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
                b_ema.copy_(b)
        self.cur_nimg += BATCH
        stamper("G_ema")


# ============================================================================= OURS: the loop's phases


class CapturingEngine:
    """A ``dist.DDPEngine`` as the loop drives it; in the numerics child it keeps the gradients each
    step is about to apply."""

    def __init__(self, engine):
        self.engine, self.capture = engine, None

    def __getattr__(self, name: str):  # name, modules, param_groups, sync_context, backward, check
        return getattr(self.engine, name)

    def step(self, skip: bool) -> torch.Tensor:
        if skip:
            raise RuntimeError(f"non-finite {self.engine.name} step in the benchmark")
        if self.capture is not None:
            self.capture.update({n: p.grad.detach().clone() for m in self.engine.modules.values()
                                 for n, p in m.named_parameters() if p.grad is not None})
        return self.engine.step(skip)


class Ours:
    """The stylegan2 family through the loop's ``run_iteration``, one phase at a time (world size 1)."""

    def __init__(self, precision: str, ada: bool):
        from pipeline.config import load_config
        from pipeline.families import get_family
        from pipeline.train.ema import make_ema
        from pipeline.train.family import DataInfo

        self.cfg = cfg = load_config("stylegan2_demo", [*OURS_ARGS, *(ADA_ARGS if ada else ["model.aug=noaug"])])
        self.info = info = DataInfo("image", None, ("image",))
        self.family = get_family("stylegan2")
        torch.manual_seed(SEED)
        self.nets = nets = self.family.build(cfg, info)
        self.engines = loop_engines(self.family, cfg, nets, CapturingEngine)
        self.ema = {n.name: make_ema(nets[n.name]) for n in self.family.networks if n.ema}
        # every=1: the bench runs each phase once per round and weighs it by its interval afterwards
        self.phases = {p.name: dataclasses.replace(p, every=1) for p in self.family.phases(cfg)}
        if tuple(self.phases) != PHASES or any(p.every != INTERVALS[p.name] for p in self.family.phases(cfg)):
            raise RuntimeError(f"the family's phases changed: {self.family.phases(cfg)}")
        self.stream = self.family.streams(cfg, info, cfg.data.split)[0].name
        self.ctx, self.monitor, self.agree = loop_context(self.family, cfg, info, nets, precision)
        self.batch, self.refetch = None, True
        self.G, self.D = nets["G"], nets["D"]

    def instrument(self, stamper: Stamper) -> None:
        modules = {"mapping forward": self.G.mapping, "synthesis forward": self.G.synthesis, "D forward": self.D}
        if self.D.augment_pipe is not None:
            modules["augment"] = self.D.augment_pipe
        instrument(stamper, modules)

    def run_phase(self, name: str, raw: torch.Tensor, stamper: Stamper) -> None:
        from pipeline.train.loop import run_iteration

        phase = self.phases[name]

        def fetch() -> dict:  # the loop's: a phase with fetch=False reuses the previous phase's batch
            if (phase.fetch and self.refetch) or self.batch is None:
                stamper(REST)
                self.batch = self.family.prepare({self.stream: {"image": raw}}, torch.device("cpu"), self.cfg,
                                                 self.info)
                phase_name, stamper.phase = stamper.phase, "iteration"
                stamper("fetch")
                stamper.phase = phase_name
            return self.batch

        run_iteration((phase,), self.ctx, self.engines, fetch, 1, self.agree, self.monitor)

    def iteration(self, raw: torch.Tensor, stamper: Stamper) -> None:
        from pipeline.train.ema import ema_beta, update_ema
        from pipeline.train.loop import lr_factor

        for engine in self.engines.values():  # the loop's lr line
            for group in engine.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(self.cfg, self.ctx.nimg)
        for name in PHASES:
            stamper.begin(name)
            self.run_phase(name, raw, stamper)
            stamper(STEP)
        stamper.phase = "iteration"
        self.ctx.step += 1
        self.ctx.nimg += BATCH
        beta = ema_beta(BATCH, self.ctx.nimg, self.cfg.model.ema_kimg, self.cfg.model.ema_rampup)
        for name, ema in self.ema.items():
            update_ema(ema, self.nets[name], beta)
        stamper("G_ema")


# ============================================================================= children


def make_runner(key: str, official: str):
    v = VARIANTS[key]
    return Official(official) if v.kind == "official" else Ours(v.precision, v.ada)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def child_measure(key: str, warmup: int, measure: int, official: str) -> dict:
    runner = make_runner(key, official)
    built_rss, raw, stamper = rss_gb(), make_raw(), Stamper()
    runner.instrument(stamper)
    totals = []
    for i in range(warmup + measure):
        stamper.start()
        c0 = time.process_time()
        runner.iteration(raw, stamper)
        if i >= warmup:
            totals.append(time.process_time() - c0)
            stamper.keep()
    extra = {}
    if isinstance(runner, Ours) and runner.D.augment_pipe is not None:
        extra["p"] = float(runner.D.augment_pipe.p)
    return {"rounds": stamper.rounds, "round_totals": totals, "built_rss_gb": built_rss, "peak_rss_gb": rss_gb(),
            "params": {n: count(net) for n, net in runner.nets.items()}, "threads": torch.get_num_threads(), **extra}


def child_profile(key: str, warmup: int, official: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    runner, raw = make_runner(key, official), make_raw()
    for _ in range(warmup):
        runner.iteration(raw, Stamper())
    for name in PHASES:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if isinstance(runner, Official):
                real, real_c, gen_z, gen_c = runner.fetch(raw, 1)
                runner.run_phase(name, real, real_c, gen_z[0], gen_c[0])
            else:
                runner.run_phase(name, raw, Stamper())
        print(f"\n=== torch.profiler: {VARIANTS[key].label}, phase {name} (after {warmup} warm-up rounds; "
              f"wall-clock times, so other load inflates them)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=44))


def child_numerics(official: str) -> dict:
    """Each phase once on each side from the same weights and the same random draws."""
    off = Official(official)
    initial = {n: {k: v.clone() for k, v in net.state_dict().items()} for n, net in off.nets.items()}
    ours = Ours("fp32", ada=False)
    raw = make_raw()
    out: dict = {}
    for name in PHASES:
        # official: latents drawn first, then its run_G / run_D draw, as ours does inside the phase
        for n, net in off.nets.items():
            net.load_state_dict(initial[n])
        off.loss.pl_mean.zero_()
        real, real_c, _, _ = off.fetch(raw, 1)
        n_z = BATCH // 2 if name == "Greg" else BATCH  # Greg: pl_batch_shrink 2, gen_z[:4]
        torch.manual_seed(100)
        z = torch.randn([n_z, Z_DIM])
        gen_z = torch.cat([z, torch.zeros([BATCH - n_z, Z_DIM])]) if n_z < BATCH else z
        phase = off.phases[name]
        phase.opt.zero_grad(set_to_none=True)
        phase.module.requires_grad_(True)
        from torch_utils import training_stats
        training_stats._counters.clear()
        off.loss.accumulate_gradients(phase=name, real_img=real[0], real_c=real_c[0], gen_z=gen_z, gen_c=gen_c0(),
                                      sync=True, gain=phase.interval)
        phase.module.requires_grad_(False)
        g_off = {k: p.grad.detach().clone() for k, p in phase.module.named_parameters() if p.grad is not None}
        stats = {k: float(v[next(iter(v))][1] / v[next(iter(v))][0]) for k, v in training_stats._counters.items()
                 if v and float(v[next(iter(v))][0]) > 0}

        for n, net in ours.nets.items():
            net.load_state_dict(initial[n])
        ours.ctx.state.clear()
        ours.ctx.step = 1  # no ADA adjustment at step 0 anyway; noaug
        ours.batch = ours.family.prepare({ours.stream: {"image": raw}}, torch.device("cpu"), ours.cfg, ours.info)
        ours.refetch = False
        engine = ours.engines[name[0]]
        engine.capture = {}
        losses: dict = {}
        monitor_add = ours.monitor.add
        ours.monitor.add = lambda ph, outs, norm, skipped, losses=losses: losses.update(
            {k: float(v.detach()) for k, v in outs[-1].items() if k != "loss"})
        torch.manual_seed(100)
        ours.run_phase(name, raw, Stamper())
        ours.monitor.add = monitor_add
        g_ours, engine.capture = engine.capture, None
        if sorted(g_ours) != sorted(g_off):
            raise RuntimeError(f"{name}: gradients of different parameters: {sorted(set(g_ours) ^ set(g_off))[:5]}")
        num = torch.cat([(g_ours[k] - g_off[k]).flatten() for k in g_off]).norm()
        den = torch.cat([g_off[k].flatten() for k in g_off]).norm()
        worst = max(g_off, key=lambda k: float((g_ours[k] - g_off[k]).norm() / (g_off[k].norm() + 1e-30)))
        out[name] = {"official": stats, "ours": losses, "grad_rel": float(num / den), "worst": worst,
                     "worst_rel": float((g_ours[worst] - g_off[worst]).norm() / (g_off[worst].norm() + 1e-30))}
    return out


def gen_c0() -> torch.Tensor:
    return torch.zeros([BATCH, 0])


# ============================================================================= the parent


def run_child(args_list: list[str], timeout: float, show_output: bool = False) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True, env=env,
                       timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if show_output:
        print("\n".join(ln for ln in r.stdout.splitlines() if not ln.startswith(RESULT_TAG)))
    if r.returncode != 0 or (not lines and not show_output):
        sys.stderr.write(f"--- child {args_list} failed (exit {r.returncode})\n{r.stdout[-4000:]}\n"
                         f"{r.stderr[-6000:]}\n")
        raise SystemExit(1)
    return json.loads(lines[-1][len(RESULT_TAG):]) if lines else None


def phase_total(rnd: dict[str, float], phase: str) -> float:
    return sum(v for k, v in rnd.items() if k.startswith(f"{phase}: "))


def amortised(rnd: dict[str, float]) -> float:
    return sum(phase_total(rnd, p) / INTERVALS[p] for p in PHASES) + phase_total(rnd, "iteration")


def report(results: dict[str, list[dict]]) -> dict:
    """Prints the tables; returns the medians (for the caller's summary)."""
    rounds = {k: [rnd for child in r for rnd in child["rounds"]] for k, r in results.items()}
    amort = {k: [amortised(rnd) for rnd in rs] for k, rs in rounds.items()}
    med = {k: statistics.median(v) for k, v in amort.items()}
    rss = {k: max(c["peak_rss_gb"] for c in r) for k, r in results.items()}
    base = med.get("official")
    print(f"\n{'variant':<22} {'rounds':>6} {'procs':>5} {'CPU s/amortised it':>18} {'min-max':>15} "
          f"{'procs spread':>12} {'/official':>9} {'RSS built':>9} {'peak RSS GB':>11}   params G / D")
    for key, children in results.items():
        per_proc = [statistics.median(amortised(rnd) for rnd in c["rounds"]) for c in children]
        spread = (max(per_proc) - min(per_proc)) / statistics.median(per_proc)
        params = children[0]["params"]
        ratio = f"{med[key] / base:.3f}x" if base else "-"
        print(f"{VARIANTS[key].label:<22} {len(amort[key]):>6} {len(children):>5} {med[key]:>18.3f} "
              f"{min(amort[key]):>7.3f}-{max(amort[key]):<7.3f} {spread:>12.1%} {ratio:>9} "
              f"{max(c['built_rss_gb'] for c in children):>9.3f} {rss[key]:>11.3f}   "
              f"{params['G']:,} / {params['D']:,}")
    print("(amortised: Gmain + Greg/4 + Dmain + Dreg/16 + fetch + G_ema per measured round, median over rounds and "
          "processes; procs spread: of the per-process medians; RSS built: peak after building nets and optimizers; "
          f"threads: {sorted({c['threads'] for r in results.values() for c in r})})")

    print("\nper phase (median process CPU s of one run of the phase; amortised = / interval):")
    print(f"  {'phase':<10}{'interval':>9}" + "".join(f"{VARIANTS[k].label:>22}" for k in results)
          + ("" if not base else "".join(f"{VARIANTS[k].label + ' /off':>26}" for k in results if k != "official")))
    meds: dict[str, dict[str, float]] = {}
    for p in [*PHASES, "iteration"]:
        meds[p] = {k: statistics.median(phase_total(rnd, p) for rnd in rs) for k, rs in rounds.items()}
        label = "fetch+EMA" if p == "iteration" else p
        interval = INTERVALS.get(p, 1)
        print(f"  {label:<10}{interval:>9}" + "".join(f"{meds[p][k]:>22.3f}" for k in results)
              + ("" if not base else "".join(f"{meds[p][k] / meds[p]['official']:>25.3f}x"
                                             for k in results if k != "official")))
    print(f"  {'amortised':<10}{'':>9}" + "".join(f"{sum(meds[p][k] / INTERVALS.get(p, 1) for p in meds):>22.3f}"
                                                   for k in results) + "   (sum of the per-phase medians)")

    print("\nwhere the time goes inside each phase (median process CPU s per section):")
    names = sorted({name for rs in rounds.values() for rnd in rs for name in rnd},
                   key=lambda n: ([*PHASES, "iteration"].index(n.split(": ")[0]),
                                  next((i for i, s in enumerate(SECTION_ORDER) if n.split(": ", 1)[1] == s), 99)))
    print(f"  {'section':<64}" + "".join(f"{VARIANTS[k].label:>22}" for k in results))
    for name in names:
        cells = []
        for rs in rounds.values():
            vals = [rnd[name] for rnd in rs if name in rnd]
            cells.append(f"{statistics.median(vals):>22.4f}" if vals else f"{'-':>22}")
        print(f"  {name:<64}" + "".join(cells))

    print("\nratios (same run):")
    if "ours" in med and base:
        ratio = med["ours"] / base
        print(f"  OURS fp32 / OFFICIAL fp32, CPU per amortised iteration: {ratio:.3f}x (target <= {TARGET}: "
              f"{'MET' if ratio <= TARGET else 'NOT MET'}); peak RSS {rss['ours'] / rss['official']:.3f}x "
              f"({rss['ours']:.3f} vs {rss['official']:.3f} GB)")
    if "ours-bf16" in med and "ours" in med:
        print(f"  OURS bf16 / OURS fp32: CPU {med['ours-bf16'] / med['ours']:.2f}x, peak RSS "
              f"{rss['ours-bf16'] / rss['ours']:.3f}x (cpu capability {torch.backends.cpu.get_cpu_capability()})")
    if "ours-ada" in med and "ours" in med:
        ps = [c["p"] for c in results["ours-ada"] if "p" in c]
        print(f"  OURS fp32 ADA p=0.6 / OURS fp32 noaug: CPU {med['ours-ada'] / med['ours']:.3f}x "
              f"(+{med['ours-ada'] - med['ours']:.3f} s per amortised iteration; p at the end {min(ps):.5f}); "
              f"peak RSS {rss['ours-ada'] / rss['ours']:.3f}x")
    print(f"\nEXTERNAL reference, not measured here (the issue: official code, this config, a quiet machine of this "
          f"type, 1 thread, same torch wheel): {EXTERNAL_SEC} s CPU per amortised iteration")
    print("  " + ";  ".join(f"{VARIANTS[k].label} {med[k] / EXTERNAL_SEC:.3f}x" for k in med))
    return med


def report_numerics(n: dict) -> None:
    print("\nnumerics: each phase once from the official initial weights, same latents, noise and batch on both "
          "sides (fresh child)")
    pairs = {"Gmain": [("Loss/G/loss", "G/loss"), ("Loss/scores/fake", "scores/fake")],
             "Greg": [("Loss/pl_penalty", "pl_penalty"), ("Loss/G/reg", "G/reg")],
             "Dmain": [("Loss/D/loss", "D/loss"), ("Loss/scores/real", "scores/real")],
             "Dreg": [("Loss/r1_penalty", "r1_penalty"), ("Loss/D/reg", "D/reg")]}
    for phase, r in n.items():
        terms = "  ".join(f"{ours} official {r['official'].get(off, math.nan):.7g} ours "
                          f"{r['ours'].get(ours, math.nan):.7g}" for off, ours in pairs[phase])
        print(f"  {phase:<6} {terms}")
        print(f"         gradients ||ours - official|| / ||official||: {r['grad_rel']:.3g} (worst tensor "
              f"{r['worst']}: {r['worst_rel']:.3g})")
    print("  (expected: fp32 rounding, ~1e-4, larger on tensors whose gradient is a sum of cancelling terms "
          "(noise_strength); ours resamples with depthwise convs and folds gains and biases, which changes only "
          "rounding. Greg ~1e-2: ours detaches the path-length mean inside its lerp, the official lets the gradient "
          "through it (0.01 of the batch mean); with it undetached the difference falls to ~6e-4)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", default=os.environ.get("SG2_OFFICIAL", "/work/sg2-official"),
                   help="an unpacked NVlabs/stylegan2-ada-pytorch (default: $SG2_OFFICIAL or /work/sg2-official)")
    p.add_argument("--procs", type=int, default=3, help="child processes per variant, order rotated")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds per child")
    p.add_argument("--measure", type=int, default=2, help="measured rounds per child")
    p.add_argument("--bf16-procs", type=int, default=1, help="bf16: processes (the first slots only)")
    p.add_argument("--bf16-warmup", type=int, default=0, help="bf16: warm-up rounds per child (a round takes "
                   "minutes without native bf16; the first is barely slower than the next)")
    p.add_argument("--bf16-measure", type=int, default=1, help="bf16: measured rounds per child")
    p.add_argument("--quick", action="store_true", help="1 process per variant, 1 warm-up + 1 measured round")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--no-numerics", action="store_true", help="skip the one-phase numerics check")
    p.add_argument("--profile", choices=list(VARIANTS), help="only print torch.profiler op tables per phase of one "
                   "variant (after --warmup rounds)")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--child", choices=[*VARIANTS, "numerics"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.procs, args.warmup, args.measure, args.bf16_warmup, args.bf16_measure = 1, 1, 1, 0, 1
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        torch.set_num_threads(1)
        if args.child == "numerics":
            result = child_numerics(args.official)
        elif args.profile:
            child_profile(args.child, args.warmup, args.official, args.profile_rows)
            return 0
        else:
            result = child_measure(args.child, args.warmup, args.measure, args.official)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    have_official = (Path(args.official) / "training" / "loss.py").is_file()
    if not have_official:
        print(f"NOTE: no official code at --official {args.official} (training/loss.py missing): the official side "
              f"and the numerics are skipped; ratios against it cannot be printed. Unpack NVlabs/stylegan2-ada-pytorch "
              f"outside this repository and pass --official PATH or set $SG2_OFFICIAL.")
        args.variants = [v for v in args.variants if VARIANTS[v].kind != "official"]
        args.no_numerics = True
        if not args.variants:
            return 0
    common = ["--official", args.official]
    if args.profile:
        run_child(["--child", args.profile, "--profile", args.profile, "--warmup", str(args.warmup),
                   "--profile-rows", str(args.profile_rows), *common], 3600, show_output=True)
        return 0
    start_load, start = os.getloadavg(), time.perf_counter()  # load before this benchmark adds its own
    print("StyleGAN2 training-iteration benchmark (bench/stylegan2_step.py)")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in start_load)}   cpus: {os.cpu_count()}   torch "
          f"{torch.__version__}   python {platform.python_version()}   cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}   official code: {args.official}")
    print(f"config: {RES}x{RES}, z/w 512, map 2, cbase 8192, cmax 512, conv_clamp 256, resnet D, mbstd 4, batch "
          f"{BATCH}, r1_gamma {R1_GAMMA:.4g} every 16, pl_weight 2 every 4, style mixing 0.9, Adam {LR} (0, 0.99), "
          f"EMA {EMA_KIMG} kimg")
    print(f"a fresh child per variant and process, 1 thread; {args.procs} process(es) per variant of {args.warmup} "
          f"warm-up + {args.measure} measured rounds (bf16: {min(args.bf16_procs, args.procs)} process(es) of "
          f"{args.bf16_warmup} + {args.bf16_measure}); a round = fetch, Gmain, Greg, Dmain, Dreg, G_ema")
    results: dict[str, list[dict]] = {k: [] for k in args.variants}
    for r in range(args.procs):
        k = r % len(args.variants)
        for key in args.variants[k:] + args.variants[:k]:
            bf16 = VARIANTS[key].precision == "bf16"
            if bf16 and r >= args.bf16_procs:
                continue
            warmup, measure = (args.bf16_warmup, args.bf16_measure) if bf16 else (args.warmup, args.measure)
            t0 = time.perf_counter()
            results[key].append(run_child(["--child", key, "--warmup", str(warmup), "--measure", str(measure),
                                           *common], 3600))
            child = results[key][-1]
            print(f"  process {r + 1}: {VARIANTS[key].label:<22} {time.perf_counter() - t0:6.1f} s wall, median "
                  f"{statistics.median(amortised(rnd) for rnd in child['rounds']):.3f} s CPU per amortised iteration",
                  flush=True)
    report(results)
    if not args.no_numerics:
        report_numerics(run_child(["--child", "numerics", *common], 1800))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
