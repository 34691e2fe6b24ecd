"""Small pieces shared by the network families: the normalization factory, weight
initialization as in the official pix2pix/CycleGAN code, spectral normalization, and SAGAN's
self-attention block.
"""

from __future__ import annotations

import contextlib
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

NORM_KINDS = ("batch", "instance", "layer", "none")
INIT_KINDS = ("normal", "xavier", "kaiming", "orthogonal")

# Layers whose weight init_weights draws and spectral_norm wraps. Listed explicitly instead of
# matching "Conv" in the class name as the official code does, so a custom block named
# "...Conv..." is not touched by accident.
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)

M = TypeVar("M", bound=nn.Module)


def check_norm(kind: str) -> str:
    """Return ``kind`` if it names a normalization, else raise naming the allowed values."""
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm {kind!r}; expected one of {', '.join(NORM_KINDS)}")
    return kind


def norm_layer(kind: str, num_features: int) -> nn.Module:
    """A 2-D normalization over ``num_features`` channels of an ``[N, C, H, W]`` tensor.

    - ``"batch"``: ``BatchNorm2d`` with affine parameters and running statistics.
    - ``"instance"``: ``InstanceNorm2d(affine=False, track_running_stats=False)``, as the
      current official pix2pix/CycleGAN ``get_norm_layer``: statistics of the image at hand,
      in train and eval mode alike.
    - ``"layer"``: ``GroupNorm(1, C)``: each sample normalized over all of ``[C, H, W]`` with a
      per-channel scale and shift. This is the layer norm of the WGAN-GP code
      (``tflib/ops/layernorm.py`` with ``norm_axes=[1, 2, 3]``), and unlike ``nn.LayerNorm``
      it does not fix the spatial size at construction.
    - ``"none"``: ``nn.Identity``.
    """
    check_norm(kind)
    if kind == "batch":
        return nn.BatchNorm2d(num_features, affine=True, track_running_stats=True)
    if kind == "instance":
        return nn.InstanceNorm2d(num_features, affine=False, track_running_stats=False)
    if kind == "layer":
        return nn.GroupNorm(1, num_features, eps=1e-5, affine=True)
    return nn.Identity()


def norm_has_shift(kind: str) -> bool:
    """Whether ``norm_layer(kind, C)`` adds its own learned per-channel shift.

    A conv followed by such a norm gains nothing from a bias (the norm subtracts it and adds its
    own), so the official code leaves it out there; after instance norm without affine
    parameters, or no norm at all, the bias is the only shift and stays.
    """
    return check_norm(kind) in ("batch", "layer")


def _weight_to_init(module: nn.Module) -> nn.Parameter:
    # Under a parametrization (e.g. spectral norm) `module.weight` is recomputed on every access;
    # the trainable tensor is the original one.
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def init_weights(module: M, kind: str = "normal", gain: float = 0.02) -> M:
    """Initialize ``module`` and all its children in place, as the official pix2pix/CycleGAN
    ``init_weights`` (``models/networks.py``) does; returns ``module``.

    Conv and linear weights: ``"normal"`` draws N(0, gain) (the DCGAN and pix2pix init),
    ``"xavier"`` Xavier-normal with ``gain``, ``"kaiming"`` Kaiming-normal (fan-in, ``gain`` is
    not used), ``"orthogonal"`` orthogonal with ``gain``; their biases are set to 0. BatchNorm:
    weight N(1, gain), bias 0. Other layers keep their own defaults.

    Call it before ``spectral_norm``: the power-iteration vectors of spectral norm are estimated
    from the weight present when it is applied.
    """
    if kind not in INIT_KINDS:
        raise ValueError(f"unknown init {kind!r}; expected one of {', '.join(INIT_KINDS)}")
    for m in module.modules():
        if isinstance(m, _WEIGHTED):
            weight = _weight_to_init(m)
            if kind == "normal":
                nn.init.normal_(weight, 0.0, gain)
            elif kind == "xavier":
                nn.init.xavier_normal_(weight, gain=gain)
            elif kind == "kaiming":
                nn.init.kaiming_normal_(weight, a=0, mode="fan_in")
            else:
                nn.init.orthogonal_(weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _BatchNorm) and m.affine:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return module


class _SpectralScale(torch.autograd.Function):
    """``W / σ`` with ``σ = uᵀ W v`` (``u``, ``v`` constants), for a weight whose matrix is its
    ``dim`` moved first and the rest flattened. Its backward is the closed form
    ``∂L/∂W = (g − ⟨g, W⟩/σ · u vᵀ) / σ``: one reduction and one rank-1 update, where autograd
    through the division and ``σ`` makes about nine passes over the weight."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mat: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                dim: int) -> torch.Tensor:
        """``mat``: the weight's matrix (detached), which the power iteration used too."""
        device = weight.device.type
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) \
                else contextlib.nullcontext():  # σ in the weight's precision
            sigma = torch.vdot(u, torch.mv(mat, v))
        ctx.dim = dim
        ctx.save_for_backward(weight, u, v, sigma)
        return weight / sigma

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, u, v, sigma = ctx.saved_tensors
        grad = grad.contiguous()
        scale = -torch.vdot(grad.view(-1), weight.reshape(-1)) / sigma  # a tensor: no host sync
        if ctx.dim == 0:
            out = torch.addr(grad.view(grad.shape[0], -1), u * scale, v).view(grad.shape)
        else:
            order = [ctx.dim, *(d for d in range(grad.ndim) if d != ctx.dim)]
            rank1 = torch.outer(u * scale, v).view([grad.shape[d] for d in order])
            out = grad + rank1.permute([order.index(d) for d in range(grad.ndim)])
        return out.div_(sigma), None, None, None, None


