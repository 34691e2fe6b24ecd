"""StyleGAN2 networks (pipeline/models/stylegan2.py): parameter counts, state-dict names, outputs,
gradients and initialisation of the official NVlabs/stylegan2-ada-pytorch networks (recorded in
tests/data/stylegan2_official_tiny.pt by tests/tools/make_stylegan2_reference.py; the official code
is not imported here), and each piece against a direct computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.stylegan2 import (
    Conv2dLayer,
    Discriminator,
    FullyConnectedLayer,
    Generator,
    MinibatchStdLayer,
    SynthesisLayer,
    downsample2d,
    fir_filter,
    modulated_conv2d,
    setup_filter,
    upsample2d,
)

REFERENCE = Path(__file__).resolve().parent / "data" / "stylegan2_official_tiny.pt"
# The official networks' sizes (also recorded from the official code in the reference file).
PAPER_COUNTS = {"G_F1024": 30_370_060, "D_F1024": 29_012_513, "G_paper256": 24_767_458, "D_paper256": 24_001_089}


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(REFERENCE, weights_only=True)


def build(kind: str, kwargs: dict) -> torch.nn.Module:
    return (Generator if kind == "G" else Discriminator)(**kwargs)


def loaded(case: dict) -> torch.nn.Module:
    net = build(case["kind"], case["kwargs"])
    net.load_state_dict(case["state_dict"], strict=True)
    return net


def num_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2e-5, what: str = "") -> None:
    """Equal up to fp32 rounding: max |difference| within ``rel`` of the reference's largest value."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= rel * max(scale, 1e-6), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def direct_upfirdn(x, f, up=1, down=1, pad0=0, pad1=0, gain=1.0):
    """upfirdn2d by its definition: insert up-1 zeros after each pixel, pad (negative crops),
    convolve (f flipped, tap by tap), keep every down-th pixel."""
    n, c, h, w = x.shape
    u = x.new_zeros(n, c, h * up, w * up)
    u[:, :, ::up, ::up] = x
    u = F.pad(u, [pad0, pad1, pad0, pad1])
    k = f.shape[0]
    oh, ow = u.shape[2] - k + 1, u.shape[3] - k + 1
    out = sum(f[k - 1 - i, k - 1 - j] * u[:, :, i:i + oh, j:j + ow] for i in range(k) for j in range(k)) * gain
    return out[:, :, ::down, ::down]


# --------------------------------------------------------------------------- against the official code


@pytest.mark.parametrize("name", PAPER_COUNTS)
def test_paper_configs_have_the_official_parameter_counts_and_state_dict(ref, name):
    cfg = ref["configs"][name]
    with torch.device("meta"):
        net = build(cfg["kind"], cfg["kwargs"])
    assert num_params(net) == cfg["num_params"] == PAPER_COUNTS[name]
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == cfg["keys"]  # names, order, shapes


def test_tiny_networks_load_the_official_state_dicts_strictly(ref):
    for name, case in ref["cases"].items():
        net = loaded(case)
        assert num_params(net) == case["num_params"], name
        assert list(net.state_dict()) == list(case["state_dict"]), name


