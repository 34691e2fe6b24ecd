"""StyleGAN2 networks (Karras et al. 2020, config F) following NVlabs/stylegan2-ada-pytorch
``training/networks.py``: mapping, synthesis (skip G), residual D. Module, parameter and buffer
names are the official ones, so official state dicts load key for key (strict).

Pure PyTorch, no custom ops, the official order of operations; what differs, for speed, changes
only fp32 rounding: the [1,3,3,1] FIR resampling of ``upfirdn2d`` is a depthwise conv (transposed
when upsampling, so no zeros are inserted; strided when downsampling, so only kept pixels are
computed), the demodulation coefficients (paper eq. 3) come from ``styles² @ Σ_k w²`` instead of a
per-sample weight tensor, and activation gains and biases are folded into the conv where exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# bias_act.activation_funcs: name -> (function, default gain); relu and lrelu: see activate().
ACTIVATIONS = {"linear": (None, 1.0), "relu": (None, math.sqrt(2)), "lrelu": (None, math.sqrt(2)),
               "tanh": (torch.tanh, 1.0), "sigmoid": (torch.sigmoid, 1.0), "elu": (F.elu, 1.0), "selu": (F.selu, 1.0),
               "softplus": (F.softplus, 1.0), "swish": (lambda x: torch.sigmoid(x) * x, math.sqrt(2))}
_HOMOGENEOUS = ("linear", "relu", "lrelu")  # f(a·x) = a·f(x) for a > 0: a gain can go before f


def setup_filter(taps: Sequence) -> Tensor:
    """The official ``upfirdn2d.setup_filter`` for short filters: 1-D taps become their outer
    product, [k, k] (the official ``resample_filter`` buffers' shape), normalised to unit sum."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f) if f.ndim == 1 else f
    return f / f.sum()


def _depthwise(f: Tensor, channels: int, dtype: torch.dtype, gain: float) -> Tensor:
    # f as a depthwise weight [C, 1, k, k] (on CPU faster than two 1-D depthwise convs, measured).
    return (f * gain).to(dtype).view(1, 1, *f.shape).expand(channels, 1, -1, -1)


def fir_filter(x: Tensor, f: Tensor, pad0: int, pad1: int, down: int = 1, gain: float = 1.0) -> Tensor:
    """``upfirdn2d(x, f, down=down, padding=[pad0, pad1] * 2, gain=gain)`` without upsampling: pad
    (negative crops), convolve each channel with ``f`` [k, k] (a true convolution), keep every
    ``down``-th pixel — computing only those. [N, C, H, W] → [N, C, (H + pad0 + pad1 - k) // down + 1, …]."""
    pad = pad0
    if pad0 != pad1 or pad0 < 0:
        x, pad = F.pad(x, [pad0, pad1, pad0, pad1]), 0
    return F.conv2d(x, _depthwise(f.flip([0, 1]), x.shape[1], x.dtype, gain), stride=down, padding=pad,
                    groups=x.shape[1])


def upsample2d(x: Tensor, f: Tensor, up: int = 2) -> Tensor:
    """``upfirdn2d.upsample2d``: ``up - 1`` zeros after each pixel, pad, convolve with ``f`` × up²
    — as one stride-``up`` depthwise transposed conv, which never materialises the zeros (and,
    convolving, takes ``f`` unflipped). [N, C, H, W] → [N, C, up·H, up·W]."""
    k = f.shape[-1]
    pad0, pad1 = (k + up - 1) // 2, (k - up) // 2
    p, out_pad = k - 1 - pad0, up - 1 + pad1 - pad0  # conv_transpose2d rejects what it cannot do
    return F.conv_transpose2d(x, _depthwise(f, x.shape[1], x.dtype, up * up), stride=up, padding=p,
                              output_padding=out_pad, groups=x.shape[1])


def downsample2d(x: Tensor, f: Tensor, down: int = 2) -> Tensor:
    """``upfirdn2d.downsample2d``: FIR-filtered ÷``down``, only the kept pixels computed."""
    k = f.shape[-1]
    return fir_filter(x, f, (k - down + 1) // 2, (k - down) // 2, down=down)


def _conv(x: Tensor, w: Tensor, bias: Tensor | None = None, stride: int = 1, padding: int = 0,
          groups: int = 1) -> Tensor:
    # F.conv2d; a plain 1×1 conv as one batched matmul (on CPU PyTorch takes a slow path for it).
    if w.shape[-1] != 1 or stride != 1 or padding != 0 or groups != 1:
        return F.conv2d(x, w, bias, stride=stride, padding=padding, groups=groups)
    n, o = x.shape[0], w.shape[0]
    b = bias.reshape(1, o, 1) if bias is not None else x.new_zeros([])
    return torch.baddbmm(b, w.reshape(1, o, -1).expand(n, -1, -1), x.reshape(n, x.shape[1], -1)).reshape(
        n, o, *x.shape[2:])


def conv2d_resample(x: Tensor, w: Tensor, f: Tensor | None = None, up: int = 1, down: int = 1, padding: int = 0,
                    groups: int = 1, bias: Tensor | None = None) -> Tensor:
    """The official ``conv2d_resample`` (a correlation, ``flip_weight`` as its callers set it): conv with
    ``w`` [O, I/groups, k, k] and ×``up`` or ÷``down`` FIR resampling, padding ``padding`` once,
    relative to the upsampled image. Same order of operations; ``bias`` is added at the end."""
    k, fk = w.shape[-1], (f.shape[-1] if f is not None else 1)
    if up > 1 and down > 1:
        raise NotImplementedError("conv2d_resample: up and down at once")
    p0, p1 = padding + (fk + up - 1) // 2, padding + (fk - up) // 2  # up > 1 only
    if down > 1:
        p0, p1 = padding + (fk - down + 1) // 2, padding + (fk - down) // 2
    if down > 1 and k == 1:  # the official order; only the kept pixels are filtered
        return _conv(downsample2d(x, f, down), w, bias, groups=groups)
    if down > 1:  # filter, then a strided conv
        return F.conv2d(fir_filter(x, f, p0, p1), w, bias, stride=down, groups=groups)
    if up > 1 and k == 1:
        x = upsample2d(_conv(x, w, groups=groups), f, up)
    elif up > 1:  # transposed conv (no flip: the official flips twice), then the FIR filter
        o = w.shape[0]
        w = w.reshape(groups, o // groups, *w.shape[1:]).transpose(1, 2).reshape(-1, o // groups, k, k)
        p0, p1 = p0 - (k - 1), p1 - (k - up)
        pt = max(min(-p0, -p1), 0)
        x = F.conv_transpose2d(x, w, stride=up, padding=pt, groups=groups)
        x = fir_filter(x, f, p0 + pt, p1 + pt, gain=up * up)
    else:
        return _conv(x, w, bias, padding=padding, groups=groups)
    return x if bias is None else x + bias.reshape(1, -1, 1, 1)


def activate(x: Tensor, act: str = "linear", gain: float | None = None, clamp: float | None = None,
             inplace: bool = False) -> Tensor:
    """The official ``bias_act`` after the bias (which the callers fold into their conv or matmul):
    activation, × ``gain`` (default: the activation's), clamp to ±``clamp``. ``inplace``: ``x`` is a
    fresh tensor that nothing else holds, so relu/lrelu may overwrite it."""
    fn, default_gain = ACTIVATIONS[act]
    if act == "lrelu":
        x = F.leaky_relu(x, 0.2, inplace=inplace)
    elif act == "relu":
        x = F.relu(x, inplace=inplace)
    elif fn is not None:
        x = fn(x)
    gain = default_gain if gain is None else gain
    if gain != 1:
        x = x * gain
    return x if clamp is None else x.clamp(-clamp, clamp)


def normalize_2nd_moment(x: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """``x`` scaled to unit mean square along ``dim`` (StyleGAN's pixel norm of z)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, noise: Tensor | None = None, up: int = 1,
                     padding: int = 0, resample_filter: Tensor | None = None, demodulate: bool = True,
                     fused_modconv: bool = True, bias: Tensor | None = None, gain: float = 1.0) -> Tensor:
    """Modulated convolution, paper eqs. 1–3 (official ``modulated_conv2d``): ``x`` [N, I, H, W],
    ``weight`` [O, I, k, k], ``styles`` [N, I] → (conv + ``noise`` + ``bias``) × ``gain``, [N, O, H', W'].
    (``bias`` and ``gain`` are the caller's, taken in here to save passes over the output.)

    ``fused_modconv``: one grouped conv with per-sample weights; else scale the activations before
    and after a shared-weight conv (what training uses). Both give the same numbers. The
    demodulation coefficients rsqrt(Σ_i s_i² Σ_k w_oik² + 1e-8) are a [N, I] × [I, O] product."""
    (n, *_), (o, i, kh, kw) = x.shape, weight.shape
    if x.dtype == torch.float16 and demodulate:  # official pre-normalisation against fp16 overflow
        weight = weight * (1 / math.sqrt(i * kh * kw) / weight.abs().amax(dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.abs().amax(dim=1, keepdim=True)
    dcoefs = styles.new_full([n, o], gain)
    if demodulate:
        dcoefs = (styles.square() @ weight.square().sum(dim=[2, 3]).t() + 1e-8).rsqrt() * gain  # [N, O]
    noise = (noise * gain).to(x.dtype) if noise is not None else None
    bias = (bias * gain).to(x.dtype) if bias is not None else None

    if kh == kw == 1 and up == 1:  # 1×1 (toRGB): per-sample weights are tiny, one batched matmul
        w = (weight.reshape(1, o, i) * styles.unsqueeze(1) * dcoefs.unsqueeze(2)).to(x.dtype)  # [N, O, I]
        b = bias.reshape(1, o, 1) if bias is not None else x.new_zeros([])
        x = torch.baddbmm(b, w, x.reshape(n, i, -1)).reshape(n, o, *x.shape[2:])
        return x if noise is None else x.add_(noise)

    if fused_modconv:
        w = weight.unsqueeze(0) * (styles.unsqueeze(1) * dcoefs.unsqueeze(2)).reshape(n, o, i, 1, 1)
        x = conv2d_resample(x.reshape(1, -1, *x.shape[2:]), w.reshape(-1, i, kh, kw).to(x.dtype), resample_filter,
                            up=up, padding=padding, groups=n, bias=None if bias is None else bias.repeat(n))
        x = x.reshape(n, -1, *x.shape[2:])
    else:
        x = x * styles.to(x.dtype).reshape(n, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), resample_filter, up=up, padding=padding)
        d = dcoefs.to(x.dtype).reshape(n, -1, 1, 1)
        x = x * d if bias is None else torch.addcmul(bias.reshape(1, -1, 1, 1), x, d)
    return x if noise is None else x.add_(noise)


class FullyConnectedLayer(nn.Module):
    """Dense layer with equalised learning rate (ProGAN §4.1): weights stored as N(0, 1)/lr_multiplier,
    used × lr_multiplier/√fan_in; bias used × lr_multiplier."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "linear",
                 lr_multiplier: float = 1, bias_init: float = 0) -> None:
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain, self.bias_gain = lr_multiplier / math.sqrt(in_features), lr_multiplier

    def forward(self, x: Tensor) -> Tensor:
        """[N, in_features] → [N, out_features]."""
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain if self.bias is not None else None
        return activate(F.linear(x, w, b), act=self.activation, inplace=True)


class Conv2dLayer(nn.Module):
    """Conv with equalised learning rate, optional FIR up/downsampling, bias, activation and clamp
    (official ``Conv2dLayer``). ``trainable=False`` keeps weight and bias as buffers (Freeze-D)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: str = "linear", up: int = 1, down: int = 1,
                 resample_filter: Sequence[float] = (1, 3, 3, 1), conv_clamp: float | None = None,
                 channels_last: bool = False, trainable: bool = True) -> None:
        super().__init__()
        self.activation, self.up, self.down, self.conv_clamp = activation, up, down, conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding, self.act_gain = kernel_size // 2, ACTIVATIONS[activation][1]
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)
        weight = torch.randn([out_channels, in_channels, kernel_size, kernel_size])
        bias_t = torch.zeros([out_channels]) if bias else None
        if trainable:
            self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias_t) if bias else None
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias_t)  # None: no entry in the state dict, as the official

    def forward(self, x: Tensor, gain: float = 1) -> Tensor:
        """[N, in, H, W] → [N, out, H·up/down, W·up/down]."""
        act_gain = self.act_gain * gain
        out_gain = act_gain if self.activation in _HOMOGENEOUS else 1.0  # taken into w and b
        w = (self.weight * (self.weight_gain * out_gain)).to(x.dtype)
        b = (self.bias * out_gain).to(x.dtype) if self.bias is not None else None
        x = conv2d_resample(x, w, self.resample_filter, up=self.up, down=self.down, padding=self.padding, bias=b)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return activate(x, self.activation, gain=act_gain / out_gain, clamp=clamp, inplace=True)


class MappingNetwork(nn.Module):
    """z (+ embedded label) → w: pixel norm, ``num_layers`` lrelu FC layers at lr_multiplier 0.01,
    a moving average ``w_avg`` of w (decay ``w_avg_beta``) for the truncation trick, w broadcast
    to ``num_ws`` [N, num_ws, w_dim] (None: [N, w_dim]). Paper §2 / StyleGAN appendix C."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int | None, num_layers: int = 8,
                 embed_features: int | None = None, layer_features: int | None = None, activation: str = "lrelu",
                 lr_multiplier: float = 0.01, w_avg_beta: float | None = 0.995) -> None:
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers, self.w_avg_beta = num_layers, w_avg_beta
        embed_features = 0 if c_dim == 0 else w_dim if embed_features is None else embed_features
        layer_features = w_dim if layer_features is None else layer_features
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            setattr(self, f"fc{idx}", FullyConnectedLayer(features[idx], features[idx + 1], activation=activation,
                                                          lr_multiplier=lr_multiplier))
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: Tensor | None, c: Tensor | None, truncation_psi: float = 1,
                truncation_cutoff: int | None = None, skip_w_avg_update: bool = False) -> Tensor:
        """``z`` [N, z_dim], ``c`` [N, c_dim] → ws. In training mode (and not ``skip_w_avg_update``)
        ``w_avg`` moves towards this batch's mean w. ``truncation_psi`` ≠ 1 pulls ws (the first
        ``truncation_cutoff`` of them, None = all) towards ``w_avg``: w_avg + ψ (w − w_avg)."""
        x = None
        if self.z_dim > 0:
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        if self.w_avg_beta is not None and self.training and not skip_w_avg_update:
            # In fp32 whatever the autocast dtype of x: w_avg is an fp32 buffer.
            self.w_avg.copy_(x.detach().float().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            if self.w_avg_beta is None:
                raise ValueError("truncation needs w_avg (w_avg_beta is None)")
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.to(x.dtype).lerp(x, truncation_psi)
            else:
                head = self.w_avg.to(x.dtype).lerp(x[:, :truncation_cutoff], truncation_psi)
                x = torch.cat([head, x[:, truncation_cutoff:]], dim=1)
        return x


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} {value!r}; expected one of {', '.join(map(str, allowed))}")


def _block_dtype(use_fp16: bool, force_fp32: bool, device: torch.device) -> torch.dtype:
    # fp16 layers (num_fp16_res) run in fp16 on CUDA only: CPU kernels gain nothing from it.
    return torch.float16 if use_fp16 and not force_fp32 and device.type == "cuda" else torch.float32


class SynthesisLayer(nn.Module):
    """Modulated 3×3 conv (×2 upsampling for ``up=2``), per-pixel noise scaled by the learned
    ``noise_strength``, bias, lrelu and clamp: the official ``SynthesisLayer`` (paper fig. 2c)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, kernel_size: int = 3,
                 up: int = 1, use_noise: bool = True, activation: str = "lrelu",
                 resample_filter: Sequence[float] = (1, 3, 3, 1), conv_clamp: float | None = None,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.resolution, self.up, self.use_noise, self.activation = resolution, up, use_noise, activation
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding, self.act_gain = kernel_size // 2, ACTIVATIONS[activation][1]
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: Tensor, w: Tensor, noise_mode: str = "random", fused_modconv: bool = True,
                gain: float = 1) -> Tensor:
        """``x`` [N, in, R/up, R/up], ``w`` [N, w_dim] → [N, out, R, R]. ``noise_mode``: ``random``
        draws fresh N(0, 1) noise [N, 1, R, R] (as the official code, in the same order),
        ``const`` uses the ``noise_const`` buffer, ``none`` adds nothing."""
        _check("noise_mode", noise_mode, ("random", "const", "none"))
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            shape = [x.shape[0], 1, self.resolution, self.resolution]
            noise = torch.randn(shape, device=x.device) * self.noise_strength
        if self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        act_gain = self.act_gain * gain
        out_gain = act_gain if self.activation in _HOMOGENEOUS else 1.0  # applied before the activation
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter, fused_modconv=fused_modconv, bias=self.bias,
                             gain=out_gain)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return activate(x, self.activation, gain=act_gain / out_gain, clamp=clamp, inplace=True)


class ToRGBLayer(nn.Module):
    """Modulated 1×1 conv to image channels without demodulation, bias and clamp (official ``ToRGBLayer``)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: float | None = None, channels_last: bool = False) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)

    def forward(self, x: Tensor, w: Tensor, fused_modconv: bool = True) -> Tensor:
        """[N, in, R, R], [N, w_dim] → [N, img_channels, R, R]."""
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv, bias=self.bias)
        return x if self.conv_clamp is None else x.clamp(-self.conv_clamp, self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network (official ``SynthesisBlock``): the learned 4×4
    constant (first block) or ×2 upsampling conv0, conv1, and for ``architecture='skip'`` (config F)
    a toRGB whose output is added to the upsampled image of the previous block (paper fig. 7)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 is_last: bool, architecture: str = "skip", resample_filter: Sequence[float] = (1, 3, 3, 1),
                 conv_clamp: float | None = None, use_fp16: bool = False, fp16_channels_last: bool = False,
                 **layer_kwargs) -> None:
        _check("architecture", architecture, ("orig", "skip", "resnet"))
        super().__init__()
        self.in_channels, self.w_dim, self.resolution = in_channels, w_dim, resolution
        self.img_channels, self.is_last, self.architecture = img_channels, is_last, architecture
        self.use_fp16 = use_fp16  # fp16_channels_last: accepted for the official signature, not used
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv, self.num_torgb = (1 if in_channels == 0 else 2), int(is_last or architecture == "skip")
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=2,
                                        resample_filter=resample_filter, conv_clamp=conv_clamp, **layer_kwargs)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution,
                                    conv_clamp=conv_clamp, **layer_kwargs)
        if self.num_torgb:
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
        if in_channels != 0 and architecture == "resnet":
            self.skip = Conv2dLayer(in_channels, out_channels, kernel_size=1, bias=False, up=2,
                                    resample_filter=resample_filter)

    def forward(self, x: Tensor | None, img: Tensor | None, ws: Tensor, force_fp32: bool = False,
                fused_modconv: bool | None = None, **layer_kwargs) -> tuple[Tensor, Tensor | None]:
        """``x`` [N, in, R/2, R/2] (None for the first block), ``img`` [N, C, R/2, R/2] or None,
        ``ws`` [N, num_conv + num_torgb, w_dim] → (x [N, out, R, R], img [N, C, R, R] fp32).
        ``fused_modconv`` None: on CUDA the official rule (fused in eval mode for fp32 or batch 1),
        on CPU never (the grouped conv measured ~2.5× slower there)."""
        w_iter = iter(ws.unbind(dim=1))
        dtype = _block_dtype(self.use_fp16, force_fp32, ws.device)
        if fused_modconv is None:
            fused_modconv = (ws.device.type == "cuda" and not self.training
                             and (dtype == torch.float32 or ws.shape[0] == 1))
        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
        elif self.architecture == "resnet":
            x = x.to(dtype)
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = y.add_(self.conv1(x, next(w_iter), fused_modconv=fused_modconv, gain=math.sqrt(0.5), **layer_kwargs))
        else:
            x = self.conv0(x.to(dtype), next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
        if img is not None:
            img = upsample2d(img, self.resample_filter)
        if self.is_last or self.architecture == "skip":
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)
            img = img.add_(y) if img is not None else y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] → image [N, img_channels, R, R] (official ``SynthesisNetwork``): blocks
    ``b4`` … ``b{R}`` of min(channel_base / res, channel_max) channels, the ``num_fp16_res`` highest
    (≥ 8) in fp16 on CUDA. A block's toRGB shares its w with the next block's conv0."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channel_base: int = 32768,
                 channel_max: int = 512, num_fp16_res: int = 0, **block_kwargs) -> None:
        _check("img_resolution", img_resolution, [2 ** i for i in range(2, 16)])
        super().__init__()
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.img_resolution_log2 = int(math.log2(img_resolution))
        self.block_resolutions = [2 ** i for i in range(2, self.img_resolution_log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - num_fp16_res), 8)
        self.num_ws = 0
        for res in self.block_resolutions:
            is_last = res == img_resolution
            block = SynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res], w_dim=w_dim, resolution=res,
                                   img_channels=img_channels, is_last=is_last, use_fp16=res >= fp16_resolution,
                                   **block_kwargs)
            self.num_ws += block.num_conv + (block.num_torgb if is_last else 0)
            setattr(self, f"b{res}", block)

    def forward(self, ws: Tensor, **block_kwargs) -> Tensor:
        """``ws`` [N, num_ws, w_dim]; ``block_kwargs``: noise_mode, fused_modconv, force_fp32."""
        ws = ws.to(torch.float32)
        x, img, w_idx = None, None, 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            x, img = block(x, img, ws.narrow(1, w_idx, block.num_conv + block.num_torgb), **block_kwargs)
            w_idx += block.num_conv
        return img


