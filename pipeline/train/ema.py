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


def make_ema(G: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of G in evaluation mode."""
    G_ema = copy.deepcopy(G).eval()
    G_ema.requires_grad_(False)
    return G_ema


@torch.no_grad()
def update_ema(G_ema: torch.nn.Module, G: torch.nn.Module, beta: float) -> None:
    """``G_ema = beta * G_ema + (1 - beta) * G`` for parameters; buffers are copied."""
    ema_params = list(G_ema.parameters())
    params = [p.detach() for p in G.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - beta)
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)
