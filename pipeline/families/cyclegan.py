"""CycleGAN (Zhu et al. 2017): two ResNet generators (G_A: A→B, the paper's G; G_B: B→A, its F),
two 70×70 PatchGANs (D_A judges domain B, D_B domain A), LSGAN, cycle consistency λ=10 and
identity 0.5·λ, fakes scored by D from a pool of 50 earlier ones per rank.

Follows the official ``cycle_gan_model.py`` and its defaults: one Adam(2e-4, 0.5, 0.999) over both
generators and one over both discriminators; each iteration one forward of both cycles, G's step
with the discriminators frozen, then D's step on pooled fakes of that forward. Loss names are the
official ones: G_A, G_B, cycle_A, cycle_B, idt_A, idt_B, D_A, D_B. The two domains are the shard
splits ``<data.split>A``/``<data.split>B`` (trainA, trainB), drawn independently, each resuming
from its own position; evaluation translates ``<data.val_split>A`` and ``B`` (testA, testB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import Config, ModelConfig, bounded, choice
from ..data.device import float_image
from ..losses.adversarial import d_loss, g_loss
from ..models.cyclegan import resnet_generator
from ..models.layers import init_weights
from ..models.pix2pix import NLayerDiscriminator
from ..train.family import DataInfo, Evaluation, Family, Network, Optimizer, Phase, StepContext, Stream


@dataclass
class CycleGANConfig(ModelConfig):
    family: str = "cyclegan"
    generator: str = choice("resnet_9blocks", "resnet_9blocks", "resnet_6blocks")  # netG: 9 at 256, 6 at 128
    ngf: int = bounded(64, 1)
    ndf: int = bounded(64, 1)
    n_layers_D: int = bounded(3, 1, 8)  # netD basic: the 70x70 PatchGAN
    gan: str = choice("lsgan", "lsgan", "vanilla")  # gan_mode
    lambda_A: float = bounded(10.0, 0.0)  # cycle A -> B -> A
    lambda_B: float = bounded(10.0, 0.0)  # cycle B -> A -> B
    lambda_identity: float = bounded(0.5, 0.0)  # identity loss, times lambda_A / lambda_B; 0 is off
    pool_size: int = bounded(50, 0, 10000)  # fakes kept per domain and rank for D; 0: no pool
    lr_G: float = bounded(2e-4, 0.0)
    lr_D: float = bounded(2e-4, 0.0)
    beta1: float = bounded(0.5, 0.0, 1.0)
    beta2: float = bounded(0.999, 0.0, 1.0)


def build(cfg: Config, info: DataInfo) -> dict:
    if info.task != "unpaired":
        raise ValueError(f"cyclegan trains on unpaired shards (splits trainA, trainB, testA, testB: gan-shard write "
                         f"unpaired ...), not {info.task!r}")
    m = cfg.model
    blocks = {"resnet_9blocks": 9, "resnet_6blocks": 6}[m.generator]

    def discriminator():
        return init_weights(NLayerDiscriminator(input_nc=3, ndf=m.ndf, n_layers=m.n_layers_D, norm="instance"))

    return {"G_A": resnet_generator(ngf=m.ngf, n_blocks=blocks), "G_B": resnet_generator(ngf=m.ngf, n_blocks=blocks),
            "D_A": discriminator(), "D_B": discriminator()}


def streams(cfg: Config, info: DataInfo, split: str) -> tuple[Stream, ...]:
    return (Stream("A", f"{split}A", ("image",)), Stream("B", f"{split}B", ("image",)))


def prepare(batches: dict[str, dict], device: torch.device, cfg: Config, info: DataInfo) -> dict:
    """``A``, ``B``: [N, 3, H, W] in [-1, 1], one per stream given."""
    out = {}
    for name, batch in batches.items():
        image = float_image(batch["image"].to(device, non_blocking=True))
        out[name] = image.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else image
    return out


def pool_query(state: dict, key: str, images: torch.Tensor, size: int) -> torch.Tensor:
    """The official ``ImagePool.query``: until ``size`` fakes are stored, each new one is stored
    and returned; then with p = 0.5 a stored one is returned and replaced by the new one, else the
    new one is returned. The pool is per rank and lives in the family state (checkpointed); the
    draws come from the rank's torch RNG (checkpointed too), not Python's ``random``."""
    images = images.detach().float()
    if size == 0:
        return images
    pool = state.get(key)
    if pool is None or pool.shape[1:] != images.shape[1:]:
        pool = state[key] = images.new_zeros((size, *images.shape[1:]))
        state[f"{key}_count"] = torch.zeros((), dtype=torch.long, device=images.device)
    count = state[f"{key}_count"]
    out = []
    for image in images:
        stored = int(count)
        if stored < size:
            pool[stored] = image
            count += 1
            out.append(image)
        elif float(torch.rand(())) > 0.5:
            j = int(torch.randint(size, ()))
            out.append(pool[j].clone())
            pool[j] = image
        else:
            out.append(image)
    return torch.stack(out)


def g_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    m, G_A, G_B = ctx.cfg.model, ctx.nets["G_A"], ctx.nets["G_B"]
    real_A, real_B = b["A"], b["B"]
    with ctx.autocast():
        fake_B, fake_A = G_A(real_A), G_B(real_B)
        rec_A, rec_B = G_B(fake_B), G_A(fake_A)
        logits_B, logits_A = ctx.plain["D_A"](fake_B), ctx.plain["D_B"](fake_A)  # both D frozen
        if m.lambda_identity > 0:
            idt_A, idt_B = G_A(real_B), G_B(real_A)
    scratch["fake_B"], scratch["fake_A"] = fake_B.detach(), fake_A.detach()

    def l1(x, y):
        return F.l1_loss(x.float(), y.float())

    t = {"G_A": g_loss(m.gan, logits_B), "G_B": g_loss(m.gan, logits_A),
         "cycle_A": l1(rec_A, real_A) * m.lambda_A, "cycle_B": l1(rec_B, real_B) * m.lambda_B}
    if m.lambda_identity > 0:
        t["idt_A"] = l1(idt_A, real_B) * m.lambda_B * m.lambda_identity
        t["idt_B"] = l1(idt_B, real_A) * m.lambda_A * m.lambda_identity
    return {"loss": sum(t.values()), **t}


def d_step(ctx: StepContext, b: dict, scratch: dict) -> dict:
    m = ctx.cfg.model
    fake_B = pool_query(ctx.state, "fake_B_pool", scratch.pop("fake_B"), m.pool_size)
    fake_A = pool_query(ctx.state, "fake_A_pool", scratch.pop("fake_A"), m.pool_size)
    with ctx.autocast():
        real_B_logits, fake_B_logits = ctx.nets["D_A"](b["B"]), ctx.nets["D_A"](fake_B)
        real_A_logits, fake_A_logits = ctx.nets["D_B"](b["A"]), ctx.nets["D_B"](fake_A)
    d_A = 0.5 * sum(d_loss(m.gan, real_B_logits, fake_B_logits))
    d_B = 0.5 * sum(d_loss(m.gan, real_A_logits, fake_A_logits))
    return {"loss": d_A + d_B, "D_A": d_A, "D_B": d_B}


def optimizers(cfg: Config) -> tuple[Optimizer, ...]:
    m = cfg.model
    return (Optimizer("G", ("G_A", "G_B"), m.lr_G, (m.beta1, m.beta2)),
            Optimizer("D", ("D_A", "D_B"), m.lr_D, (m.beta1, m.beta2)))


def evaluations(cfg: Config, info: DataInfo, split: str) -> tuple[Evaluation, ...]:
    a, b = streams(cfg, info, split)
    return (Evaluation("AtoB", reference=b.split, generate=lambda nets, x: nets["G_A"](x["A"]), inputs=a),
            Evaluation("BtoA", reference=a.split, generate=lambda nets, x: nets["G_B"](x["B"]), inputs=b))


@torch.no_grad()
def visualize(nets: dict, b: dict, info: DataInfo) -> list[torch.Tensor]:
    """Columns: A | G_A(A) | G_B(G_A(A)) | B | G_B(B) | G_A(G_B(B)), [N, 3, H, W] in [-1, 1]."""
    n = min(len(b["A"]), len(b["B"]))
    real_A, real_B = b["A"][:n], b["B"][:n]
    fake_B, fake_A = nets["G_A"](real_A).float(), nets["G_B"](real_B).float()
    return [real_A, fake_B, nets["G_B"](fake_B).float(), real_B, fake_A, nets["G_A"](fake_A).float()]


FAMILY = Family(
    name="cyclegan",
    config=CycleGANConfig,
    build=build,
    networks=(Network("G_A", ema=True, snapshot=True), Network("G_B", ema=True, snapshot=True),
              Network("D_A"), Network("D_B")),
    optimizers=optimizers,
    phases=lambda cfg: (Phase("G", ("G",), g_step), Phase("D", ("D",), d_step, fetch=False)),
    streams=streams,
    prepare=prepare,
    evaluations=evaluations,
    visualize=visualize,
)
