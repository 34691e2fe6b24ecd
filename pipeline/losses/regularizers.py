"""Regularizers: WGAN-GP gradient penalty, R1 and R2 penalties, WGAN weight clipping and instance
noise for D; the VAE's KL divergence for an encoder (SPADE, BicycleGAN).

Penalties differentiate D w.r.t. its input in fp32 with autocast off, and keep the graph
(``create_graph=True``) so their backward reaches D's parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from pipeline.losses.adversarial import DOutput, final_logits

# D as a function of its (image) input only, so a conditional D is passed as
# ``lambda x: D(torch.cat([label, x], dim=1))`` and the penalty never touches the condition.
DFn = Callable[[Tensor], DOutput]


def gradient_penalty(
    D_fn: DFn,
    real: Tensor,
    fake: Tensor,
    *,
    center: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """WGAN-GP penalty (Gulrajani et al. 2017, eq. 3), unweighted: a scalar fp32 tensor.

    ``x_hat = real + alpha * (fake - real)`` with one ``alpha ~ U[0, 1)`` per sample, then
    ``mean_i (||grad_x D(x_hat)_i||_2 - center)^2`` over the batch; the norm is over all
    non-batch dimensions. The caller multiplies by lambda (10 in the paper). ``center=0`` gives
    the zero-centered variant.

    Args:
        D_fn: ``x [N, ...] -> logits [N, ...]`` (or a multiscale output, see
            ``final_logits``; the logits of all scales are summed before differentiating).
            Samples must not interact inside D (no BatchNorm), else the per-sample gradient mixes.
        real, fake: ``[N, C, H, W]`` (any shape ``[N, ...]``, the same for both), any float
            dtype; both are detached.
        generator: draws ``alpha``; must live on ``real.device``. ``None`` uses the global RNG.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have the same shape, got {tuple(real.shape)} and {tuple(fake.shape)}")
    alpha_shape = (real.shape[0],) + (1,) * (real.ndim - 1)
    alpha = torch.rand(alpha_shape, generator=generator, device=real.device, dtype=torch.float32)
    with torch.autocast(device_type=real.device.type, enabled=False):
        x_hat = torch.lerp(real.detach().float(), fake.detach().float(), alpha).requires_grad_(True)
        norms = _input_grad(D_fn, x_hat).flatten(1).norm(p=2, dim=1)
        return (norms - center).square().mean()


def r1_penalty(D_fn: DFn, real: Tensor) -> Tensor:
    """R1 penalty (Mescheder et al. 2018), unweighted: ``mean_i ||grad_x D(real)_i||_2^2``, fp32 scalar.

    This is StyleGAN2-ADA's ``r1_penalty`` (``r1_grads.square().sum([1,2,3])``, per sample)
    averaged over the batch. The caller multiplies by ``gamma / 2`` (the paper's
    ``gamma/2 * E||grad||^2``), and by the regularization interval when applied lazily.

    Args:
        D_fn: ``x [N, ...] -> logits`` as in :func:`gradient_penalty`.
        real: ``[N, C, H, W]`` (any ``[N, ...]``), any float dtype; detached.
    """
    with torch.autocast(device_type=real.device.type, enabled=False):
        x = real.detach().float().requires_grad_(True)
        return _input_grad(D_fn, x).square().flatten(1).sum(dim=1).mean()


def zero_centred_penalty(logits: Tensor, inputs: Tensor) -> Tensor:
    """``||grad_x D(x)_i||_2^2`` per sample ``[N]``, differentiable w.r.t. D's parameters: R1 when
    ``inputs`` are the reals, R2 when they are the fakes (Roth et al. 2017; Mescheder et al.
    2018). ``logits`` ``[N]`` come from D on ``inputs``, which must require grad; run that
    forward in fp32 (the caller's autocast off) for the penalty's precision."""
    (grad,) = torch.autograd.grad(outputs=logits.float().sum(), inputs=inputs, create_graph=True)
    return grad.float().square().flatten(1).sum(dim=1)


def cosine_decay(start: float, end: float | None, nimg: int, total_nimg: float) -> float:
    """``start`` decayed along a half cosine to ``end`` over ``total_nimg`` images (``end`` None:
    constant), then held."""
    if end is None or total_nimg <= 0:
        return start
    t = min(max(nimg / total_nimg, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def weight_clip_(module: nn.Module, c: float) -> None:
    """Clamp every parameter of ``module`` to ``[-c, c]`` in place (original WGAN, Arjovsky et al.
    2017; ``c = 0.01`` in the paper). Call after each critic optimizer step."""
    if not c > 0:
        raise ValueError(f"clip value c must be > 0, got {c}")
    for param in module.parameters():
        param.clamp_(-c, c)


def _input_grad(D_fn: DFn, x: Tensor) -> Tensor:
    """``d sum(D_fn(x)) / dx`` [same shape as x], kept differentiable w.r.t. D's parameters.

    Summing over the batch gives each sample's own gradient, since sample i's logits depend
    only on x[i].
    """
    total = sum(logits.float().sum() for logits in final_logits(D_fn(x)))
    (grad,) = torch.autograd.grad(outputs=total, inputs=x, create_graph=True)
    return grad


def instance_noise(x: Tensor, sigma: float, span_kimg: float, nimg: int) -> Tensor:
    """``x`` plus Gaussian instance noise (Sønderby et al. 2017) whose sigma falls linearly from
    ``sigma`` at kimg 0 to 0 at ``span_kimg`` (constant when ``span_kimg`` is 0); ``x`` itself
    when the noise is off or over. Real and fake inputs of D both get it."""
    now = sigma if span_kimg <= 0 else sigma * max(0.0, 1.0 - nimg / (span_kimg * 1000))
    return x + now * torch.randn_like(x) if now > 0 else x


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) summed over the batch and the latent dimensions (Kingma & Welling
    2014, appendix B; SPADE's ``KLDLoss``): ``-0.5 · Σ(1 + log σ² - μ² - σ²)``, fp32 scalar.
    ``mu``, ``logvar`` [N, z_dim]."""
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * torch.sum(1 + logvar - mu.square() - logvar.exp())