@pytest.mark.parametrize("name", ["G", "G_cond_resnet", "G_orig_init"])
def test_generator_equals_the_official(ref, name):
    case = ref["cases"][name]
    G, z, c = loaded(case).eval(), case["z"], case["c"]
    with torch.no_grad():
        assert_close(G.mapping(z, c), case["ws"], what="ws")
        for fused in (None, True, False):  # the official ran fused (eval mode); None is non-fused on CPU
            assert_close(G(z, c, noise_mode="const", fused_modconv=fused), case["img_const"], what=f"fused={fused}")
        assert_close(G(z, c, truncation_psi=0.7, noise_mode="const"), case["img_psi"], what="psi")
        assert_close(G(z, c, truncation_psi=0.5, truncation_cutoff=2, noise_mode="const"), case["img_cutoff"],
                     what="cutoff")
        G.train()
        assert_close(G(z, c, noise_mode="const"), case["img_train"], what="train")
        assert_close(G.mapping.w_avg, case["w_avg_after_train"], what="w_avg")
    ws = case["ws"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(G.synthesis(ws, noise_mode="const").square().sum(), ws)
    assert_close(grad, case["grad_ws"], rel=1e-4, what="grad ws")


def noise_layers(G: Generator) -> list[SynthesisLayer]:
    return [m for m in G.synthesis.modules() if isinstance(m, SynthesisLayer) and m.use_noise]


def with_noise(G: Generator, z, c, draws: list[torch.Tensor]) -> torch.Tensor:
    """G's output with given per-sample noise [N, 1, R, R] per layer: each sample alone, its draws
    set as the const noise."""
    out = []
    for n in range(len(z)):
        for m, d in zip(noise_layers(G), draws):
            m.noise_const.copy_(d[n, 0])
        out.append(G(z[n:n + 1], c[n:n + 1], noise_mode="const"))
    return torch.cat(out)


def test_random_noise_is_drawn_and_used_as_in_the_official_code(ref):
    case = ref["cases"]["G"]
    G, z, c = loaded(case).eval(), case["z"], case["c"]
    layers = noise_layers(G)
    assert all(m.noise_strength.item() != 0 for m in layers)
    official_draws = [case[f"noise{i}"] for i in range(len(layers))]
    with torch.no_grad():
        # How noise enters: the official output, given the noise the official code drew.
        assert_close(with_noise(G, z, c, official_draws), case["img_random"], what="official noise")
        # What is drawn: one N(0, 1) [N, 1, R, R] per layer, in the official order (replayed with
        # this torch's generator, which need not be the fixture's).
        torch.manual_seed(ref["noise_seed"])
        img = G(z, c, noise_mode="random")
        torch.manual_seed(ref["noise_seed"])
        draws = [torch.randn(d.shape) for d in official_draws]
        assert_close(img, with_noise(G, z, c, draws), what="draw order")


@pytest.mark.parametrize("name", ["D", "D_cond_skip", "D_orig_init"])
def test_discriminator_equals_the_official(ref, name):
    case = ref["cases"][name]
    D = loaded(case)
    img = case["img"].clone().requires_grad_(True)
    logits = D(img, case["c"])
    assert_close(logits, case["logits"], what="logits")
    (grad,) = torch.autograd.grad(logits.sum(), img)
    assert_close(grad, case["grad_img"], rel=1e-4, what="grad img")


@pytest.mark.parametrize("name", ["G_orig_init", "D_orig_init"])
def test_seeded_initialisation_equals_the_official(ref, name):
    case = ref["cases"][name]
    torch.manual_seed(case["init_seed"])
    net = build(case["kind"], case["kwargs"])  # draws in the official order
    for k, v in net.state_dict().items():
        assert_close(v, case["state_dict"][k], rel=1e-6, what=k)


# --------------------------------------------------------------------------- pieces, by hand


def test_initialisation_follows_the_official_scheme():
    torch.manual_seed(0)
    G = Generator(64, 0, 64, 8, 3, mapping_kwargs={"num_layers": 2}, synthesis_kwargs={"channel_max": 32})
    assert 90 < G.mapping.fc0.weight.std() < 110  # N(0, 1) / lr_multiplier 0.01
    assert torch.all(G.mapping.fc0.bias == 0) and torch.all(G.synthesis.b8.conv0.affine.bias == 1)
    assert 0.9 < G.synthesis.b8.conv0.weight.std() < 1.1 and 0.7 < G.synthesis.b4.const.std() < 1.3
    assert G.synthesis.b8.conv1.noise_strength.item() == 0 and torch.all(G.synthesis.b8.conv1.bias == 0)
    assert torch.all(G.mapping.w_avg == 0)


def test_equalized_learning_rate_scales_weights_by_lr_over_sqrt_fan_in():
    torch.manual_seed(0)
    fc = FullyConnectedLayer(8, 4, lr_multiplier=0.01, bias_init=0.5)
    x = torch.randn(3, 8)
    assert_close(fc(x), x @ (fc.weight * 0.01 / math.sqrt(8)).t() + fc.bias * 0.01)
    fc = FullyConnectedLayer(8, 4, activation="lrelu")
    assert_close(fc(x), F.leaky_relu(x @ (fc.weight / math.sqrt(8)).t(), 0.2) * math.sqrt(2))
    conv = Conv2dLayer(4, 5, 3, activation="lrelu", conv_clamp=0.3)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 4, 6, 6)
    direct = F.leaky_relu(F.conv2d(x, conv.weight / math.sqrt(4 * 9), conv.bias, padding=1), 0.2) * math.sqrt(2)
    assert_close(conv(x), direct.clamp(-0.3, 0.3))
    gain = math.sqrt(0.5)  # the residual gain scales the activation and the clamp
    assert_close(conv(x, gain=gain), (direct * gain).clamp(-0.3 * gain, 0.3 * gain))


