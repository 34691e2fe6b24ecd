"""pix2pix training iteration: the training loop's own iteration against the official code.

The config: the official facades command (``python train.py --model pix2pix --direction BtoA``,
``OFFICIAL_ARGS``) and ours (``OURS_ARGS``, the ``pix2pix`` family's defaults, which are the
official ones): unet_256 G with batch norm and dropout, 70x70 PatchGAN D with batch norm, vanilla
GAN + 100 L1, Adam(2e-4, 0.5, 0.999), batch 1, 256x256, no image pool. The batch is a random
uint8 input/target pair as our stream hands it over.

- ``official fp32``: the junyanz/pytorch-CycleGAN-and-pix2pix code itself, imported from
  ``--official`` (an export kept outside this repository; default ``$PIX2PIX_OFFICIAL`` or
  /work/p2p-official): its own option parser (``TrainOptions.gather_options``; ``parse()``'s
  post-processing restated without its printing and option file), ``create_model``, and one
  iteration of its ``train.py``: ``model.set_input(data); model.optimize_parameters()`` (G forward,
  D's step on the detached fake and the real pair, then G's step against the updated D with D
  frozen). Its optimizers are what torch gives ``torch.optim.Adam`` by default on CPU tensors (the
  per-parameter loop). ``model.setup`` (schedulers, stepped once per epoch, and the network
  printout) is not called. No official file is edited.
- ``ours fp32``: ``loop.run_iteration`` over the pix2pix family's phases (D's step, then G's on
  the same batch and fake, as officially), see ``loop_iteration.LoopIteration``. ``ours bf16``:
  the same under CPU bf16 autocast (only where the CPU computes bf16 natively, by default).
- ``ours for-loop Adam`` (``--variants``): ours with ``optim.adam=for-loop``, to separate the
  optimizer's share from the rest.

Measured as ``bench/spade_step.py`` (``loop_iteration``): a fresh child per variant and round,
1 thread, process CPU time per iteration, rounds with the order rotated, medians pooled, ratios
against the official code in the same run.

Numerics (a child of its own): one iteration of each side from the official initial weights on the
same batch with the same seed (so G's dropout draws the same masks): the four losses, and the
gradients each step applies, against the official ones.

    .venv/bin/python bench/pix2pix_step.py                   # 2 rounds, median of 8, ~5 min
    .venv/bin/python bench/pix2pix_step.py --quick --variants official,ours
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys

import loop_iteration
import torch
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

sys.path.insert(0, str(REPO))  # runnable from a checkout; the official child imports nothing from it

TARGETS = {"ours": 0.85, "ours-bf16": 0.55}  # issue #23's pix2pixHD targets, reported for pix2pix too
SIZE, SEED = 256, 0
OFFICIAL_ARGS = [  # the facades command of the official README, on CPU
    "--dataroot", "unused", "--name", "bench", "--model", "pix2pix", "--direction", "BtoA", "--gpu_ids", "-1",
]
OURS_ARGS = ["train.batch_size=1", "train.precision=fp32", "train.channels_last=false", "optim.grad_clip=0"]
VARIANTS = {
    "official": Variant("OFFICIAL fp32", "official"),
    "ours": Variant("OURS fp32", "ours"),
    "ours-bf16": Variant("OURS bf16", "ours", "bf16"),
    "ours-for-loop": Variant("OURS for-loop Adam", "ours", overrides=("optim.adam=for-loop",)),
}


def make_batch(seed: int = SEED) -> dict:
    """A collated paired batch as our stream delivers it: ``input`` and ``image``, uint8 [1, 3, H, W]."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(0, 256, (1, 3, SIZE, SIZE), generator=g, dtype=torch.uint8) for k in ("input", "image")}


# ============================================================================= OFFICIAL


def import_official(path: str) -> None:
    put_official_on_path(path, "models/pix2pix_model.py", "Make a pytorch-CycleGAN-and-pix2pix export with: mkdir -p "
                         f"{path} && git -C <its git dir> archive HEAD models options util data | tar -x -C {path}")