def _weight_matrix(weight: torch.Tensor, dim: int) -> torch.Tensor:
    if dim != 0:
        weight = weight.permute(dim, *(d for d in range(weight.ndim) if d != dim))
    return weight.flatten(1)


class SpectralNorm(nn.Module):
    """Spectral normalization (Miyato et al. 2018) as a parametrization of a weight: ``W / σ(W)``,
    σ estimated by one power iteration per training forward. Buffers, initialisation (15 power
    iterations), ``dim`` (1 for transposed convs, else 0) and state-dict names are those of
    ``torch.nn.utils.parametrizations.spectral_norm``, so checkpoints load either way and the
    forward is the same computation; the backward is ``_SpectralScale``'s, and under autocast σ
    stays in the weight's precision."""

    def __init__(self, weight: torch.Tensor, dim: int = 0, n_power_iterations: int = 1, eps: float = 1e-12):
        super().__init__()
        if weight.ndim < 2:
            raise ValueError(f"spectral norm needs a weight matrix or tensor, got {weight.ndim} dimension(s)")
        self.dim, self.n_power_iterations, self.eps = dim, n_power_iterations, eps
        mat = _weight_matrix(weight, dim)
        u = F.normalize(mat.new_empty(mat.shape[0]).normal_(0, 1), dim=0, eps=eps)
        v = F.normalize(mat.new_empty(mat.shape[1]).normal_(0, 1), dim=0, eps=eps)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)
        self._power_method(mat, 15)

    @torch.no_grad()
    def _power_method(self, mat: torch.Tensor, iterations: int) -> None:
        for _ in range(iterations):
            F.normalize(torch.mv(mat, self._v), dim=0, eps=self.eps, out=self._u)
            F.normalize(torch.mv(mat.H, self._u), dim=0, eps=self.eps, out=self._v)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mat = _weight_matrix(weight.detach(), self.dim)  # a copy for transposed convs: made once
        if self.training:
            self._power_method(mat, self.n_power_iterations)
        # Copies: the next forward updates the buffers in place, and these are saved for backward.
        return _SpectralScale.apply(weight, mat, self._u.clone(), self._v.clone(), self.dim)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value


def spectral_norm_weight(module: M) -> M:
    """Spectral normalization of ``module.weight`` alone (``SpectralNorm``); returns ``module``."""
    dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    parametrize.register_parametrization(module, "weight", SpectralNorm(module.weight, dim))
    return module


def spectral_norm(module: M) -> M:
    """Apply spectral normalization (``SpectralNorm``) to every conv and linear layer in
    ``module`` (``module`` itself included), in place; returns ``module``. Layers whose weight is
    already parametrized are left alone, so applying it twice is harmless."""
    for m in list(module.modules()):
        if isinstance(m, _WEIGHTED) and not parametrize.is_parametrized(m, "weight"):
            spectral_norm_weight(m)
    return module


class SelfAttention(nn.Module):
    """The self-attention block of SAGAN: Zhang et al. 2019, "Self-Attention Generative
    Adversarial Networks", §3, Eqs. 1–3 (the paper's final version, with the output projection
    ``W_v``).

    With 1×1 convs ``query``, ``key``, ``value`` from C to ``C / reduction`` channels (the paper's
    g, f, h; C/8 there) and ``out`` back to C (``W_v``): the attention of location j over every
    location i is ``β_j,i = softmax_i(query(x)_jᵀ key(x)_i)`` (no 1/√d scaling), ``o_j =
    out(Σ_i β_j,i value(x)_i)``, and ``y = γ·o + x`` with the learned scalar γ starting at 0: the
    block starts as the identity and the network first relies on local cues. The 1×1 convs have
    no bias, as the official TensorFlow ``sn_conv1x1``; spectral norm reaches them when the
    network applies it to all its convs, as SAGAN does in G and D.
    """

    def __init__(self, channels: int, *, reduction: int = 8) -> None:
        super().__init__()
        inner = max(channels // reduction, 1)
        self.query = nn.Conv2d(channels, inner, 1, bias=False)
        self.key = nn.Conv2d(channels, inner, 1, bias=False)
        self.value = nn.Conv2d(channels, inner, 1, bias=False)
        self.out = nn.Conv2d(inner, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [N, C, H, W] → [N, C, H, W]."""
        n, _, h, w = x.shape
        # [N, 1, HW, C/8] each: one head over the HW locations.
        q, k, v = (m(x).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.query, self.key, self.value))
        attended = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        o = self.out(attended.squeeze(1).transpose(1, 2).reshape(n, -1, h, w))
        return self.gamma * o + x
