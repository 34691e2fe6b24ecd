"""Unit tests for pipeline.models.ada: identity at p=0, differentiability of every transform (to second
order for R1), blit transforms against direct tensor ops, colour transforms against hand computation,
the per-sample probabilities, the ADA p rule on hand values, and p in the state dict."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses.regularizers import r1_penalty
from pipeline.models.ada import (
    AUGPIPES,
    AugmentPipe,
    ada_adjust,
    augment_preset,
    color_transform,
    geometric_transform,
)

TRANSFORMS = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac",
              "brightness", "contrast", "lumaflip", "hue", "saturation", "imgfilter", "noise", "cutout")


def only(name: str, p: float = 1.0, **kwargs: float) -> AugmentPipe:
    return AugmentPipe(**{name: 1.0}, p=p, **kwargs)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def affine(*rows: tuple[float, float, float], n: int = 1) -> torch.Tensor:
    return torch.tensor([*rows, (0.0, 0.0, 1.0)]).expand(n, 3, 3)


def reflect_shift(x: torch.Tensor, tx: int, ty: int) -> torch.Tensor:
    """Content moved by (+tx, +ty) pixels, the uncovered border filled by reflection."""
    h, w = x.shape[-2:]
    padded = F.pad(x, [max(tx, 0), max(-tx, 0), max(ty, 0), max(-ty, 0)], mode="reflect")
    return padded[..., max(-ty, 0):max(-ty, 0) + h, max(-tx, 0):max(-tx, 0) + w]


def flip_kernel(pipe: AugmentPipe) -> torch.Tensor:
    """What a reversal leaves of the asymmetric Symlet-6 up/down pair: the even taps of 2 (f * f).
    (A symmetric filter would give a unit impulse; the official pipe has this too.)"""
    f = pipe.Hz_geom.double()
    k = f.numel()
    auto = F.conv1d(F.pad(f.view(1, 1, -1), [k - 1, k - 1]), f.flip(0).view(1, 1, -1)).flatten()
    return 2 * auto[0::2]


def along(x: torch.Tensor, a: torch.Tensor, dim: int) -> torch.Tensor:
    """Correlate each row (dim 3) or column (dim 2) of ``x`` with ``a``, reflect padding, aligned as the
    pipe's up/downsampling aligns it."""
    n, c, h, w = x.shape
    k = a.numel()
    y = x.reshape(n * c, 1, h, w)
    if dim == 3:
        y = F.conv2d(F.pad(y, [k // 2 - 1, k // 2, 0, 0], mode="reflect"), a.view(1, 1, 1, k).to(x.dtype))
    else:
        y = F.conv2d(F.pad(y, [0, 0, k // 2 - 1, k // 2], mode="reflect"), a.view(1, 1, k, 1).to(x.dtype))
    return y.reshape(n, c, h, w)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    return (a - b).abs().max().item() < tol


# ----------------------------------------------------------------------------- construction, p, identity


def test_presets_match_official_augpipe_specs() -> None:
    assert set(augment_preset("bgc")) == {"xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac",
                                         "brightness", "contrast", "lumaflip", "hue", "saturation"}
    assert all(v == 1.0 for v in augment_preset("bgc").values())
    assert set(augment_preset("bgcfnc")) == set(TRANSFORMS)
    assert augment_preset("blit") == {"xflip": 1.0, "rotate90": 1.0, "xint": 1.0}
    for name in AUGPIPES:
        AugmentPipe(**augment_preset(name))
    with pytest.raises(ValueError, match="bgc"):
        augment_preset("bgcx")


def test_p_is_a_buffer_in_the_state_dict() -> None:
    pipe = AugmentPipe(**augment_preset("bgc"))
    assert pipe.p.ndim == 0 and pipe.p.dtype == torch.float32 and pipe.p.item() == 1.0  # official initial p
    assert list(pipe.parameters()) == []
    pipe.p.fill_(0.3125)
    state = pipe.state_dict()
    assert set(state) == {"p", "Hz_geom", "Hz_fbank"}  # the official pipe's keys
    other = AugmentPipe(**augment_preset("bgc"))
    other.load_state_dict(state)
    assert other.p.item() == 0.3125


def test_identity_at_p0_returns_the_input_and_draws_nothing() -> None:
    pipe = AugmentPipe(**augment_preset("bgcfnc"), p=0.0)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    rng = torch.get_rng_state()
    y = pipe(x)
    assert y is x
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_forward_never_reads_p_back_from_the_device(monkeypatch) -> None:
    # On a GPU, reading p on the host each forward would wait for the device every D step. (The
    # geometric transforms still read the batch's extent for their padding, as the official's do:
    # the colour transforms show that p itself is not read.)
    pipe = AugmentPipe(**augment_preset("color"), p=0.0)
    x = torch.randn(2, 3, 16, 16)

    def no_sync(*_):
        raise AssertionError("p read on the host")

    for name in ("__float__", "item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    assert pipe(x) is x
    pipe.set_p(0.5)
    assert pipe.p_host == 0.5 and not torch.equal(pipe(x), x)
    monkeypatch.undo()
    assert pipe.p.item() == 0.5
    other = AugmentPipe(**augment_preset("bgc"), p=0.7)
    other.load_state_dict(AugmentPipe(**augment_preset("bgc"), p=0.0).state_dict())
    assert other.p_host == 0.0 and other(x) is x  # a loaded p is the one a forward uses


def test_no_enabled_transform_is_identity_at_any_p() -> None:
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(AugmentPipe(p=1.0)(x), x)


def test_geometry_identity_matrix_reconstructs_the_image() -> None:
    # The orthogonal wavelet: upsample, sample on the grid, downsample by its reverse gives x back.
    x = torch.randn(3, 3, 16, 24)
    assert close(geometric_transform(x, affine((1, 0, 0), (0, 1, 0), n=3)), x, 1e-5)


def test_seeded_draws_are_reproducible() -> None:
    pipe = AugmentPipe(**augment_preset("bgcfnc"), p=0.7)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(pipe(x, generator=gen(1)), pipe(x, generator=gen(1)))
    assert not torch.equal(pipe(x, generator=gen(1)), pipe(x, generator=gen(2)))
    torch.manual_seed(5)
    a = pipe(x)
    torch.manual_seed(5)
    assert torch.equal(a, pipe(x))


def test_low_precision_input_keeps_its_dtype() -> None:
    pipe = AugmentPipe(**augment_preset("bgc"), p=1.0)
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pipe(x.bfloat16(), generator=gen())
    assert y.dtype == torch.bfloat16
    assert close(y.float(), pipe(x, generator=gen()), 0.1)


# ----------------------------------------------------------------------------- differentiability


@pytest.mark.parametrize("name", TRANSFORMS)
def test_every_transform_is_differentiable(name: str) -> None:
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    y = only(name)(x, generator=gen())
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not close(y.detach(), x.detach(), 1e-3)  # it did something at p=1
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["rotate", "aniso", "xfrac", "hue", "saturation", "imgfilter"])
def test_gradcheck(name: str) -> None:
    pipe = only(name)
    shape = (1, 1, 22, 22) if name == "imgfilter" else (1, 3, 7, 8)  # imgfilter reflect-pads 21 pixels
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pipe(t, generator=gen(3)), (x,), fast_mode=True)


def test_geometry_is_twice_differentiable_for_r1() -> None:
    pipe = AugmentPipe(rotate=1, scale=1, xfrac=1)
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: pipe(t, generator=gen(4)), (x,), fast_mode=True)

    # R1 w.r.t. the non-augmented real image, through the pipe, reaches D's weights.
    D = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softplus(), nn.Flatten(), nn.LazyLinear(1))
    pipe = AugmentPipe(**augment_preset("bgc"), p=1.0)
    real = torch.randn(2, 3, 16, 16)
    penalty = r1_penalty(lambda t: D(pipe(t, generator=gen(5))), real)
    penalty.backward()
    grads = [prm.grad for prm in D.parameters() if prm.ndim > 1]  # the last bias does not enter R1
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------- blit against tensor ops


def test_integer_translation_is_a_reflect_padded_shift() -> None:
    x = torch.randn(2, 3, 16, 20)
    for tx, ty in [(3, -2), (-5, 4), (0, 7)]:
        # G_inv maps an output pixel to its source: content moves by +t.
        y = geometric_transform(x, affine((1, 0, -tx), (0, 1, -ty), n=2))
        assert close(y, reflect_shift(x, tx, ty), 1e-5)


def test_pipe_xint_shifts_each_sample_by_whole_pixels_within_range() -> None:
    x = torch.randn(16, 3, 16, 16)
    y = only("xint")(x, generator=gen(6))
    reach = round(0.125 * 16)  # xint_max
    shifts = set()
    for i in range(16):
        found = [(tx, ty) for tx in range(-reach, reach + 1) for ty in range(-reach, reach + 1)
                 if close(y[i], reflect_shift(x[i], tx, ty))]
        assert len(found) == 1, f"sample {i}: {found}"
        shifts.add(found[0])
    assert len(shifts) > 4


def test_flip_and_rot90_are_torch_flip_and_rot90_up_to_the_wavelet_kernel() -> None:
    pipe = AugmentPipe()
    a = flip_kernel(pipe)
    x = torch.randn(1, 3, 16, 20)
    assert close(geometric_transform(x, affine((-1, 0, 0), (0, 1, 0))), along(x.flip(3), a, 3), 1e-5)
    assert close(geometric_transform(x, affine((1, 0, 0), (0, -1, 0))), along(x.flip(2), a, 2), 1e-5)
    assert not close(along(x.flip(3), a, 3), x.flip(3), 0.05)  # the kernel is not an impulse
    x = torch.randn(1, 3, 16, 16)
    for k, dims in [(1, (2,)), (2, (2, 3)), (3, (3,))]:
        c, s = math.cos(math.pi / 2 * k), math.sin(math.pi / 2 * k)
        expected = torch.rot90(x, k, dims=(2, 3))
        for dim in dims:
            expected = along(expected, a, dim)
        assert close(geometric_transform(x, affine((c, -s, 0), (s, c, 0))), expected, 1e-5)


def test_pipe_xflip_and_rotate90_pick_among_the_exact_candidates() -> None:
    a = flip_kernel(AugmentPipe())
    x = torch.randn(32, 3, 12, 12)
    y = only("xflip")(x, generator=gen(7))
    kinds = [[close(y[i:i + 1], c) for c in (x[i:i + 1], along(x[i:i + 1].flip(3), a, 3))] for i in range(32)]
    assert all(sum(k) == 1 for k in kinds)
    assert {k.index(True) for k in kinds} == {0, 1}

    y = only("rotate90")(x, generator=gen(8))
    found = set()
    for i in range(32):
        xi = x[i:i + 1]
        candidates = [xi, along(torch.rot90(xi, 1, (2, 3)), a, 2),
                      along(along(torch.rot90(xi, 2, (2, 3)), a, 2), a, 3), along(torch.rot90(xi, 3, (2, 3)), a, 3)]
        hits = [k for k, c in enumerate(candidates) if close(y[i:i + 1], c)]
        assert len(hits) == 1, f"sample {i}: {hits}"
        found.add(hits[0])
    assert found == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- colour against hand computation


def positive_image(n: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, 6, 5, generator=gen(9)) * 0.8 + 0.2


def per_sample_constant(t: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    flat = t.flatten(1)
    assert (flat - flat[:, :1]).abs().max() < tol
    return flat[:, 0]


def test_brightness_adds_one_constant_per_sample() -> None:
    x = positive_image(64)
    b = per_sample_constant(only("brightness")(x, generator=gen()) - x)
    assert 0.12 < b.std().item() < 0.3  # brightness_std 0.2


def test_contrast_scales_by_one_positive_factor_per_sample() -> None:
    x = positive_image(64)
    c = per_sample_constant(only("contrast")(x, generator=gen()) / x)
    assert (c > 0).all() and 0.3 < c.log2().std().item() < 0.7  # contrast_std 0.5 (log2)


def test_lumaflip_reflects_across_the_grey_plane_or_keeps() -> None:
    x = positive_image()
    y = only("lumaflip")(x, generator=gen())
    flipped = x - 2 * x.mean(dim=1, keepdim=True)  # I - 2 v v^T, v = (1, 1, 1) / sqrt(3)
    kinds = [[close(y[i], x[i], 1e-5), close(y[i], flipped[i], 1e-5)] for i in range(len(x))]
    assert all(sum(k) == 1 for k in kinds) and {k.index(True) for k in kinds} == {0, 1}


def test_hue_rotates_chroma_about_the_grey_axis() -> None:
    x = positive_image()
    y = only("hue")(x, generator=gen())
    assert close(y.mean(dim=1), x.mean(dim=1), 1e-5)  # luma kept
    chroma = lambda t: (t - t.mean(dim=1, keepdim=True)).norm(dim=1)
    assert close(chroma(y), chroma(x), 1e-5)  # a rotation
    assert not close(y, x, 1e-2)


def test_saturation_scales_chroma_by_one_factor_per_sample() -> None:
    x = positive_image()
    y = only("saturation")(x, generator=gen())
    assert close(y.mean(dim=1), x.mean(dim=1), 1e-5)
    s = per_sample_constant((y - y.mean(1, keepdim=True)) / (x - x.mean(1, keepdim=True)), 1e-3)
    assert (s > 0).all() and not close(s, torch.ones_like(s), 1e-2)


def test_color_matrix_by_hand() -> None:
    x = positive_image(2)
    v = torch.tensor([1.0, 1.0, 1.0, 0.0]) / math.sqrt(3)
    grey = torch.outer(v, v)
    grey[3, 3] = 1  # saturation 0
    assert close(color_transform(x, grey.expand(2, 4, 4)), x.mean(dim=1, keepdim=True).expand_as(x), 1e-6)
    shift = torch.eye(4).repeat(2, 1, 1)
    shift[0, :3, 3], shift[1, :3, 3] = 0.25, -0.5
    y = color_transform(x, shift)
    assert close(y[0], x[0] + 0.25, 1e-6) and close(y[1], x[1] - 0.5, 1e-6)
    gray_image = x[:, :1]  # one channel: the mean of the matrix's three rows
    assert close(color_transform(gray_image, shift), gray_image + shift[:, :1, 3, None, None], 1e-6)
    with pytest.raises(ValueError, match="3 channels"):
        color_transform(x[:, :2], shift)


# ----------------------------------------------------------------------------- probabilities


def changed(y: torch.Tensor, x: torch.Tensor) -> int:
    return int(((y - x).flatten(1).abs().amax(dim=1) > 1e-3).sum())


def test_xflip_probability_is_half_of_p() -> None:
    # Applying x-flip means flipping or not with equal odds (official): P(flipped) = 0.5 * p.
    x = torch.randn(400, 1, 8, 8)
    n = changed(only("xflip", p=0.5)(x, generator=gen(10)), x)
    assert 65 <= n <= 135, n  # 100 expected, sd 8.7; 0.5 * 400 would fail


def test_rotation_before_or_after_aniso_happens_with_probability_p() -> None:
    x = torch.randn(400, 1, 8, 8)
    n = changed(only("rotate", p=0.5)(x, generator=gen(11)), x)
    assert 160 <= n <= 240, n  # 200 expected, sd 10; both rotations at p each (300) would fail


def test_p_above_one_applies_every_transform() -> None:
    x = torch.randn(200, 3, 4, 4)
    assert changed(only("brightness", p=1.5)(x, generator=gen(12)), x) == 200


# ----------------------------------------------------------------------------- the p rule


def test_ada_adjust_moves_toward_target_by_the_official_step() -> None:
    step = 64 * 4 / (500 * 1000)  # batch_size * interval / (ada_kimg * 1000)
    assert ada_adjust(0.5, 0.8, target=0.6, batch_size=64) == pytest.approx(0.5 + step)  # overfitting: more aug
    assert ada_adjust(0.5, 0.1, target=0.6, batch_size=64) == pytest.approx(0.5 - step)
    assert ada_adjust(0.5, 0.6, target=0.6, batch_size=64) == 0.5  # sign(0) = 0
    assert ada_adjust(0.2, 0.9, batch_size=32, interval=8, ada_kimg=100) == pytest.approx(0.2 + 32 * 8 / 100_000)
    assert ada_adjust(1e-4, -1.0, batch_size=64) == 0.0  # clamped at 0
    assert ada_adjust(1.0, 1.0, batch_size=64) == pytest.approx(1 + step)  # not clamped at 1 (official)


def test_ada_adjust_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="finite"):
        ada_adjust(0.5, float("nan"), batch_size=64)
    with pytest.raises(ValueError, match="batch_size"):
        ada_adjust(0.5, 0.7, batch_size=0)
