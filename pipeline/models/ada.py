"""StyleGAN2-ADA's adaptive discriminator augmentation (Karras et al. 2020, "Training Generative
Adversarial Networks with Limited Data"): the augmentation pipe D sees everything through, its
presets, and the rule that steers its strength ``p``.

Follows NVlabs/stylegan2-ada-pytorch ``training/augment.py`` (the pipe), ``train.py``
(``augpipe_specs``) and ``training/training_loop.py`` (the p update), in plain PyTorch ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_BLIT = ("xflip", "rotate90", "xint")
_GEOM = ("scale", "rotate", "aniso", "xfrac")
_COLOR = ("brightness", "contrast", "lumaflip", "hue", "saturation")

# The official ``--augpipe`` choices (train.py ``augpipe_specs``): which multipliers are 1.
_PRESETS: dict[str, tuple[str, ...]] = {
    "blit": _BLIT,
    "geom": _GEOM,
    "color": _COLOR,
    "filter": ("imgfilter",),
    "noise": ("noise",),
    "cutout": ("cutout",),
    "bg": _BLIT + _GEOM,
    "bgc": _BLIT + _GEOM + _COLOR,
    "bgcf": _BLIT + _GEOM + _COLOR + ("imgfilter",),
    "bgcfn": _BLIT + _GEOM + _COLOR + ("imgfilter", "noise"),
    "bgcfnc": _BLIT + _GEOM + _COLOR + ("imgfilter", "noise", "cutout"),
}
AUGPIPES = tuple(_PRESETS)

# Low-pass decomposition filter of the Symlet-6 wavelet (PyWavelets ``Wavelet("sym6").dec_lo``), the
# one the official pipe resamples geometric transforms with. Being orthogonal, upsampling by it and
# downsampling by its reverse reconstructs the image exactly, so untransformed samples pass unchanged.
_SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)  # fmt: skip


def augment_preset(name: str) -> dict[str, float]:
    """Keyword arguments of :class:`AugmentPipe` for an official ``--augpipe`` name (``"bgc"``, the
    paper's default: blit + geometric + colour; ``"bgcfnc"`` adds filtering, noise and cutout)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown augpipe {name!r}; expected one of {', '.join(AUGPIPES)}")
    return {key: 1.0 for key in _PRESETS[name]}


def ada_adjust(p: float, rt: float, *, target: float = 0.6, batch_size: int, interval: int = 4,
               ada_kimg: float = 500.0) -> float:
    """The next ``p`` of ADA's heuristic (``training_loop.py`` lines 312-315)::

        p <- max(p + sign(rt - target) * batch_size * interval / (ada_kimg * 1000), 0)

    ``rt`` is ``E[sign(D(real))]`` over all ranks and the ``interval`` iterations since the last
    adjustment; ``batch_size`` is global. p moves by 1 every ``ada_kimg`` thousand images; it is
    clamped at 0 only, as the official (p > 1 applies every transform to every sample).
    """
    if not math.isfinite(rt):
        raise ValueError(f"ADA's r_t must be finite, got {rt} (NaN logits of D on reals?)")
    if batch_size <= 0 or interval <= 0 or not ada_kimg > 0:
        raise ValueError(f"ada_adjust needs batch_size, interval and ada_kimg > 0, "
                         f"got {batch_size}, {interval}, {ada_kimg}")
    sign = (rt > target) - (rt < target)
    return max(p + sign * (batch_size * interval) / (ada_kimg * 1000), 0.0)


# ----------------------------------------------------------------------------- matrices


def _matrix(ref: Tensor, *rows: tuple) -> Tensor:
    """``[*ref.shape, R, K]``: the rows' entries, each a tensor shaped like ``ref`` or a number."""
    entries = [e if isinstance(e, Tensor) else torch.full_like(ref, e) for row in rows for e in row]
    return torch.stack(entries, dim=-1).reshape(*ref.shape, len(rows), len(rows[0]))


def _scale2(sx, sy, ref: Tensor) -> Tensor:
    return _matrix(ref, (sx, 0, 0), (0, sy, 0), (0, 0, 1))


def _translate2(tx, ty, ref: Tensor) -> Tensor:
    return _matrix(ref, (1, 0, tx), (0, 1, ty), (0, 0, 1))


def _rotate2(theta: Tensor) -> Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return _matrix(theta, (c, -s, 0), (s, c, 0), (0, 0, 1))


# ----------------------------------------------------------------------------- resampling


def _sym6(device: torch.device | None = None) -> Tensor:
    f = torch.tensor(_SYM6, dtype=torch.float32, device=device)
    return f / f.sum()  # unit DC gain


def _upsample2x(x: Tensor, f: Tensor) -> Tensor:
    """``[N, C, H, W] -> [N, C, 2H, 2W]``: zero-stuffing then convolution with ``2f`` per axis (the
    official ``upfirdn2d.upsample2d``), done as a stride-2 transposed convolution."""
    n, c, h, w = x.shape
    k = f.numel()
    g = (2 * f).to(x.dtype)
    pad = k - 1 - (k + 1) // 2  # the official pads the stuffed signal by (k+1)//2 before its flipped f
    y = F.conv_transpose2d(x.reshape(n * c, 1, h, w), g.view(1, 1, 1, k), stride=(1, 2), padding=(0, pad))
    y = F.conv_transpose2d(y, g.view(1, 1, k, 1), stride=(2, 1), padding=(pad, 0))
    return y.reshape(n, c, 2 * h, 2 * w)


def _downsample2x(x: Tensor, f: Tensor, crop: tuple[int, int]) -> Tensor:
    """``[N, C, H, W] -> [N, C, ...]``: drop ``crop`` pixels before/after on each axis, correlate with
    ``f`` (the reverse of the upsampling filter) and keep every other sample."""
    n, c, h, w = x.shape
    k = f.numel()
    g = f.to(x.dtype)
    y = x.reshape(n * c, 1, h, w)[:, :, crop[0]:h - crop[1], crop[0]:w - crop[1]]
    y = F.conv2d(y, g.view(1, 1, 1, k), stride=(1, 2))
    y = F.conv2d(y, g.view(1, 1, k, 1), stride=(2, 1))
    return y.reshape(n, c, y.shape[2], y.shape[3])


def geometric_transform(images: Tensor, G_inv: Tensor, f: Tensor | None = None) -> Tensor:
    """Resample ``images [N, C, H, W]`` by ``G_inv [N, 3, 3]``, which maps an output pixel to the input
    pixel it shows (pixel units, origin at the image centre, y down), as the official pipe does:
    reflect-pad as far as the transformed image reaches, upsample 2x by the wavelet filter ``f``
    (default Symlet-6), bilinear ``grid_sample`` (zeros outside, ``align_corners=False``), filter and
    downsample back to ``H x W``. Differentiable w.r.t. ``images`` to any order.

    Integer translations and the identity come out exact (the filter is orthogonal); reversals
    (x-flip, 90-degree rotations) do not: Symlet-6 is not symmetric, so they leave a 12-tap kernel,
    the even taps of ``2 f * f``, along each reversed axis, in the official pipe as here."""
    n, c, h, w = images.shape
    f = _sym6(images.device) if f is None else f.to(images.device)
    G_inv = G_inv.to(device=images.device, dtype=torch.float32)
    hz_pad = f.numel() // 4  # filter support in input pixels, per side

    # One padding for the batch: how far beyond each edge any sample's corners reach, plus room for
    # the filter; at most W - 1 / H - 1, the most reflect padding allows (zeros beyond, via grid_sample).
    cx, cy = (w - 1) / 2, (h - 1) / 2
    corners = G_inv.new_tensor([(-cx, cx, cx, -cx), (-cy, -cy, cy, cy), (1, 1, 1, 1)])
    reach = (G_inv @ corners)[:, :2, :].permute(1, 0, 2).flatten(1)  # [xy, N * 4]
    margin = torch.cat([-reach, reach]).amax(dim=1)  # [x0, y0, x1, y1]
    margin = margin + margin.new_tensor([2 * hz_pad - cx, 2 * hz_pad - cy] * 2)
    margin = torch.minimum(margin.clamp(min=0), margin.new_tensor([w - 1, h - 1] * 2))
    mx0, my0, mx1, my1 = (int(m) for m in margin.ceil().tolist())
    x = F.pad(images, [mx0, mx1, my0, my1], mode="reflect")

    # Output-pixel -> input-pixel map in the padded, upsampled image, then in the normalized
    # coordinates of affine_grid. The output keeps hz_pad pixels per side for the downsampling filter.
    out_h, out_w = (h + 2 * hz_pad) * 2, (w + 2 * hz_pad) * 2
    one = G_inv.new_ones([])
    to_padded = _translate2((mx0 - mx1) / 2, (my0 - my1) / 2, one)
    up_in = _translate2(-0.5, -0.5, one) @ _scale2(2, 2, one)  # input pixel -> upsampled pixel
    up_out = _scale2(0.5, 0.5, one) @ _translate2(0.5, 0.5, one)  # upsampled output pixel -> pixel
    norm_in = _scale2(2 / (2 * x.shape[3]), 2 / (2 * x.shape[2]), one)
    norm_out = _scale2(out_w / 2, out_h / 2, one)
    theta = (norm_in @ up_in @ to_padded) @ G_inv @ (up_out @ norm_out)

    x = _upsample2x(x, f)
    grid = F.affine_grid(theta[:, :2, :].to(x.dtype), [n, c, out_h, out_w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    k = f.numel()
    return _downsample2x(x, f, crop=(2 * hz_pad - (k - 1) // 2, 2 * hz_pad - (k - 2) // 2))


def color_transform(images: Tensor, C: Tensor) -> Tensor:
    """Apply ``C [N, 4, 4]`` (homogeneous RGB: ``rgb_out = C[:3, :3] @ rgb + C[:3, 3]``) to ``images``
    ``[N, 3, H, W]``; a 1-channel image gets the mean of C's three rows, as the official."""
    n, c, h, w = images.shape
    C = C.to(device=images.device, dtype=images.dtype)
    x = images.reshape(n, c, h * w)
    if c == 3:
        x = C[:, :3, :3] @ x + C[:, :3, 3:]
    elif c == 1:
        m = C[:, :3, :].mean(dim=1, keepdim=True)
        x = x * m[:, :, :3].sum(dim=2, keepdim=True) + m[:, :, 3:]
    else:
        raise ValueError(f"colour augmentation needs RGB (3 channels) or L (1 channel) images, got {c} channels")
    return x.reshape(n, c, h, w)


def _filter_bank() -> Tensor:
    """``[4, 43]``: the official pipe's four separable band-pass filters (octave bands, lowest first),
    built from the Symlet-2 (= Daubechies-2) quadrature mirror pair."""
    r3, d = math.sqrt(3), 4 * math.sqrt(2)
    lo = torch.tensor([1 - r3, 3 - r3, 3 + r3, 1 + r3], dtype=torch.float64) / d  # sym2 dec_lo
    hi = lo * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)

    def full_conv(rows: Tensor, k: Tensor) -> Tensor:  # row-wise numpy.convolve(row, k)
        out = F.conv1d(F.pad(rows[:, None], [k.numel() - 1] * 2), k.flip(0).view(1, 1, -1))
        return out[:, 0]

    lo2 = full_conv(lo[None], lo.flip(0))[0] / 2  # |H(z)|^2 / 2
    hi2 = full_conv(hi[None], hi.flip(0))[0] / 2
    bank = torch.eye(4, 1, dtype=torch.float64)
    for band in range(1, 4):
        stuffed = bank.new_zeros(4, 2 * bank.shape[1] - 1)
        stuffed[:, ::2] = bank  # one octave down
        bank = full_conv(stuffed, lo2)
        start = (bank.shape[1] - hi2.numel()) // 2
        bank[band, start:start + hi2.numel()] += hi2
    return bank.float()


# ----------------------------------------------------------------------------- the pipe


class AugmentPipe(nn.Module):
    """ADA's augmentation pipe (``training/augment.py`` ``AugmentPipe``), ``[N, C, H, W] -> same``.

    Each keyword without a suffix is a probability multiplier: a transform is applied to a sample
    with probability ``multiplier * p``, independently per sample, drawn from torch's RNG (the
    ``generator`` given to forward, else the global one of the images' device) in the official
    order, so a seeded run and its resume draw the same. The ``*_std`` / ``*_max`` keywords set the
    transforms' ranges, with the official defaults and meaning. Geometric transforms (blit and
    general) are composed into one 3x3 matrix per sample and resampled once
    (:func:`geometric_transform`); colour ones into one 4x4 matrix (:func:`color_transform`); then
    image-space filtering, additive noise and cutout. ``p`` is a 0-dim float32 buffer (saved in the
    state dict; official initial value 1); at ``p <= 0`` forward returns its input itself.
    Buffers ``Hz_geom`` and ``Hz_fbank`` hold the filters under the official names, so an official
    pipe's state dict loads as it is. Differentiable w.r.t. the images, to second order (R1).
    Images in [-1, 1]: contrast and saturation act around 0 and the luma axis.
    """

    def __init__(
        self,
        xflip: float = 0, rotate90: float = 0, xint: float = 0, xint_max: float = 0.125,
        scale: float = 0, rotate: float = 0, aniso: float = 0, xfrac: float = 0,
        scale_std: float = 0.2, rotate_max: float = 1, aniso_std: float = 0.2, xfrac_std: float = 0.125,
        brightness: float = 0, contrast: float = 0, lumaflip: float = 0, hue: float = 0, saturation: float = 0,
        brightness_std: float = 0.2, contrast_std: float = 0.5, hue_max: float = 1, saturation_std: float = 1,
        imgfilter: float = 0, imgfilter_bands: tuple[float, ...] = (1, 1, 1, 1), imgfilter_std: float = 1,
        noise: float = 0, cutout: float = 0, noise_std: float = 0.1, cutout_size: float = 0.5,
        p: float = 1.0,
    ) -> None:
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p), dtype=torch.float32))
        # p's value on the host, so that a forward never waits for the device to read it (the
        # identity at p = 0 needs it before any kernel runs). Change p with set_p; a loaded state
        # dict refreshes it.
        self.p_host = float(p)
        self.register_load_state_dict_post_hook(lambda module, _: module.set_p(float(module.p)))
        # Blit: x-flip, 90-degree rotations, integer translation (range relative to the image size).
        self.xflip, self.rotate90, self.xint = float(xflip), float(rotate90), float(xint)
        self.xint_max = float(xint_max)
        # General geometry: isotropic scale (log2 std), rotation (1 = full circle), anisotropic
        # scale (log2 std), fractional translation (std relative to the image size).
        self.scale, self.rotate, self.aniso, self.xfrac = float(scale), float(rotate), float(aniso), float(xfrac)
        self.scale_std, self.rotate_max = float(scale_std), float(rotate_max)
        self.aniso_std, self.xfrac_std = float(aniso_std), float(xfrac_std)
        # Colour: brightness (std), contrast (log2 std), luma flip, hue rotation (1 = full circle),
        # saturation (log2 std).
        self.brightness, self.contrast, self.lumaflip = float(brightness), float(contrast), float(lumaflip)
        self.hue, self.saturation = float(hue), float(saturation)
        self.brightness_std, self.contrast_std = float(brightness_std), float(contrast_std)
        self.hue_max, self.saturation_std = float(hue_max), float(saturation_std)
        # Image-space filtering: per-band gains (log2 std), band multipliers lowest band first.
        self.imgfilter, self.imgfilter_std = float(imgfilter), float(imgfilter_std)
        self.imgfilter_bands = [float(b) for b in imgfilter_bands]
        if len(self.imgfilter_bands) != 4:
            raise ValueError(f"imgfilter_bands needs 4 multipliers, got {len(self.imgfilter_bands)}")
        # Corruptions: additive RGB noise (std of its std), cutout (square side relative to the image).
        self.noise, self.cutout = float(noise), float(cutout)
        self.noise_std, self.cutout_size = float(noise_std), float(cutout_size)

        self.register_buffer("Hz_geom", _sym6())
        self.register_buffer("Hz_fbank", _filter_bank())

    def set_p(self, value: float) -> None:
        """Set the augmentation probability (the buffer, and its host copy)."""
        self.p.fill_(float(value))
        self.p_host = float(value)

    def extra_repr(self) -> str:
        on = [k for k in _PRESETS["bgcfnc"] if getattr(self, k) > 0]
        return f"p={self.p_host:.4f}, enabled={','.join(on) or 'none'}"

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``images [N, C, H, W]`` (C = 3 or 1 with colour transforms) -> augmented, same dtype.
        Computes in fp32 (fp64 stays fp64) with autocast off. ``p`` is read from its host copy;
        the geometric transforms, like the official ones, read their padding from the device."""
        if images.ndim != 4:
            raise ValueError(f"AugmentPipe expects [N, C, H, W] images, got shape {tuple(images.shape)}")
        if self.p_host <= 0:
            return images
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = images if images.dtype in (torch.float32, torch.float64) else images.float()
            draw = _Draws(x.shape[0], x.device, generator)
            G_inv = self._geometry(draw, x.shape[2], x.shape[3])
            if G_inv is not None:
                x = geometric_transform(x, G_inv, self.Hz_geom)
            C = self._color(draw, x.shape[1])
            if C is not None:
                x = color_transform(x, C)
            if self.imgfilter > 0:
                x = self._filter(draw, x)
            x = self._corrupt(draw, x)
        return x.to(images.dtype)

    def _geometry(self, draw: _Draws, h: int, w: int) -> Tensor | None:
        """``[N, 3, 3]`` output-to-input pixel map, or None. Each transform draws its value, then its
        gate, in the official order."""
        p, mats = self.p, []
        if self.xflip > 0:
            i = torch.floor(draw.uniform() * 2)
            i = torch.where(draw.gate(self.xflip * p), i, 0)
            mats.append(_scale2(1 - 2 * i, 1, i))
        if self.rotate90 > 0:
            i = torch.floor(draw.uniform() * 4)
            i = torch.where(draw.gate(self.rotate90 * p), i, 0)
            mats.append(_rotate2(math.pi / 2 * i))
        if self.xint > 0:
            t = (draw.uniform(2) * 2 - 1) * self.xint_max
            t = torch.where(draw.gate(self.xint * p, 1), t, 0)
            mats.append(_translate2(-torch.round(t[:, 0] * w), -torch.round(t[:, 1] * h), t[:, 0]))
        if self.scale > 0:
            s = torch.exp2(draw.normal() * self.scale_std)
            s = torch.where(draw.gate(self.scale * p), s, 1)
            mats.append(_scale2(1 / s, 1 / s, s))
        # Rotation before and after the anisotropic scale, each with p_rot, so that at least one
        # happens with probability rotate * p.
        p_rot = 1 - torch.sqrt((1 - self.rotate * p).clamp(0, 1))
        if self.rotate > 0:
            mats.append(_rotate2(self._angle(draw, p_rot)))
        if self.aniso > 0:
            s = torch.exp2(draw.normal() * self.aniso_std)
            s = torch.where(draw.gate(self.aniso * p), s, 1)
            mats.append(_scale2(1 / s, s, s))
        if self.rotate > 0:
            mats.append(_rotate2(self._angle(draw, p_rot)))
        if self.xfrac > 0:
            t = draw.normal(2) * self.xfrac_std
            t = torch.where(draw.gate(self.xfrac * p, 1), t, 0)
            mats.append(_translate2(-t[:, 0] * w, -t[:, 1] * h, t[:, 0]))
        if not mats:
            return None
        G_inv = mats[0]
        for m in mats[1:]:
            G_inv = G_inv @ m  # the inverse of T_k ... T_1 is T_1^-1 ... T_k^-1
        return G_inv

    def _angle(self, draw: _Draws, prob: Tensor) -> Tensor:
        theta = (draw.uniform() * 2 - 1) * math.pi * self.rotate_max
        return torch.where(draw.gate(prob), theta, 0)

    def _color(self, draw: _Draws, num_channels: int) -> Tensor | None:
        """``[N, 4, 4]`` homogeneous colour matrix (transforms in the official order), or None."""
        p, mats = self.p, []
        eye = torch.eye(4, device=draw.device)
        v = torch.tensor([1, 1, 1, 0], dtype=torch.float32, device=draw.device) / math.sqrt(3)  # luma axis
        vv = torch.outer(v, v)
        if self.brightness > 0:
            b = draw.normal() * self.brightness_std
            b = torch.where(draw.gate(self.brightness * p), b, 0)
            mats.append(_matrix(b, (1, 0, 0, b), (0, 1, 0, b), (0, 0, 1, b), (0, 0, 0, 1)))
        if self.contrast > 0:
            c = torch.exp2(draw.normal() * self.contrast_std)
            c = torch.where(draw.gate(self.contrast * p), c, 1)
            mats.append(_matrix(c, (c, 0, 0, 0), (0, c, 0, 0), (0, 0, c, 0), (0, 0, 0, 1)))
        if self.lumaflip > 0:
            i = torch.floor(draw.uniform() * 2)
            i = torch.where(draw.gate(self.lumaflip * p), i, 0)
            mats.append(eye - 2 * vv * i[:, None, None])  # Householder reflection across the luma plane
        if self.hue > 0 and num_channels > 1:
            theta = (draw.uniform() * 2 - 1) * math.pi * self.hue_max
            theta = torch.where(draw.gate(self.hue * p), theta, 0)[:, None, None]
            cross = torch.zeros(4, 4, device=draw.device)  # [v]_x: cross product with v
            cross[0, 1], cross[0, 2], cross[1, 2] = -v[2], v[1], -v[0]
            cross = cross - cross.T
            rot = torch.cos(theta) * (eye - vv) + torch.sin(theta) * cross + vv  # Rodrigues about v
            rot[:, 3, 3] = 1
            mats.append(rot)
        if self.saturation > 0 and num_channels > 1:
            s = torch.exp2(draw.normal() * self.saturation_std)
            s = torch.where(draw.gate(self.saturation * p), s, 1)[:, None, None]
            mats.append(vv + (eye - vv) * s)  # scales the chroma, keeps the luma
        if not mats:
            return None
        C = mats[0]
        for m in mats[1:]:
            C = m @ C
        return C

    def _filter(self, draw: _Draws, x: Tensor) -> Tensor:
        """Random gain per octave band, total power normalized for a 1/f spectrum; separable filter
        with reflect padding."""
        n, c, h, w = x.shape
        bands = self.Hz_fbank.shape[0]
        power = torch.tensor([10, 1, 1, 1], dtype=torch.float32, device=draw.device) / 13
        g = torch.ones(n, bands, device=draw.device)
        for i, band in enumerate(self.imgfilter_bands):
            t_i = torch.exp2(draw.normal() * self.imgfilter_std)
            t_i = torch.where(draw.gate(self.imgfilter * self.p * band), t_i, 1)
            t = torch.ones(n, bands, device=draw.device)
            t[:, i] = t_i
            g = g * t / (power * t.square()).sum(dim=1, keepdim=True).sqrt()
        taps = (g @ self.Hz_fbank.to(draw.device)).to(x.dtype)  # [N, K]
        k = taps.shape[1]
        weight = taps.repeat_interleave(c, dim=0)[:, None, None, :]  # [N * C, 1, 1, K]
        y = F.pad(x.reshape(1, n * c, h, w), [k // 2] * 4, mode="reflect")
        y = F.conv2d(y, weight, groups=n * c)
        y = F.conv2d(y, weight.transpose(2, 3), groups=n * c)
        return y.reshape(n, c, h, w)

    def _corrupt(self, draw: _Draws, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        if self.noise > 0:
            sigma = draw.normal(1, 1, 1).abs() * self.noise_std
            sigma = torch.where(draw.gate(self.noise * self.p, 1, 1, 1), sigma, 0)
            x = x + (draw.normal(c, h, w) * sigma).to(x.dtype)
        if self.cutout > 0:
            size = torch.where(draw.gate(self.cutout * self.p, 1, 1, 1, 1), self.cutout_size, 0.0)
            size = size.expand(n, 2, 1, 1, 1)
            center = draw.uniform(2, 1, 1, 1)
            ys = (torch.arange(h, device=draw.device).view(1, 1, -1, 1) + 0.5) / h
            xs = (torch.arange(w, device=draw.device).view(1, 1, 1, -1) + 0.5) / w
            keep = ((xs - center[:, 0]).abs() >= size[:, 0] / 2) | ((ys - center[:, 1]).abs() >= size[:, 1] / 2)
            x = x * keep.to(x.dtype)
        return x


class _Draws:
    """Random draws for a batch of ``n`` samples, fp32, from ``generator`` or the device's global RNG."""

    def __init__(self, n: int, device: torch.device, generator: torch.Generator | None) -> None:
        self.n, self.device, self.generator = n, device, generator

    def uniform(self, *shape: int) -> Tensor:
        return torch.rand(self.n, *shape, device=self.device, generator=self.generator)

    def normal(self, *shape: int) -> Tensor:
        return torch.randn(self.n, *shape, device=self.device, generator=self.generator)

    def gate(self, prob: Tensor | float, *shape: int) -> Tensor:
        """``[n, *shape]`` booleans: True (apply) with probability ``prob``."""
        return self.uniform(*shape) < prob
