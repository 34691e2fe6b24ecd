"""Unit tests for pipeline.losses on hand-computed inputs: adversarial kinds, pix2pixHD multiscale
reduction, fp32 under low precision, WGAN-GP / R1 on critics whose gradients are known, clipping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses.adversarial import (
    ADVERSARIAL_KINDS,
    d_loss,
    d_loss_fake,
    d_loss_real,
    final_logits,
    g_loss,
)
from pipeline.losses.regularizers import gradient_penalty, r1_penalty, weight_clip_


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def assert_scalar(value: torch.Tensor, expected: float, *, tol: float = 1e-6) -> None:
    assert value.ndim == 0 and value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=tol, abs=tol)


# ----------------------------------------------------------------------------- adversarial kinds


def test_lsgan_hand_values() -> None:
    real, fake = d_loss("lsgan", t(1.0, 0.0), t(0.0, 1.0))
    assert_scalar(real, ((1 - 1) ** 2 + (0 - 1) ** 2) / 2)  # 0.5
    assert_scalar(fake, (0**2 + 1**2) / 2)  # 0.5
    real, fake = d_loss("lsgan", t(2.0, -1.0), t(3.0, 0.5))
    assert_scalar(real, (1**2 + 2**2) / 2)  # 2.5
    assert_scalar(fake, (9 + 0.25) / 2)
    assert_scalar(g_loss("lsgan", t(3.0, 0.5)), (4 + 0.25) / 2)


def test_vanilla_is_bce_with_logits_by_hand() -> None:
    real_x, fake_x = [0.5, -2.0, 3.0], [-1.5, 0.25]

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    real, fake = d_loss("vanilla", t(*real_x), t(*fake_x))
    assert_scalar(real, sum(-math.log(sigmoid(x)) for x in real_x) / 3)
    assert_scalar(fake, sum(-math.log(1 - sigmoid(x)) for x in fake_x) / 2)
    # Non-saturating G: -log(sigmoid(D(G(z)))), not log(1 - sigmoid(...)).
    assert_scalar(g_loss("vanilla", t(*fake_x)), sum(-math.log(sigmoid(x)) for x in fake_x) / 2)


def test_vanilla_matches_official_sigmoid_plus_bce_form() -> None:
    # pix2pixHD's "no_lsgan" D ends in nn.Sigmoid and uses nn.BCELoss; same value for moderate logits.
    x = torch.linspace(-6, 6, 25).reshape(1, 1, 5, 5)
    assert torch.allclose(d_loss_real("vanilla", x), F.binary_cross_entropy(torch.sigmoid(x), torch.ones_like(x)))
    assert torch.allclose(d_loss_fake("vanilla", x), F.binary_cross_entropy(torch.sigmoid(x), torch.zeros_like(x)))


def test_vanilla_is_finite_for_extreme_logits() -> None:
    real, fake = d_loss("vanilla", t(-200.0), t(200.0))
    assert_scalar(real, 200.0)
    assert_scalar(fake, 200.0)


def test_hinge_hand_values() -> None:
    real, fake = d_loss("hinge", t(0.5, 2.0, -1.0), t(-2.0, 0.5))
    assert_scalar(real, (0.5 + 0.0 + 2.0) / 3)  # relu(1 - x)
    assert_scalar(fake, (0.0 + 1.5) / 2)  # relu(1 + x)
    assert_scalar(g_loss("hinge", t(-2.0, 0.5)), -(-2.0 + 0.5) / 2)


def test_wgan_hand_values() -> None:
    real, fake = d_loss("wgan", t(1.0, 3.0), t(0.5, -1.5))
    assert_scalar(real, -2.0)
    assert_scalar(fake, -0.5)
    assert_scalar(real + fake, -0.5 - 2.0)  # critic loss E[D(fake)] - E[D(real)]
    assert_scalar(g_loss("wgan", t(0.5, -1.5)), 0.5)


@pytest.mark.parametrize("kind", ADVERSARIAL_KINDS)
def test_mean_over_all_elements_of_patch_logits(kind: str) -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(2, 1, 2, 3) / 4 - 1
    flat = x.flatten()
    assert torch.equal(g_loss(kind, x), g_loss(kind, flat))
    assert torch.equal(d_loss_real(kind, x), d_loss_real(kind, flat))


def test_bad_kind_names_allowed_kinds() -> None:
    for call in (lambda: d_loss("bce", t(1.0), t(0.0)), lambda: g_loss("LSGAN", t(1.0))):
        with pytest.raises(ValueError) as excinfo:
            call()
        message = str(excinfo.value)
        assert all(kind in message for kind in ("vanilla", "lsgan", "hinge", "wgan"))
    assert ADVERSARIAL_KINDS == ("vanilla", "lsgan", "hinge", "wgan")


def test_bad_scale_reduction_and_bad_structure() -> None:
    with pytest.raises(ValueError, match="sum, mean"):
        g_loss("lsgan", t(1.0), scale_reduction="max")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="non-empty"):
        g_loss("lsgan", [])
    with pytest.raises(TypeError, match="scale 1"):
        g_loss("lsgan", [[t(1.0)], []])
    with pytest.raises(TypeError, match="must be a tensor"):
        g_loss("lsgan", [[t(1.0), 2.0]])  # type: ignore[list-item]


# ----------------------------------------------------------------------------- multiscale (pix2pixHD)


def multiscale_output() -> list[list[torch.Tensor]]:
    """Two scales in MultiscaleDiscriminator's shape: intermediate features, then logits last.
    The features hold values that would change every loss if they were used."""
    scale0 = [torch.full((1, 4, 2, 2), 100.0), t(1.0, 0.0).reshape(1, 1, 1, 2)]
    scale1 = [torch.full((1, 8, 1, 1), -100.0), torch.full((1, 3, 1, 1), 7.0), t(3.0).reshape(1, 1, 1, 1)]
    return [scale0, scale1]


def test_multiscale_sums_per_scale_means_like_pix2pixhd() -> None:
    out = multiscale_output()
    assert [x.shape for x in final_logits(out)] == [(1, 1, 1, 2), (1, 1, 1, 1)]
    # GANLoss.__call__: loss += MSELoss(input_i[-1], target) for each scale -> a sum, not a mean.
    real_s0, real_s1 = ((1 - 1) ** 2 + (0 - 1) ** 2) / 2, (3 - 1) ** 2  # 0.5, 4
    fake_s0, fake_s1 = (1**2 + 0**2) / 2, 3**2  # 0.5, 9
    real, fake = d_loss("lsgan", out, out)
    assert_scalar(real, real_s0 + real_s1)  # 4.5
    assert_scalar(fake, fake_s0 + fake_s1)  # 9.5
    assert_scalar(g_loss("lsgan", out), real_s0 + real_s1)
    # SPADE's GANLoss divides by the number of scales instead.
    assert_scalar(g_loss("lsgan", out, scale_reduction="mean"), (real_s0 + real_s1) / 2)
    hinge_real_s0, hinge_real_s1 = (0 + 1) / 2, 0.0  # relu(1 - [1, 0]), relu(1 - 3)
    assert_scalar(d_loss_real("hinge", out), hinge_real_s0 + hinge_real_s1)


def test_flat_list_uses_only_last_element() -> None:
    # One D with getIntermFeat: [feat_1, ..., logits]; pix2pixHD's GANLoss takes input[-1].
    feats_then_logits = [torch.full((2, 4), 50.0), t(2.0, -1.0)]
    assert_scalar(d_loss_real("lsgan", feats_then_logits), 2.5)
    assert_scalar(d_loss_real("lsgan", tuple(feats_then_logits)), 2.5)


def test_multiscale_gradient_reaches_only_logits() -> None:
    out = [[x.clone().requires_grad_(True) for x in scale] for scale in multiscale_output()]
    g_loss("lsgan", out).backward()
    assert out[0][0].grad is None and out[1][0].grad is None and out[1][1].grad is None
    # d/dx sum_scales mean (x - 1)^2 = 2 (x - 1) / numel
    assert torch.allclose(out[0][1].grad, t(0.0, -1.0).reshape(1, 1, 1, 2))
    assert torch.allclose(out[1][2].grad, t(4.0).reshape(1, 1, 1, 1))


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("kind", ADVERSARIAL_KINDS)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_logits_give_fp32_result(kind: str, low: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    real32 = torch.randn(4, 1, 6, 6, generator=gen) * 3
    fake32 = torch.randn(4, 1, 6, 6, generator=gen) * 3
    real_low, fake_low = real32.to(low), fake32.to(low)
    losses_low = (*d_loss(kind, real_low, fake_low), g_loss(kind, fake_low))
    # Exactly the fp32 computation on the rounded inputs: the upcast happens before any arithmetic.
    losses_rounded = (*d_loss(kind, real_low.float(), fake_low.float()), g_loss(kind, fake_low.float()))
    losses_32 = (*d_loss(kind, real32, fake32), g_loss(kind, fake32))
    for lo, rounded, full in zip(losses_low, losses_rounded, losses_32):
        assert lo.dtype == torch.float32
        assert torch.equal(lo, rounded)
        # Within the inputs' rounding (bf16: 8 mantissa bits; |x| up to ~10).
        assert torch.allclose(lo, full, rtol=2e-2, atol=5e-2)


def test_fp32_loss_from_autocast_logits_backprops_to_fp32_params() -> None:
    D = nn.Linear(8, 1)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = D(x)
        loss = g_loss("vanilla", logits)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert D.weight.grad is not None and D.weight.grad.dtype == torch.float32


# ----------------------------------------------------------------------------- gradient penalty

# A linear critic D(x) = <w, x> has grad_x D = w everywhere, so the GP is (||w|| - center)^2 and
# R1 is ||w||^2, whatever the samples and the interpolation.
W = torch.tensor([[1.0, 2.0], [2.0, 4.0]]).reshape(1, 1, 2, 2)  # ||W|| = sqrt(1 + 4 + 4 + 16) = 5


def linear_critic(x: torch.Tensor) -> torch.Tensor:
    return (x * W).flatten(1).sum(dim=1)  # [N]


def test_gradient_penalty_linear_critic_is_exact_and_independent_of_interpolation() -> None:
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(6, 1, 2, 2, generator=gen), torch.randn(6, 1, 2, 2, generator=gen)
    for seed in (0, 1, 2):
        gp = gradient_penalty(linear_critic, real, fake, generator=torch.Generator().manual_seed(seed))
        assert_scalar(gp, (5 - 1) ** 2)  # 16
    assert_scalar(gradient_penalty(linear_critic, real * 10, -fake), 16.0)
    assert_scalar(gradient_penalty(linear_critic, real, fake, center=0.0), 25.0)


def test_gradient_penalty_interpolates_per_sample_between_real_and_fake() -> None:
    gen = torch.Generator().manual_seed(3)
    real, fake = torch.randn(5, 3, 4, 4, generator=gen), torch.randn(5, 3, 4, 4, generator=gen)
    seen: list[torch.Tensor] = []

    def recording_critic(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.detach().clone())
        return x.square().flatten(1).sum(dim=1)

    gradient_penalty(recording_critic, real, fake, generator=torch.Generator().manual_seed(7))
    (x_hat,) = seen
    alpha = (x_hat - real) / (fake - real)  # one coefficient per sample, shared by every element
    per_sample = alpha.flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample), atol=1e-4)
    assert ((per_sample >= 0) & (per_sample <= 1)).all()
    assert per_sample[:, 0].unique().numel() == 5


def test_gradient_penalty_is_deterministic_given_generator() -> None:
    gen = torch.Generator().manual_seed(4)
    real, fake = torch.randn(4, 2, 3, 3, generator=gen), torch.randn(4, 2, 3, 3, generator=gen)

    def quadratic_critic(x: torch.Tensor) -> torch.Tensor:
        return x.square().flatten(1).sum(dim=1)

    runs = [
        gradient_penalty(quadratic_critic, real, fake, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_gradient_penalty_backprops_into_critic_params() -> None:
    D = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        D.weight.copy_(t(3.0, 4.0).reshape(1, 2))
    gen = torch.Generator().manual_seed(0)
    gp = gradient_penalty(D, torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen))
    assert_scalar(gp, 16.0)
    gp.backward()
    # d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w|| = 2 * 4 * [0.6, 0.8]
    assert torch.allclose(D.weight.grad, t(4.8, 6.4).reshape(1, 2))


def test_gradient_penalty_with_conditional_critic_ignores_the_condition() -> None:
    # D([c, x]) = <w_c, c> + <w_x, x>; only x is interpolated, so only w_x = [3, 4] counts.
    D = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        D.weight.copy_(t(12.0, 3.0, 4.0).reshape(1, 3))
    cond = torch.randn(4, 1)
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(4, 2, generator=gen), torch.randn(4, 2, generator=gen)
    gp = gradient_penalty(lambda x: D(torch.cat([cond, x], dim=1)), real, fake)
    assert_scalar(gp, 16.0)


def test_gradient_penalty_runs_in_fp32_under_autocast() -> None:
    D = nn.Linear(8, 1)  # default init: weights are not representable in bf16
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    expected = (D.weight.norm() - 1).square()
    assert (D.weight.bfloat16().float().norm() - 1).square() != expected  # a bf16 path would show
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        gp = gradient_penalty(D, real.bfloat16(), fake.bfloat16(), generator=torch.Generator().manual_seed(0))
        r1 = r1_penalty(D, real.bfloat16())
    assert gp.dtype == torch.float32 and r1.dtype == torch.float32
    assert torch.allclose(gp, expected, rtol=1e-6)
    assert torch.allclose(r1, D.weight.square().sum(), rtol=1e-6)


def test_gradient_penalty_accepts_multiscale_output_and_checks_shapes() -> None:
    # Logits of both scales are summed before differentiating: grad = w + w = 2w, ||2W|| = 10.
    gp = gradient_penalty(
        lambda x: [[x, linear_critic(x)], [linear_critic(x)]], torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    )
    assert_scalar(gp, (10 - 1) ** 2)
    with pytest.raises(ValueError, match="same shape"):
        gradient_penalty(linear_critic, torch.zeros(2, 1, 2, 2), torch.zeros(3, 1, 2, 2))


# ----------------------------------------------------------------------------- R1


def test_r1_linear_critic_is_squared_norm() -> None:
    real = torch.randn(7, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    assert_scalar(r1_penalty(linear_critic, real), 25.0)  # ||W||^2


def test_r1_is_per_sample_sum_then_batch_mean() -> None:
    # D(x) = sum(x^2): grad = 2x, so sample i contributes 4 ||x_i||^2; R1 is their batch mean.
    real = torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.0, 0.0]])

    def quadratic_critic(x: torch.Tensor) -> torch.Tensor:
        return x.square().sum(dim=1)

    assert_scalar(r1_penalty(quadratic_critic, real), (4 * 1 + 4 * 5 + 0) / 3)


def test_r1_backprops_into_critic_params_and_leaves_input_alone() -> None:
    D = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        D.weight.copy_(t(3.0, 4.0).reshape(1, 2))
    real = torch.randn(3, 2)
    r1 = r1_penalty(D, real)
    assert_scalar(r1, 25.0)
    r1.backward()
    assert torch.allclose(D.weight.grad, t(6.0, 8.0).reshape(1, 2))  # d/dw ||w||^2 = 2w
    assert not real.requires_grad


# ----------------------------------------------------------------------------- weight clipping


def test_weight_clip_clamps_every_parameter_in_place() -> None:
    D = nn.Linear(3, 1)
    with torch.no_grad():
        D.weight.copy_(t(-0.5, 0.005, 0.02).reshape(1, 3))
        D.bias.fill_(-3.0)
    weight_before = D.weight
    weight_clip_(D, 0.01)
    assert D.weight is weight_before
    assert torch.equal(D.weight.detach(), t(-0.01, 0.005, 0.01).reshape(1, 3))
    assert torch.equal(D.bias.detach(), t(-0.01))
    with pytest.raises(ValueError, match="> 0"):
        weight_clip_(D, 0.0)


# ---------------------------------------------------------------- RpGAN + R1 + R2 (Huang et al. 2024)


def test_rpgan_pairs_each_real_with_its_fake_by_hand() -> None:
    from pipeline.losses.adversarial import rpgan_d_loss, rpgan_g_loss

    real, fake = t(2.0, -1.0, 0.5), t(0.0, 1.0, 0.5)
    # D: -log sigmoid(D(x_i) - D(G(z_i))); G: -log sigmoid(D(G(z_i)) - D(x_i)).
    d = [-math.log(1 / (1 + math.exp(-(r - f)))) for r, f in ((2.0, 0.0), (-1.0, 1.0), (0.5, 0.5))]
    assert_scalar(rpgan_d_loss(real, fake), sum(d) / 3)
    g = [-math.log(1 / (1 + math.exp(-(f - r)))) for r, f in ((2.0, 0.0), (-1.0, 1.0), (0.5, 0.5))]
    assert_scalar(rpgan_g_loss(fake, real), sum(g) / 3)
    # Relativistic: shifting every logit by one constant changes nothing.
    assert_scalar(rpgan_d_loss(real + 7, fake + 7), sum(d) / 3)
    with pytest.raises(ValueError, match="one shape"):
        rpgan_d_loss(t(1.0, 2.0), t(1.0))


def test_r1_and_r2_are_squared_input_gradients_per_sample_and_reach_d() -> None:
    from pipeline.losses.regularizers import cosine_decay, zero_centred_penalty

    torch.manual_seed(0)
    D = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 1))
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    penalty = zero_centred_penalty(D(x).squeeze(1), x)
    for i in range(4):  # each sample's own gradient, as the Jacobian computes it
        xi = x[i : i + 1].detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(D(xi).sum(), xi)
        assert penalty[i].item() == pytest.approx(float(grad.square().sum()), rel=1e-6)
    penalty.mean().backward()
    assert D[1].weight.grad is not None and D[1].weight.grad.abs().sum() > 0  # the graph reaches D's weights
    assert cosine_decay(10.0, 1.0, 0, 100) == 10.0 and cosine_decay(10.0, 1.0, 50, 100) == pytest.approx(5.5)
    assert cosine_decay(10.0, 1.0, 100, 100) == pytest.approx(1.0) and cosine_decay(10.0, None, 50, 100) == 10.0