class Official:
    """One iteration of the official ``train.py`` loop body."""

    def __init__(self, path: str):
        import_official(path)
        from models import create_model
        from options.train_options import TrainOptions

        saved, sys.argv = sys.argv, ["train.py", *OFFICIAL_ARGS]
        try:
            opt = TrainOptions().gather_options()
        finally:
            sys.argv = saved
        opt.isTrain = True
        opt.gpu_ids = [int(i) for i in opt.gpu_ids.split(",") if int(i) >= 0]
        torch.manual_seed(SEED)
        with contextlib.redirect_stdout(io.StringIO()):  # its init messages
            self.model = create_model(opt)
        self.nets = {"G": self.model.netG, "D": self.model.netD}
        self.optimizers = {"G": self.model.optimizer_G, "D": self.model.optimizer_D}
        self.stamper = Stamper()

    def hook(self, stamper: Stamper) -> None:
        self.stamper = stamper
        stamp_forwards(stamper, self.nets)
        stamp_optimizers(stamper, self.optimizers)
        self.optimizers["D"].register_step_post_hook(lambda o, a, k: setattr(stamper, "phase", "G"))

    def iteration(self, raw: dict, stamper: Stamper) -> None:
        # ours' floats; with --direction BtoA the official real_A (G's input) is data["B"]
        floats = {k: raw[k].float().mul_(1 / 127.5).sub_(1.0) for k in ("image", "input")}
        data = {"A": floats["image"], "B": floats["input"], "A_paths": ["bench"], "B_paths": ["bench"]}
        stamper("prepare / loader handover")
        stamper.phase = "D"
        self.model.set_input(data)
        self.model.optimize_parameters()

    def losses(self) -> dict[str, float]:
        return dict(self.model.get_current_losses())


# ============================================================================= children


def make_runner(key: str, official: str):
    v = VARIANTS[key]
    if v.kind == "official":
        return Official(official)
    from pipeline.train.family import DataInfo

    info = DataInfo("paired", None, ("input", "image"))
    return LoopIteration("pix2pix", [*OURS_ARGS, *v.overrides], info, v.precision, SEED)


def child_numerics(official: str, keys: list[str]) -> dict:
    """One iteration of the official code and of each of ``keys`` from the official initial
    weights, same batch, same seed: losses, and each step's gradients against the official ones."""
    state: dict = {}
    losses, grads = {}, {}
    for key in ["official", *keys]:
        runner = make_runner(key, official)
        grads[key] = {}
        if key == "official":
            state = {n: {k: v.clone() for k, v in net.state_dict().items()} for n, net in runner.nets.items()}
            for name, opt in runner.optimizers.items():
                params = [p for g in opt.param_groups for p in g["params"]]
                opt.register_step_pre_hook(lambda o, a, k, name=name, params=params, out=grads[key]: out.__setitem__(
                    name, [p.grad.detach().clone() for p in params]))
        else:
            for name, net in runner.nets.items():
                load_official_state(net, state[name])
            for engine in runner.engines.values():
                engine.capture = grads[key]
        torch.manual_seed(SEED + 1)  # the dropout masks
        runner.iteration(make_batch(), Stamper())
        losses[key] = runner.losses()
    return {"losses": losses, "grad_rel": grad_rel(grads, keys)}


# ============================================================================= the parent


def report(results: dict[str, list[dict]]) -> None:
    order = ["prepare", "D phase: G forward", "D phase: D forward", "D phase: rest", "D phase: backward",
             "D phase: step", "G phase: G forward", "G phase: D forward", "G phase: rest", "G phase: backward",
             "G phase: step", "loop"]
    loop_iteration.report(results, VARIANTS, TARGETS, order)


def report_numerics(n: dict) -> None:
    print("\nnumerics: one iteration from the official initial weights, same batch, same dropout masks")
    names = list(n["losses"]["official"])
    print(f"  {'':<22}" + "".join(f"{k:>13}" for k in names) + f"{'grad G rel':>12}{'grad D rel':>12}")
    for key, losses in n["losses"].items():
        rel = "".join(f"{n['grad_rel'][f'{key}/{net}']:>12.3g}" if key != "official" else f"{'-':>12}"
                      for net in ("G", "D"))
        print(f"  {VARIANTS[key].label:<22}" + "".join(f"{losses.get(k, math.nan):>13.7g}" for k in names) + rel)
    print("  (grad rel: ||g - g_official|| / ||g_official|| over all of G's or D's parameters; bf16 differs by its "
          "rounding)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    loop_iteration.add_arguments(p, VARIANTS, ("PIX2PIX_OFFICIAL", "/work/p2p-official",
                                               "junyanz/pytorch-CycleGAN-and-pix2pix"), None)
    args = p.parse_args(argv)
    if args.variants is None:  # bf16 only where the CPU computes it natively
        from pipeline.train.loop import native_bf16

        args.variants = "official,ours" + (",ours-bf16" if native_bf16("cpu") else "")
    return loop_iteration.checked(p, args, VARIANTS)


def main(argv=None) -> int:
    config = (f"unet_256 + batch norm + dropout, basic PatchGAN, vanilla GAN + 100 L1, {SIZE}x{SIZE}, batch 1, "
              "Adam(2e-4, 0.5, 0.999), no image pool")
    return loop_iteration.drive(parse_args(argv), __file__, "pix2pix training-iteration benchmark", config, VARIANTS,
                                make_runner, make_batch, child_numerics, report, report_numerics)


if __name__ == "__main__":
    sys.exit(main())
