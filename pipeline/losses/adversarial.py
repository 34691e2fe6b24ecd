"""GAN objectives (vanilla, LSGAN, hinge, WGAN; the relativistic pairing RpGAN) as plain functions
of D's logits, reduced in fp32.

Logits are one tensor or a multiscale D's output in pix2pixHD's shape (per scale, a list of
features whose last element is the logits); scales are summed as the official pix2pixHD does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, TypeAlias

import torch.nn.functional as F
from torch import Tensor

ADVERSARIAL_KINDS: tuple[str, ...] = ("vanilla", "lsgan", "hinge", "wgan")
SCALE_REDUCTIONS: tuple[str, ...] = ("sum", "mean")

# What a discriminator may return: logits, [feat_1, ..., logits], or one such list per scale.
DOutput: TypeAlias = Tensor | Sequence[Tensor] | Sequence[Sequence[Tensor]]
ScaleReduction: TypeAlias = Literal["sum", "mean"]

_PerScale = Callable[[Tensor], Tensor]

# Per-scale losses on fp32 logits x [N, ...]; each is the mean over every element of x.
# vanilla uses softplus: softplus(-x) = -log(sigmoid(x)) and softplus(x) = -log(1 - sigmoid(x)),
# i.e. BCE-with-logits to 1 / 0 without the overflow of sigmoid-then-log.
_D_REAL: dict[str, _PerScale] = {
    "vanilla": lambda x: F.softplus(-x).mean(),
    "lsgan": lambda x: (x - 1).square().mean(),
    "hinge": lambda x: F.relu(1 - x).mean(),
    "wgan": lambda x: -x.mean(),
}
_D_FAKE: dict[str, _PerScale] = {
    "vanilla": lambda x: F.softplus(x).mean(),
    "lsgan": lambda x: x.square().mean(),
    "hinge": lambda x: F.relu(1 + x).mean(),
    "wgan": lambda x: x.mean(),
}
# G: non-saturating for vanilla (pix2pix/pix2pixHD/StyleGAN2 all train G toward "real").
_G: dict[str, _PerScale] = {
    "vanilla": lambda x: F.softplus(-x).mean(),
    "lsgan": lambda x: (x - 1).square().mean(),
    "hinge": lambda x: -x.mean(),
    "wgan": lambda x: -x.mean(),
}


def final_logits(outputs: DOutput) -> list[Tensor]:
    """The logits of every scale of a discriminator output, in scale order.

    - a tensor ``[N, ...]`` is the logits of one D;
    - a flat list ``[feat_1, ..., logits]`` is one D that also returns intermediate features
      (pix2pixHD ``getIntermFeat``): only its last element is used;
    - a list of lists is pix2pixHD's ``MultiscaleDiscriminator`` output: the last element of each
      inner list is that scale's logits.
    """
    if isinstance(outputs, Tensor):
        return [outputs]
    if not isinstance(outputs, (list, tuple)) or len(outputs) == 0:
        raise TypeError(f"D output must be a tensor or a non-empty list of tensors / lists, got {_describe(outputs)}")
    if isinstance(outputs[0], (list, tuple)):
        per_scale = []
        for i, scale in enumerate(outputs):
            if not isinstance(scale, (list, tuple)) or len(scale) == 0:
                raise TypeError(f"D output scale {i}: expected a non-empty list of tensors, got {_describe(scale)}")
            per_scale.append(scale[-1])
    else:
        per_scale = [outputs[-1]]
    for i, logits in enumerate(per_scale):
        if not isinstance(logits, Tensor):
            raise TypeError(f"D output scale {i}: logits must be a tensor, got {_describe(logits)}")
    return per_scale


def d_loss_real(kind: str, real_logits: DOutput, *, scale_reduction: ScaleReduction = "sum") -> Tensor:
    """D's loss on real samples (pix2pixHD's ``D_real``): a scalar fp32 tensor."""
    return _reduce(_lookup(_D_REAL, kind), real_logits, scale_reduction)


def d_loss_fake(kind: str, fake_logits: DOutput, *, scale_reduction: ScaleReduction = "sum") -> Tensor:
    """D's loss on generated samples (pix2pixHD's ``D_fake``): a scalar fp32 tensor."""
    return _reduce(_lookup(_D_FAKE, kind), fake_logits, scale_reduction)


def d_loss(
    kind: str, real_logits: DOutput, fake_logits: DOutput, *, scale_reduction: ScaleReduction = "sum"
) -> tuple[Tensor, Tensor]:
    """D's losses ``(D_real, D_fake)``, separate so the loop can log both; fp32 scalars.

    Logits ``[N, ...]`` (e.g. ``[N]`` or PatchGAN ``[N, 1, H, W]``) in any float dtype, or a
    multiscale output (see :func:`final_logits`). Each scale's loss is the mean over all its
    elements; scales are then summed (``scale_reduction="sum"``, official pix2pixHD ``GANLoss``)
    or averaged (``"mean"``, official SPADE ``GANLoss``). pix2pixHD's ``train.py`` then optimizes
    ``(D_fake + D_real) * 0.5``; that weighting is the caller's.

    - vanilla: ``softplus(-real)``, ``softplus(fake)`` (BCE-with-logits to 1 and 0)
    - lsgan:   ``(real - 1)^2``, ``fake^2`` (MSE to 1 and 0)
    - hinge:   ``relu(1 - real)``, ``relu(1 + fake)``
    - wgan:    ``-real``, ``fake`` (their sum is the critic loss ``E[D(fake)] - E[D(real)]``)
    """
    return (
        d_loss_real(kind, real_logits, scale_reduction=scale_reduction),
        d_loss_fake(kind, fake_logits, scale_reduction=scale_reduction),
    )


def g_loss(kind: str, fake_logits: DOutput, *, scale_reduction: ScaleReduction = "sum") -> Tensor:
    """G's adversarial loss (pix2pixHD's ``G_GAN``): a scalar fp32 tensor.

    vanilla: non-saturating ``softplus(-fake)``; lsgan: ``(fake - 1)^2``; hinge and wgan:
    ``-fake``. Reduced over elements and scales as in :func:`d_loss`.
    """
    return _reduce(_lookup(_G, kind), fake_logits, scale_reduction)


def _lookup(table: dict[str, _PerScale], kind: str) -> _PerScale:
    if kind not in table:
        raise ValueError(f"unknown adversarial loss kind {kind!r}; allowed: {', '.join(ADVERSARIAL_KINDS)}")
    return table[kind]


def _reduce(per_scale: _PerScale, outputs: DOutput, scale_reduction: str) -> Tensor:
    if scale_reduction not in SCALE_REDUCTIONS:
        raise ValueError(f"unknown scale_reduction {scale_reduction!r}; allowed: {', '.join(SCALE_REDUCTIONS)}")
    # Logits may be bf16/fp16 from autocast; the loss and its gradient are computed in fp32.
    losses = [per_scale(logits.float()) for logits in final_logits(outputs)]
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total / len(losses) if scale_reduction == "mean" else total


def _describe(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def rpgan_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """D's relativistic pairing loss (RpGAN: Jolicoeur-Martineau 2019; the R3GAN baseline of Huang
    et al. 2024, Eq. 2): ``mean softplus(-(D(x_i) - D(G(z_i))))`` over paired samples i, fp32."""
    if real_logits.shape != fake_logits.shape:
        raise ValueError(f"RpGAN pairs reals with fakes: logits {list(real_logits.shape)} and "
                         f"{list(fake_logits.shape)} must have one shape")
    return F.softplus(fake_logits.float() - real_logits.float()).mean()


def rpgan_g_loss(fake_logits: Tensor, real_logits: Tensor) -> Tensor:
    """G's side of :func:`rpgan_d_loss`: ``mean softplus(-(D(G(z_i)) - D(x_i)))``, fp32."""
    return rpgan_d_loss(fake_logits, real_logits)
