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
import io
import math
import sys
import types

import loop_iteration
import torch
import torch.nn.functional as F
from loop_iteration import (
    REPO,
    LoopIteration,
    Stamper,
    Variant,
    grad_rel,
    load_official_state,
    put_official_on_path,
    stamp_forwards,
    stamp_optimizers,
)
from torch import nn

sys.path.insert(0, str(REPO))  # runnable from a checkout; the official child imports nothing from it

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


VARIANTS = {
    "official": Variant("OFFICIAL fp32", "official"),
    "ours": Variant("OURS fp32", "ours", overrides=("model.reuse_fake=true",)),
    "ours-no-reuse": Variant("OURS fp32 no-reuse", "ours", overrides=("model.reuse_fake=false",)),
    "ours-bf16": Variant("OURS bf16", "ours", "bf16", ("model.reuse_fake=true",)),
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


# ============================================================================= OFFICIAL: NVlabs/SPADE


def import_official(path: str) -> None:
    """Make the official modules importable from ``path``, with the two stubs of the docstring."""
    put_official_on_path(path, "trainers/pix2pix_trainer.py", f"Make an NVlabs/SPADE export with: mkdir -p {path} && "
                         f"git -C <SPADE git dir> archive HEAD models options trainers util data | tar -x -C {path}")

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
        stamp_optimizers(stamper, self.optimizers)

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


# ============================================================================= children


def make_runner(key: str, official: str):
    v = VARIANTS[key]
    if v.kind == "official":
        return Official(official)
    from pipeline.train.family import DataInfo

    info = DataInfo("label2image", LABEL_NC, ("image", "label", "instance"))
    return LoopIteration("spade", [*OURS_ARGS, *v.overrides], info, v.precision, SEED)


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


def child_numerics(official: str, keys: list[str]) -> dict:
    """One iteration of the official code (from converged and from perturbed weights) and of each
    of ``keys`` (from the official weights): losses, and each step's gradients against official."""
    keys = [k for k in keys if VARIANTS[k].precision == "fp32"]
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
    return {"losses": losses, "grad_rel": grad_rel(grads, ["official-perturbed", *keys])}


# ============================================================================= the parent


def report(results: dict[str, list[dict]]) -> None:
    order = ["prepare", "G phase: G forward", "G phase: D forward", "G phase: rest", "G phase: backward",
             "G phase: step", "D phase: G forward", "D phase: D forward", "D phase: rest", "D phase: backward",
             "D phase: step", "loop"]
    med = loop_iteration.report(results, VARIANTS, TARGETS, order)
    if "ours-bf16" in med and "ours" in med:
        rss = {k: max(x["peak_rss_gb"] for x in r) for k, r in results.items()}
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
    loop_iteration.add_arguments(p, VARIANTS, ("SPADE_OFFICIAL", "/work/spade-official", "NVlabs/SPADE"),
                                 ",".join(VARIANTS))
    p.add_argument("--bf16-warmup", type=int, default=1, help="bf16 (first round only): warm-up iterations")
    p.add_argument("--bf16-measure", type=int, default=1, help="bf16 (first round only): measured iterations")
    return loop_iteration.checked(p, p.parse_args(argv), VARIANTS)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = (f"label_nc {LABEL_NC} + edges, {W}x{H}, ngf 32, ndf 32, more, spectral SPADE + batch norm, num_D 2, "
              "n_layers_D 4, spectralinstance D, hinge, FM 10, no VGG, no VAE, batch 1, TTUR Adam (1e-4, 4e-4, 0, 0.9)")
    return loop_iteration.drive(args, __file__, "SPADE training-iteration benchmark", config, VARIANTS, make_runner,
                                make_batch, child_numerics, report, report_numerics,
                                (args.bf16_warmup, args.bf16_measure))


if __name__ == "__main__":
    sys.exit(main())