def test_fir_resampling_equals_upfirdn2d_by_definition():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 7)
    f = torch.rand(4, 4)  # neither symmetric nor separable: catches flips and transposes
    assert_close(upsample2d(x, f), direct_upfirdn(x, f, up=2, pad0=2, pad1=1, gain=4))
    assert_close(downsample2d(x, f), direct_upfirdn(x, f, down=2, pad0=1, pad1=1))
    assert_close(fir_filter(x, f, 2, -1, gain=3.0), direct_upfirdn(x, f, pad0=2, pad1=-1, gain=3.0))
    const = torch.ones(1, 1, 8, 8)  # the [1,3,3,1] filter keeps the DC level away from the borders
    assert_close(upsample2d(const, setup_filter([1, 3, 3, 1]))[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12))


def test_downsampling_conv_filters_then_strides():
    torch.manual_seed(0)
    conv = Conv2dLayer(3, 4, 3, down=2)
    f = torch.rand(4, 4)
    with torch.no_grad():
        conv.resample_filter.copy_(f)
        conv.bias.normal_()
    x = torch.randn(2, 3, 8, 8)
    direct = F.conv2d(direct_upfirdn(x, f, pad0=2, pad1=2), conv.weight / math.sqrt(27), conv.bias, stride=2)
    assert_close(conv(x), direct)


