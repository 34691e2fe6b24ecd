"""Exponential moving average of G, with the decay given as a half-life in kimg (StyleGAN2-ADA)."""

from __future__ import annotations

import copy

import torch


def ema_beta(batch_size: int, nimg: int, halflife_kimg: float, rampup: float | None) -> float:
    """Per-step decay for a step of ``batch_size`` images after ``nimg`` images.

    With a ramp-up the half-life is capped at ``rampup * nimg``, so early averages are not
    dominated by the random initial weights.
    """
    if halflife_kimg <= 0:
        return 0.0
    halflife_nimg = halflife_kimg * 1000
    if rampup is not None:
        halflife_nimg = min(halflife_nimg, nimg * rampup)
    if halflife_nimg <= 0:
        return 0.0
    return 0.5 ** (batch_size / halflife_nimg)


def make_ema(net: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``net`` in evaluation mode."""
    copied = copy.deepcopy(net).eval()
    copied.requires_grad_(False)
    return copied


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """``ema = beta * ema + (1 - beta) * net`` for parameters; buffers are copied."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in net.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)
