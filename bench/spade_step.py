"""SPADE (GauGAN) training iteration: the training loop's own iteration against the official code.

The config: the official Cityscapes options at CPU size (``OFFICIAL_ARGS``, ``OURS_ARGS``): label_nc 35
+ instance edges, 256x128, ngf 32, ndf 32, num_upsampling_layers more, spectral SPADE over batch
norm, num_D 2, n_layers_D 4, spectralinstance D, hinge, feature matching 10, no VGG, no VAE, batch
1, TTUR Adam (G 1e-4, D 4e-4, betas 0, 0.9); the batch of ``bench/pix2pixhd_step.py``.

- ``official fp32``: the real NVlabs/SPADE code, imported from ``--official`` (an export kept
  outside this repository; default ``$SPADE_OFFICIAL`` or /work/spade-official). Its
  ``Pix2PixTrainer`` gets what its own parser (``TrainOptions.gather_options``) makes of
  ``OFFICIAL_ARGS`` (``parse()``'s post-processing restated, without its printing and opt.txt);
  ``--gpu_ids -1`` is CPU. One iteration is ``run_generator_one_step(data);
  run_discriminator_one_step(data)`` as its ``train.py``, ``data`` as its loader collates it. No
  official file is edited; two imports are stubbed in ``sys.modules``:
  ``models.networks.sync_batchnorm`` (a git submodule missing from the export;
  ``SynchronizedBatchNorm2d`` = ``nn.BatchNorm2d``, what it computes in one process) and ``dill``
  (used only by ``util.save_obj``/``load_obj``).
- ``ours fp32``: ``loop.run_iteration`` over the spade family's ``phases(cfg)``, with its
  ``optimizers(cfg)`` as ``dist.DDPEngine`` engines made as ``loop.train`` makes them (world size
  1), ``prepare`` as the fetch, the loop's agreement, a ``stats.Monitor`` that writes nothing;
  ``model.reuse_fake`` on. Not included: EMA (the official code has none),
  ``monitor.step``, checkpoints, data loading. ``ours fp32 no-reuse``: ``model.reuse_fake=false``
  (D scores a fake made again by the updated G, as the official code). ``ours bf16``: ``ours fp32``
  under CPU bf16 autocast; without native bf16 its convolutions are orders of magnitude slower, so it
  runs in the first round only, ``--bf16-warmup`` + ``--bf16-measure`` iterations.

Measured as ``bench/pix2pixhd_step.py``: a fresh child process per variant and round (the official
child imports nothing of ``pipeline``), so peak RSS (``ru_maxrss``) is the variant's own; 1 thread;
``time.process_time()`` per iteration; ``--rounds`` rounds, order rotated, ``--warmup`` warm-up and
``--measure / rounds`` measured iterations each; medians pool the rounds; ratios against the
official code in the same run; the issue's official figure printed apart. The breakdown stamps
sections with forward hooks on G and D and after each backward and optimizer step.

Numerics (a child of its own): one iteration of each side from the official initial weights
(spectral-norm vectors converged first) on the same batch: losses, and the gradients each step
applies against the official ones, beside the official code's own noise floor (its run from
weights perturbed by 1e-7 relative).

    .venv/bin/python bench/spade_step.py                      # 2 rounds, median of 8, ~10-15 min
    .venv/bin/python bench/spade_step.py --quick --variants official,ours,ours-no-reuse
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runnable from a checkout; the official child imports nothing from it

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

RESULT_TAG = "RESULT "
TARGETS = {"ours": 0.75, "ours-no-reuse": 0.95}  # CPU time / official's (peak RSS: <= 1 for both)
EXTERNAL_SEC = 2.152  # the issue: official code, this config, this machine type, 1 thread, same torch
H, W, LABEL_NC, SEED = 128, 256, 35, 0
OFFICIAL_ARGS = [  # the bench config as the official train.py command line
    "--dataset_mode", "cityscapes", "--gpu_ids", "-1", "--label_nc", "35", "--crop_size", "256",
    "--load_size", "256", "--aspect_ratio", "2", "--ngf", "32", "--ndf", "32", "--batchSize", "1",
    "--num_upsampling_layers", "more", "--norm_G", "spectralspadesyncbatch3x3", "--norm_D", "spectralinstance",
    "--n_layers_D", "4", "--num_D", "2", "--gan_mode", "hinge", "--lambda_feat", "10", "--no_vgg_loss",
    "--lr", "0.0002", "--beta1", "0", "--beta2", "0.9",
]
OURS_ARGS = [
    "model.family=spade", "model.ngf=32", "model.ndf=32", "model.num_upsampling_layers=more",
    "model.norm_G=spectralspadesyncbatch3x3", "model.norm_D=spectralinstance", "model.n_layers_D=4",
    "model.num_D=2", "model.use_instance=true", "model.use_vae=false", "model.gan=hinge", "model.feat_weight=10",
    "model.vgg_weight=0", "model.lr_G=1e-4", "model.lr_D=4e-4", "model.beta1=0", "model.beta2=0.9",
    "optim.grad_clip=0", "train.batch_size=1", "train.precision=fp32", "train.channels_last=false",
]


@dataclass(frozen=True)
class Variant:
    label: str
    kind: str  # "ours" or "official"
    precision: str = "fp32"
    reuse_fake: bool = True


VARIANTS = {
    "official": Variant("OFFICIAL fp32", "official"),
    "ours": Variant("OURS fp32", "ours"),
    "ours-no-reuse": Variant("OURS fp32 no-reuse", "ours", reuse_fake=False),
    "ours-bf16": Variant("OURS bf16", "ours", "bf16"),
}


def make_batch(seed: int = SEED) -> dict:
    """A collated batch as our stream delivers it: ``label`` uint8 [1, H, W], ``instance`` uint16
    [1, H, W] (stuff: id = class; things: class * 1000 + k), ``image`` uint8 [1, 3, H, W]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, LABEL_NC, (1, 1, H // 32, W // 32), generator=g).float()
    label = F.interpolate(coarse, size=(H, W), mode="nearest").to(torch.uint8)[:, 0]
    instance = label.clone().int()
    for k, (cls, y, x, h, w) in enumerate([(26, 70, 20, 30, 60), (26, 75, 60, 28, 50), (24, 40, 150, 60, 18),
                                           (24, 45, 165, 55, 16), (33, 90, 200, 25, 30)]):
        label[:, y:y + h, x:x + w] = cls
        instance[:, y:y + h, x:x + w] = cls * 1000 + k
    image = torch.randint(0, 256, (1, 3, H, W), generator=g, dtype=torch.uint8)
    return {"label": label, "instance": instance.to(torch.uint16), "image": image}


class Stamper:
    """Process-CPU time per named section of an iteration; ``phase`` names the current phase."""

    def __init__(self):
        self.sections: dict[str, list[float]] = {}
        self.current: dict[str, float] = {}
        self.phase, self.last = "", time.process_time()

    def start(self) -> None:
        self.current, self.last = {}, time.process_time()

    def __call__(self, name: str) -> None:
        now = time.process_time()
        self.current[name] = self.current.get(name, 0.0) + now - self.last
        self.last = now

    def keep(self) -> None:
        for k, v in self.current.items():
            self.sections.setdefault(k, []).append(v)


REST = "rest (inputs, cat, losses)"


def stamp_forwards(stamper: Stamper, nets: dict[str, nn.Module]) -> None:
    """Forward hooks: what precedes a net's forward is its phase's rest, the forward its own."""
    for name, net in nets.items():
        net.register_forward_pre_hook(lambda m, a: stamper(f"{stamper.phase} phase: {REST}"))
        net.register_forward_hook(lambda m, a, o, name=name: stamper(f"{stamper.phase} phase: {name} forward"))


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ============================================================================= OFFICIAL: NVlabs/SPADE


def import_official(path: str) -> None:
    """Make the official modules importable from ``path``, with the two stubs of the docstring."""
    if not (Path(path) / "trainers" / "pix2pix_trainer.py").is_file():
        raise SystemExit(f"--official {path}: no NVlabs/SPADE export there. Make one with: mkdir -p {path} && "
                         f"git -C <SPADE git dir> archive HEAD models options trainers util data | tar -x -C {path}")
    if path not in sys.path:
        sys.path.insert(0, path)

    def data_parallel(*args, **kwargs):
        raise RuntimeError("DataParallelWithCallback (GPUs only) is stubbed out in this benchmark")

    sync_bn = types.ModuleType("models.networks.sync_batchnorm")
    sync_bn.SynchronizedBatchNorm2d, sync_bn.DataParallelWithCallback = nn.BatchNorm2d, data_parallel
    sys.modules["models.networks.sync_batchnorm"] = sync_bn
    sys.modules.setdefault("dill", types.ModuleType("dill"))


def official_options(args: list[str]) -> argparse.Namespace:
    """The official ``TrainOptions`` for the command line ``args``."""
    from options.train_options import TrainOptions

    saved, sys.argv = sys.argv, ["train.py", *args]  # the official parser reads sys.argv in several places
    try:
        opt = TrainOptions().gather_options()
    finally:
        sys.argv = saved
    opt.isTrain = True
    opt.semantic_nc = opt.label_nc + (1 if opt.contain_dontcare_label else 0) + (0 if opt.no_instance else 1)
    opt.gpu_ids = [int(i) for i in opt.gpu_ids.split(",") if int(i) >= 0]
    return opt


class Official:
    """One iteration of the official ``train.py`` loop body."""

    def __init__(self, path: str):
        import_official(path)
        from trainers.pix2pix_trainer import Pix2PixTrainer

        torch.manual_seed(SEED)
        with contextlib.redirect_stdout(io.StringIO()):  # its network summaries
            self.trainer = Pix2PixTrainer(official_options(OFFICIAL_ARGS))
        model = self.trainer.pix2pix_model_on_one_gpu
        self.nets = {"G": model.netG, "D": model.netD}
        self.optimizers = {"G": self.trainer.optimizer_G, "D": self.trainer.optimizer_D}

    def hook(self, stamper: Stamper) -> None:
        stamp_forwards(stamper, self.nets)
        for name, opt in self.optimizers.items():
            opt.register_step_pre_hook(lambda o, a, k, name=name: stamper(f"{name} phase: backward"))
            opt.register_step_post_hook(lambda o, a, k, name=name: stamper(f"{name} phase: step"))

    def iteration(self, raw: dict, stamper: Stamper) -> None:
        data = {"label": raw["label"].unsqueeze(1).float(), "instance": raw["instance"].unsqueeze(1).int(),
                "image": raw["image"].float().mul_(1 / 127.5).sub_(1.0), "path": ["bench"]}  # ours' floats
        stamper("prepare / loader handover")
        stamper.phase = "G"
        self.trainer.run_generator_one_step(data)
        stamper.phase = "D"
        self.trainer.run_discriminator_one_step(data)

    def losses(self) -> dict[str, float]:
        return {k: float(v.detach().mean()) for k, v in self.trainer.get_latest_losses().items()}


# ============================================================================= OURS: the loop's iteration


class StampedEngine:
    """A ``dist.DDPEngine`` as the loop drives it, stamping after its backward and its step; in the
    numerics child it keeps the gradients each step is about to apply."""

    def __init__(self, engine, owner: Ours):
        self.engine, self.owner, self.capture = engine, owner, None

    def __getattr__(self, name: str):  # name, modules, param_groups, sync_context, check
        return getattr(self.engine, name)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.owner.stamper(f"{self.engine.name} phase: backward")

    def step(self, skip: bool) -> torch.Tensor:
        if skip:
            raise RuntimeError(f"non-finite {self.engine.name} step in the benchmark")
        if self.capture is not None:
            self.capture[self.engine.name] = [p.grad.detach().clone() for m in self.engine.modules.values()
                                              for p in m.parameters()]
        norm = self.engine.step(skip)
        self.owner.stamper(f"{self.engine.name} phase: step")
        return norm


class Ours:
    """The spade family driven by the loop's own ``run_iteration`` (world size 1, no DDP)."""

    def __init__(self, precision: str, reuse_fake: bool):
        from pipeline import dist
        from pipeline.config import load_config
        from pipeline.families import get_family
        from pipeline.train.family import DataInfo, StepContext
        from pipeline.train.loop import adam_kwargs
        from pipeline.train.stats import Monitor

        self.cfg = cfg = load_config(None, [*OURS_ARGS, f"model.reuse_fake={str(reuse_fake).lower()}"])
        self.info = info = DataInfo("label2image", LABEL_NC, ("image", "label", "instance"))
        self.family = get_family("spade")
        torch.manual_seed(SEED)
        self.nets = nets = self.family.build(cfg, info)
        self.stamper, self.engines, self.outs = Stamper(), {}, {}
        for spec in self.family.optimizers(cfg):  # as loop.train (through dist.make_engine) makes them
            modules = {name: nets[name] for name in spec.nets}
            optimizer = torch.optim.Adam(spec.param_groups(modules), lr=spec.lr, betas=spec.betas,
                                         **adam_kwargs(cfg.optim.adam))
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
            self.engines[spec.name] = StampedEngine(
                dist.DDPEngine(spec.name, modules, optimizer, None, cfg.optim.grad_clip), self)
        self.phases = tuple(dataclasses.replace(p, fn=self.stamped(p)) for p in self.family.phases(cfg))
        self.stream = self.family.streams(cfg, info, cfg.data.split)[0].name
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" \
            else contextlib.nullcontext
        self.ctx = StepContext(nets=nets, plain=nets, cfg=cfg, info=info, mean_over_ranks=dist.mean_over_ranks,
                               reuse_fake=True, autocast=autocast)
        self.monitor = Monitor(cfg, cfg.run.dir, self.family, info, torch.device("cpu"), enabled=False)
        self.agree = lambda ok: not dist.any_rank([not ok, False, False], "cpu")[0]  # the loop's agree

    def stamped(self, phase):
        def fn(ctx, b, scratch):
            self.stamper("loop: requires_grad_, monitor.add")
            self.stamper.phase = phase.name
            out = phase.fn(ctx, b, scratch)
            self.stamper(f"{phase.name} phase: {REST}")
            self.outs[phase.name] = {k: v.detach() for k, v in out.items()}
            return out

        return fn

    def hook(self, stamper: Stamper) -> None:
        self.stamper = stamper
        stamp_forwards(stamper, self.nets)

    def iteration(self, raw: dict, stamper: Stamper) -> None:
        from pipeline.train.loop import lr_factor, run_iteration

        for engine in self.engines.values():  # the loop's lr line
            for group in engine.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(self.cfg, self.ctx.nimg)
        def fetch() -> dict:
            b = self.family.prepare({self.stream: raw}, torch.device("cpu"), self.cfg, self.info)
            stamper("prepare / loader handover")
            return b

        run_iteration(self.phases, self.ctx, self.engines, fetch, 1, self.agree, self.monitor)
        stamper("loop: requires_grad_, monitor.add")
        self.ctx.step += 1
        self.ctx.nimg += self.cfg.train.batch_size

    def losses(self) -> dict[str, float]:
        return {k: float(v) for out in self.outs.values() for k, v in out.items() if k != "loss"}


# ============================================================================= children


def make_runner(key: str, official: str):
    v = VARIANTS[key]
    return Official(official) if v.kind == "official" else Ours(v.precision, v.reuse_fake)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def child_measure(key: str, warmup: int, measure: int, official: str) -> dict:
    runner = make_runner(key, official)
    built_rss, raw, stamper = rss_gb(), make_batch(), Stamper()
    runner.hook(stamper)
    cpu, wall = [], []
    for i in range(warmup + measure):
        stamper.start()
        c0, w0 = time.process_time(), time.perf_counter()
        runner.iteration(raw, stamper)
        if i >= warmup:
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            stamper.keep()
    return {"cpu": cpu, "wall": wall, "sections": stamper.sections, "losses": runner.losses(),
            "params": {n: count(net) for n, net in runner.nets.items()}, "built_rss_gb": built_rss,
            "peak_rss_gb": rss_gb(), "threads": torch.get_num_threads()}


@torch.no_grad()
def converge_spectral(net: nn.Module, iters: int = 300) -> None:
    """Power iterations of every official spectral norm far past its random start, so that the
    numerics do not hinge on how many iterations each side makes (official: 2, ours: 3 on D)."""
    for m in net.modules():
        if hasattr(m, "weight_u"):
            w, u = m.weight_orig.flatten(1), m.weight_u
            for _ in range(iters):
                v = F.normalize(w.t() @ u, dim=0, eps=1e-12)
                u = F.normalize(w @ v, dim=0, eps=1e-12)
            m.weight_u.copy_(u)
            m.weight_v.copy_(v)


def load_official_state(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The official state dict into ours, paired by order and shape (spectral norm's names differ)."""
    pairs = list(zip(state.items(), net.state_dict().items(), strict=True))
    for (k_off, v_off), (k_ours, v_ours) in pairs:
        if v_off.shape != v_ours.shape:
            raise RuntimeError(f"state dicts do not line up: {k_off} {tuple(v_off.shape)} vs {k_ours}")
    net.load_state_dict({k_ours: v_off for (_, v_off), (k_ours, _) in pairs})


def child_numerics(official: str, keys: list[str]) -> dict:
    """One iteration of the official code (from converged and from perturbed weights) and of each
    of ``keys`` (from the official weights): losses, and each step's gradients against official."""
    state: dict = {}
    losses, grads = {}, {}
    for key in ["official", "official-perturbed", *keys]:
        runner = make_runner("official" if key.startswith("official") else key, official)
        grads[key] = {}
        if not state:
            for net in runner.nets.values():
                converge_spectral(net)
            state = {n: {k: v.clone() for k, v in net.state_dict().items()} for n, net in runner.nets.items()}
        elif key == "official-perturbed":
            gen = torch.Generator().manual_seed(1)
            for name, net in runner.nets.items():
                net.load_state_dict({k: v * (1 + 1e-7 * torch.randn(v.shape, generator=gen))
                                     if k.endswith(("weight", "weight_orig")) else v for k, v in state[name].items()})
        else:
            for name, net in runner.nets.items():
                load_official_state(net, state[name])
        if key.startswith("official"):
            for name, opt in runner.optimizers.items():
                params = [p for g in opt.param_groups for p in g["params"]]
                opt.register_step_pre_hook(lambda o, a, k, name=name, params=params, out=grads[key]: out.__setitem__(
                    name, [p.grad.detach().clone() for p in params]))
        else:
            for engine in runner.engines.values():
                engine.capture = grads[key]
        runner.iteration(make_batch(), Stamper())
        losses[key] = runner.losses()
    rel = {}
    for key in ["official-perturbed", *keys]:
        for net in ("G", "D"):
            ref, mine = grads["official"][net], grads[key][net]
            diff = torch.cat([(a - b).flatten() for a, b in zip(ref, mine, strict=True)]).norm()
            rel[f"{key}/{net}"] = float(diff / torch.cat([a.flatten() for a in ref]).norm())
    return {"losses": losses, "grad_rel": rel}


# ============================================================================= the parent


def run_child(args_list: list[str], timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True, env=env,
                       timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if r.returncode != 0 or not lines:
        sys.stderr.write(f"--- child {args_list} failed (exit {r.returncode})\n{r.stdout[-4000:]}\n"
                         f"{r.stderr[-6000:]}\n")
        raise SystemExit(1)
    return json.loads(lines[-1][len(RESULT_TAG):])


def pooled(rounds: list[dict], name: str) -> list[float]:
    return [v for r in rounds for v in r[name]]


def report(results: dict[str, list[dict]]) -> None:
    med = {k: statistics.median(pooled(r, "cpu")) for k, r in results.items()}
    rss = {k: max(x["peak_rss_gb"] for x in r) for k, r in results.items()}
    base = med.get("official")
    print(f"\n{'variant':<20} {'iters':>5} {'CPU s/iter':>10} {'min-max':>13} {'rounds':>6} {'wall s/it':>9} "
          f"{'/official':>9} {'RSS built':>9} {'peak RSS GB':>11}   params G / D")
    for key, rounds in results.items():
        cpu, meds = pooled(rounds, "cpu"), [statistics.median(r["cpu"]) for r in rounds]
        params = rounds[0]["params"]
        spread, wall = (max(meds) - min(meds)) / statistics.median(meds), statistics.median(pooled(rounds, "wall"))
        print(f"{VARIANTS[key].label:<20} {len(cpu):>5} {med[key]:>10.3f} {min(cpu):>6.3f}-{max(cpu):<6.3f} "
              f"{spread:>6.1%} {wall:>9.3f} {f'{med[key] / base:.3f}x' if base else '-':>9} "
              f"{max(r['built_rss_gb'] for r in rounds):>9.3f} "
              f"{rss[key]:>11.3f}   {params['G']:,} / {params['D']:,}")
    print("(rounds: spread of per-round medians; RSS built: peak after building networks and optimizers; "
          f"threads in the children: {sorted({r['threads'] for rounds in results.values() for r in rounds})})")

    sections: dict[str, dict[str, float]] = {}
    for key, rounds in results.items():
        for name in {n for r in rounds for n in r["sections"]}:
            values = [v for r in rounds for v in r["sections"].get(name, [])]
            sections.setdefault(name, {})[key] = statistics.median(values)
    order = ["prepare", "G phase: G forward", "G phase: D forward", "G phase: rest", "G phase: backward",
             "G phase: step", "D phase: G forward", "D phase: D forward", "D phase: rest", "D phase: backward",
             "D phase: step", "loop"]
    print("\nwhere the time goes (median process CPU s per section; 'step' is Adam, for ours with the engine's grad "
          "norm, checks, agreement and zero_grad):")
    print(f"  {'section':<36}" + "".join(f"{VARIANTS[k].label:>20}" for k in results))
    for name in sorted(sections, key=lambda n: next(i for i, o in enumerate(order + [""]) if n.startswith(o))):
        print(f"  {name:<36}" + "".join(f"{sections[name][k]:>20.4f}" if k in sections[name] else f"{'-':>20}"
                                        for k in results))

    print("\nratios (same run):")
    for key, target in TARGETS.items():
        if key in med and base:
            ratio, mem = med[key] / base, rss[key] / rss["official"]
            print(f"  {VARIANTS[key].label} / OFFICIAL fp32: CPU time {ratio:.3f}x (target <= {target}: "
                  f"{'MET' if ratio <= target else 'NOT MET'}), peak RSS {mem:.3f}x (target <= 1: "
                  f"{'MET' if mem <= 1 else 'NOT MET'}; {rss[key]:.3f} vs {rss['official']:.3f} GB)")
    if "ours-bf16" in med and "ours" in med:
        print(f"  OURS bf16 / OURS fp32: CPU time {med['ours-bf16'] / med['ours']:.1f}x, peak RSS "
              f"{rss['ours-bf16'] / rss['ours']:.3f}x")
    print(f"\nEXTERNAL reference, not measured here (the issue: official code, this config, this machine type, "
          f"1 thread, same torch): {EXTERNAL_SEC} s CPU/iter")
    print("  " + ";  ".join(f"{VARIANTS[k].label} {med[k] / EXTERNAL_SEC:.3f}x" for k in med if k != "ours-bf16"))


def report_numerics(n: dict) -> None:
    print("\nnumerics: one iteration from the official initial weights (spectral-norm vectors converged), same batch")
    names = list(n["losses"]["official"])
    print(f"  {'':<28}" + "".join(f"{k:>13}" for k in names) + f"{'grad G rel':>12}{'grad D rel':>12}")
    for key, losses in n["losses"].items():
        label = "OFFICIAL, weights*(1+1e-7)" if key == "official-perturbed" else VARIANTS[key].label
        rel = "".join(f"{n['grad_rel'][f'{key}/{net}']:>12.3g}" if key != "official" else f"{'-':>12}"
                      for net in ("G", "D"))
        print(f"  {label:<28}" + "".join(f"{losses.get(k, math.nan):>13.7g}" for k in names) + rel)
    print("  (grad rel: ||g - g_official|| / ||g_official|| over all of G's or D's parameters. The perturbed official "
          "run is the noise floor: G's batch norms over a 2x4 map at batch 1 amplify rounding in its backward, and "
          "D's gradients follow G's update, which Adam's first step makes ~lr * sign(g). With reuse_fake, D_Fake "
          "and D's gradients differ by design: D scores the fake of G before its update.)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", default=os.environ.get("SPADE_OFFICIAL", "/work/spade-official"),
                   help="an export of NVlabs/SPADE (default: $SPADE_OFFICIAL or /work/spade-official)")
    p.add_argument("--rounds", type=int, default=2, help="every variant runs once per round, order rotated")
    p.add_argument("--warmup", type=int, default=2, help="warm-up iterations per child")
    p.add_argument("--measure", type=int, default=8, help="measured iterations over all rounds")
    p.add_argument("--bf16-warmup", type=int, default=1, help="bf16 (first round only): warm-up iterations")
    p.add_argument("--bf16-measure", type=int, default=1, help="bf16 (first round only): measured iterations")
    p.add_argument("--quick", action="store_true", help="1 round, 1 warm-up + 2 measured")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--no-numerics", action="store_true", help="skip the one-iteration numerics check")
    p.add_argument("--child", choices=[*VARIANTS, "numerics"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.measure = 1, 1, 2
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        torch.set_num_threads(1)
        if args.child == "numerics":
            result = child_numerics(args.official, [v for v in args.variants if v in ("ours", "ours-no-reuse")])
        else:
            result = child_measure(args.child, args.warmup, args.measure, args.official)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    common = ["--official", args.official]
    start_load, start = os.getloadavg(), time.perf_counter()  # load before this benchmark adds its own
    print("SPADE training-iteration benchmark (bench/spade_step.py)")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in start_load)}   cpus: {os.cpu_count()}   torch "
          f"{torch.__version__}   python {platform.python_version()}   cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}   official code: {args.official}")
    print(f"config: label_nc {LABEL_NC} + edges, {W}x{H}, ngf 32, ndf 32, more, spectral SPADE + batch norm, num_D 2, "
          "n_layers_D 4, spectralinstance D, hinge, FM 10, no VGG, no VAE, batch 1, TTUR Adam (1e-4, 4e-4, 0, 0.9)")
    per = math.ceil(args.measure / args.rounds)
    print(f"a fresh child process per variant and round, 1 thread; {args.rounds} round(s) of {args.warmup} warm-up + "
          f"{per} measured iterations (bf16: {args.bf16_warmup} + {args.bf16_measure}, first round only)")
    results: dict[str, list[dict]] = {k: [] for k in args.variants}
    for r in range(args.rounds):
        k = r % len(args.variants)
        for key in args.variants[k:] + args.variants[:k]:
            bf16 = VARIANTS[key].precision == "bf16"
            if bf16 and r > 0:
                continue
            warmup, measure = (args.bf16_warmup, args.bf16_measure) if bf16 else (args.warmup, per)
            t0 = time.perf_counter()
            results[key].append(run_child(["--child", key, "--warmup", str(warmup), "--measure", str(measure),
                                           *common], 3600))
            print(f"  round {r + 1}: {VARIANTS[key].label:<20} {time.perf_counter() - t0:6.1f} s wall", flush=True)
    report(results)
    if not args.no_numerics and "official" in args.variants:
        report_numerics(run_child(["--child", "numerics", "--variants", ",".join(args.variants), *common], 1800))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