def per_sample_modconv(x, weight, styles, demodulate=True, up=1, f=None):
    """One conv per sample with its own modulated (and demodulated) weights, paper eqs. 1–3."""
    out = []
    for n in range(len(x)):
        w = weight * styles[n].view(1, -1, 1, 1)
        if demodulate:
            w = w / (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
        if up == 1:
            out.append(F.conv2d(x[n:n + 1], w, padding=weight.shape[-1] // 2))
        else:  # official up path: zero-insert, pad, FIR ×4, then a true (flipped) convolution
            out.append(F.conv2d(direct_upfirdn(x[n:n + 1], f, up=2, pad0=3, pad1=2, gain=4), w.flip([2, 3])))
    return torch.cat(out)


@pytest.mark.parametrize("fused", [True, False])
def test_modulated_conv_equals_a_per_sample_convolution(fused):
    torch.manual_seed(0)
    x, weight, styles = torch.randn(3, 5, 6, 6), torch.randn(4, 5, 3, 3), torch.randn(3, 5)
    assert_close(modulated_conv2d(x, weight, styles, padding=1, fused_modconv=fused),
                 per_sample_modconv(x, weight, styles))
    assert_close(modulated_conv2d(x, weight, styles, padding=1, demodulate=False, fused_modconv=fused),
                 per_sample_modconv(x, weight, styles, demodulate=False))
    f = torch.rand(4, 4)
    assert_close(modulated_conv2d(x, weight, styles, up=2, padding=1, resample_filter=f, fused_modconv=fused),
                 per_sample_modconv(x, weight, styles, up=2, f=f))
    noise, bias = torch.randn(3, 1, 6, 6), torch.randn(4)
    assert_close(modulated_conv2d(x, weight, styles, noise=noise, padding=1, fused_modconv=fused, bias=bias, gain=2.0),
                 (per_sample_modconv(x, weight, styles) + noise + bias.view(1, -1, 1, 1)) * 2)
    w1 = torch.randn(3, 5, 1, 1)  # toRGB: 1×1, no demodulation
    assert_close(modulated_conv2d(x, w1, styles, demodulate=False, fused_modconv=fused),
                 per_sample_modconv(x, w1, styles, demodulate=False))


def test_minibatch_stddev_by_hand():
    torch.manual_seed(0)
    x = torch.randn(8, 6, 3, 3)
    y = MinibatchStdLayer(group_size=4, num_channels=2)(x)
    assert y.shape == (8, 8, 3, 3) and torch.equal(y[:, :6], x)
    for i in range(8):
        group = x[i % 2::2]  # groups of 4: samples i, i ± 2, i ± 4, … (the official reshape)
        for f in range(2):
            std = (group[:, 3 * f:3 * f + 3].var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
            assert_close(y[i, 6 + f], std.expand(3, 3), rel=1e-6)
    x = torch.randn(2, 4, 2, 2)  # a group larger than the batch: the whole batch
    std = (x.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
    assert_close(MinibatchStdLayer(group_size=4)(x)[:, 4], std.expand(2, 2, 2), rel=1e-6)


@pytest.mark.parametrize("res", [8, 32])
def test_shapes_and_num_ws(res):
    G = Generator(16, 3, 16, res, 3, mapping_kwargs={"num_layers": 2},
                  synthesis_kwargs={"channel_base": 64, "channel_max": 8, "num_fp16_res": 2, "conv_clamp": 256})
    assert G.num_ws == G.mapping.num_ws == 2 * int(math.log2(res)) - 2
    assert (G.z_dim, G.c_dim, G.w_dim, G.img_resolution) == (16, 3, 16, res)
    z, c = torch.randn(4, 16), torch.randn(4, 3)
    img = G(z, c)
    assert img.shape == (4, 3, res, res) and img.dtype == torch.float32  # fp16 layers: CUDA only
    assert G.mapping(z, c).shape == (4, G.num_ws, 16)
    D = Discriminator(3, res, 3, channel_base=64, channel_max=8, num_fp16_res=2, conv_clamp=256)
    assert D(img, c).shape == (4, 1)
    assert not torch.allclose(D(img, c), D(img, torch.randn(4, 3)))  # the label is projected
    frozen = Discriminator(0, res, 3, channel_base=64, channel_max=8, block_kwargs={"freeze_layers": 2})
    assert set(frozen.state_dict()) == set(Discriminator(0, res, 3, channel_base=64, channel_max=8).state_dict())
    first = getattr(frozen, f"b{res}")  # Freeze-D: its first two layers (fromrgb, conv0) as buffers
    assert {n for n, _ in first.named_parameters()} == {"conv1.weight", "conv1.bias", "skip.weight"}


def test_truncation_and_w_avg_tracking():
    torch.manual_seed(0)
    G = Generator(8, 0, 8, 8, 3, mapping_kwargs={"num_layers": 2}, synthesis_kwargs={"channel_max": 8}).eval()
    G.mapping.w_avg.normal_()
    z, c = torch.randn(3, 8), torch.zeros(3, 0)
    ws = G.mapping(z, c)
    assert_close(G.mapping(z, c, truncation_psi=0), G.mapping.w_avg.expand_as(ws), rel=1e-6)
    cut = G.mapping(z, c, truncation_psi=0.5, truncation_cutoff=2)
    assert_close(cut[:, :2], G.mapping.w_avg + 0.5 * (ws[:, :2] - G.mapping.w_avg))
    assert torch.equal(cut[:, 2:], ws[:, 2:])
    before = G.mapping.w_avg.clone()
    G.mapping(z, c)  # eval: no update
    G.train().mapping(z, c, skip_w_avg_update=True)
    assert torch.equal(G.mapping.w_avg, before)
    G.mapping(z, c)
    assert_close(G.mapping.w_avg, ws[:, 0].mean(0) + 0.995 * (before - ws[:, 0].mean(0)), rel=1e-6)


def test_noise_modes():
    torch.manual_seed(0)
    G = Generator(8, 0, 8, 8, 3, mapping_kwargs={"num_layers": 2}, synthesis_kwargs={"channel_max": 8}).eval()
    z, c = torch.randn(2, 8), torch.zeros(2, 0)
    assert torch.equal(G(z, c, noise_mode="none"), G(z, c, noise_mode="const"))  # strength 0 at init
    for m in noise_layers(G):
        m.noise_strength.data.fill_(0.5)
    none, const = G(z, c, noise_mode="none"), G(z, c, noise_mode="const")
    assert not torch.allclose(none, const) and torch.equal(const, G(z, c, noise_mode="const"))
    assert not torch.allclose(G(z, c), G(z, c))  # random: fresh noise each call
    with pytest.raises(ValueError, match="noise_mode"):
        G(z, c, noise_mode="fixed")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_layers_on_cuda_stay_close_to_fp32():
    torch.manual_seed(0)
    G = Generator(32, 0, 32, 32, 3, synthesis_kwargs={"channel_max": 32, "num_fp16_res": 2, "conv_clamp": 256})
    G = G.cuda().eval()
    z = torch.randn(4, 32, device="cuda")
    img16, img32 = G(z, None, noise_mode="const"), G(z, None, noise_mode="const", force_fp32=True)
    assert img16.dtype == torch.float32 and (img16 - img32).abs().max() < 0.05 * img32.abs().max()