class Generator(nn.Module):
    """StyleGAN2 generator (official ``Generator``): ``mapping`` (z, c → ws) then ``synthesis``
    (ws → image). Config F: z_dim = w_dim = 512, 8 mapping layers, channel_base 32768."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, img_resolution: int, img_channels: int,
                 mapping_kwargs: dict | None = None, synthesis_kwargs: dict | None = None) -> None:
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                          **(synthesis_kwargs or {}))
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws,
                                      **(mapping_kwargs or {}))

    def forward(self, z: Tensor, c: Tensor, truncation_psi: float = 1, truncation_cutoff: int | None = None,
                **synthesis_kwargs) -> Tensor:
        """``z`` [N, z_dim], ``c`` [N, c_dim] → [N, img_channels, R, R], about [-1, 1]."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, **synthesis_kwargs)


class DiscriminatorBlock(nn.Module):
    """One resolution of the discriminator (official ``DiscriminatorBlock``): fromRGB (first block,
    or every block for ``skip``), conv0, ÷2 conv1 and, for ``resnet`` (config F), a ÷2 1×1 skip
    summed at gain √½ (paper fig. 7). The first ``freeze_layers`` layers keep their weights as buffers."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int, img_channels: int,
                 first_layer_idx: int, architecture: str = "resnet", activation: str = "lrelu",
                 resample_filter: Sequence[float] = (1, 3, 3, 1), conv_clamp: float | None = None,
                 use_fp16: bool = False, fp16_channels_last: bool = False, freeze_layers: int = 0) -> None:
        if in_channels not in (0, tmp_channels):
            raise ValueError("in_channels must be 0 or tmp_channels")
        _check("architecture", architecture, ("orig", "skip", "resnet"))
        super().__init__()
        self.in_channels, self.resolution, self.img_channels = in_channels, resolution, img_channels
        self.first_layer_idx, self.architecture = first_layer_idx, architecture
        self.use_fp16 = use_fp16  # fp16_channels_last: accepted for the official signature, not used
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_layers = 0

        def trainable() -> bool:
            self.num_layers += 1
            return first_layer_idx + self.num_layers - 1 >= freeze_layers

        common = dict(activation=activation, conv_clamp=conv_clamp)
        if in_channels == 0 or architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, trainable=trainable(), **common)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, trainable=trainable(), **common)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, down=2, trainable=trainable(),
                                 resample_filter=resample_filter, **common)
        if architecture == "resnet":
            self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2,
                                    trainable=trainable(), resample_filter=resample_filter)

    def forward(self, x: Tensor | None, img: Tensor | None, force_fp32: bool = False) -> tuple[Tensor, Tensor | None]:
        """``x`` [N, in, R, R] (None in the first block), ``img`` [N, C, R, R] → (x [N, out, R/2, R/2],
        img [N, C, R/2, R/2] for ``skip``, else None)."""
        dtype = _block_dtype(self.use_fp16, force_fp32, (x if x is not None else img).device)
        if x is not None:
            x = x.to(dtype)
        if self.in_channels == 0 or self.architecture == "skip":
            img = img.to(dtype)
            y = self.fromrgb(img)
            x = x + y if x is not None else y
            img = downsample2d(img, self.resample_filter) if self.architecture == "skip" else None
        if self.architecture == "resnet":
            y = self.skip(x, gain=math.sqrt(0.5))
            x = y.add_(self.conv1(self.conv0(x), gain=math.sqrt(0.5)))
        else:
            x = self.conv1(self.conv0(x))
        return x, img


class MinibatchStdLayer(nn.Module):
    """Minibatch standard deviation (ProGAN §3): per group of ``group_size`` samples, the stddev of
    each feature over the group, averaged over channels (in ``num_channels`` splits) and pixels,
    appended as ``num_channels`` constant feature maps. [N, C, H, W] → [N, C + num_channels, H, W]."""

    def __init__(self, group_size: int | None, num_channels: int = 1) -> None:
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: Tensor) -> Tensor:
        (n, c, h, w), f = x.shape, self.num_channels
        g = min(self.group_size, n) if self.group_size is not None else n  # n must be a multiple of g
        y = x.reshape(g, -1, f, c // f, h, w)  # sample i is in group i % (n / g)
        y = (y - y.mean(dim=0)).square().mean(dim=0)
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])  # [n/g, F]
        y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)


class DiscriminatorEpilogue(nn.Module):
    """The 4×4 head (official ``DiscriminatorEpilogue``): minibatch stddev, 3×3 conv, FC, output FC;
    with labels, the output (``cmap_dim`` features) is projected onto the mapped label (Miyato &
    Koyama 2018), scaled by 1/√cmap_dim. fp32 throughout."""

    def __init__(self, in_channels: int, cmap_dim: int, resolution: int, img_channels: int,
                 architecture: str = "resnet", mbstd_group_size: int | None = 4, mbstd_num_channels: int = 1,
                 activation: str = "lrelu", conv_clamp: float | None = None) -> None:
        _check("architecture", architecture, ("orig", "skip", "resnet"))
        super().__init__()
        self.in_channels, self.cmap_dim, self.resolution = in_channels, cmap_dim, resolution
        self.img_channels, self.architecture = img_channels, architecture
        if architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, in_channels, kernel_size=1, activation=activation)
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3, activation=activation,
                                conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution ** 2, in_channels, activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: Tensor, img: Tensor | None, cmap: Tensor | None, force_fp32: bool = False) -> Tensor:
        """``x`` [N, C, 4, 4], ``img`` [N, img_channels, 4, 4] (skip), ``cmap`` [N, cmap_dim] → [N, 1]."""
        x = x.to(torch.float32)
        if self.architecture == "skip":
            x = x + self.fromrgb(img.to(torch.float32))
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.out(self.fc(self.conv(x).flatten(1)))
        if self.cmap_dim > 0:
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x


class Discriminator(nn.Module):
    """StyleGAN2 discriminator (official ``Discriminator``): blocks ``b{R}`` … ``b8`` with
    min(channel_base / res, channel_max) channels, then the epilogue ``b4``; labels through a
    ``mapping`` network (no z, no w_avg) into the epilogue's projection."""

    def __init__(self, c_dim: int, img_resolution: int, img_channels: int, architecture: str = "resnet",
                 channel_base: int = 32768, channel_max: int = 512, num_fp16_res: int = 0,
                 conv_clamp: float | None = None, cmap_dim: int | None = None, block_kwargs: dict | None = None,
                 mapping_kwargs: dict | None = None, epilogue_kwargs: dict | None = None) -> None:
        _check("img_resolution", img_resolution, [2 ** i for i in range(2, 16)])
        super().__init__()
        self.c_dim, self.img_resolution, self.img_channels = c_dim, img_resolution, img_channels
        self.img_resolution_log2 = int(math.log2(img_resolution))
        self.block_resolutions = [2 ** i for i in range(self.img_resolution_log2, 2, -1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions + [4]}
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - num_fp16_res), 8)
        cmap_dim = 0 if c_dim == 0 else channels[4] if cmap_dim is None else cmap_dim
        common = dict(img_channels=img_channels, architecture=architecture, conv_clamp=conv_clamp)
        layer_idx = 0
        for res in self.block_resolutions:
            block = DiscriminatorBlock(channels[res] if res < img_resolution else 0, channels[res], channels[res // 2],
                                       resolution=res, first_layer_idx=layer_idx, use_fp16=res >= fp16_resolution,
                                       **(block_kwargs or {}), **common)
            setattr(self, f"b{res}", block)
            layer_idx += block.num_layers
        if c_dim > 0:
            self.mapping = MappingNetwork(z_dim=0, c_dim=c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None,
                                          **(mapping_kwargs or {}))
        self.b4 = DiscriminatorEpilogue(channels[4], cmap_dim=cmap_dim, resolution=4, **(epilogue_kwargs or {}),
                                        **common)

    def forward(self, img: Tensor, c: Tensor, **block_kwargs) -> Tensor:
        """``img`` [N, img_channels, R, R], ``c`` [N, c_dim] → logits [N, 1]. ``block_kwargs``: force_fp32."""
        x = None
        for res in self.block_resolutions:
            x, img = getattr(self, f"b{res}")(x, img, **block_kwargs)
        cmap = self.mapping(None, c) if self.c_dim > 0 else None
        return self.b4(x, img, cmap)
