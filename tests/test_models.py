"""Unit tests of the networks: published parameter counts, shapes, dropout, init, spectral norm,
normalization choices and gradient flow."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.models import (
    DCGANDiscriminator,
    DCGANGenerator,
    NLayerDiscriminator,
    PixelDiscriminator,
    UnetGenerator,
    unet_128,
    unet_256,
)
from pipeline.models.layers import init_weights, norm_layer, spectral_norm

CONV_TYPES = (nn.Conv2d, nn.ConvTranspose2d)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def convs(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, CONV_TYPES)]


# ----------------------------------------------------------------------------- parameter counts


def test_unet_256_parameter_count_matches_official():
    # The official train.py prints "Total number of parameters : 54.414 M" for netG unet_256.
    with torch.device("meta"):
        G = unet_256(input_nc=3, output_nc=3, ngf=64, norm="batch")
    assert num_params(G) == 54_413_955
    assert round(num_params(G) / 1e6, 3) == 54.414


def test_patchgan_parameter_count_matches_official():
    # 70×70 PatchGAN on [input, output] (6 channels): "2.769 M" in the official printout.
    with torch.device("meta"):
        D = NLayerDiscriminator(input_nc=6, ndf=64, n_layers=3, norm="batch")
    assert num_params(D) == 2_768_705
    assert round(num_params(D) / 1e6, 3) == 2.769


def test_dcgan_parameter_counts_match_pytorch_example():
    # G: 100·512·16 + 512·256·16 + 256·128·16 + 128·64·16 + 64·3·16 weights, 2·(512+256+128+64) BN.
    # D: 3·64·16 + 64·128·16 + 128·256·16 + 256·512·16 + 512·16 weights, 2·(128+256+512) BN.
    with torch.device("meta"):
        G = DCGANGenerator(z_dim=100, ngf=64, out_channels=3, image_size=64)
        D = DCGANDiscriminator(in_channels=3, ndf=64, image_size=64)
    assert num_params(G) == 3_576_704
    assert num_params(D) == 2_765_568


def test_bias_only_without_a_norm_shift():
    # Instance norm has no affine shift, so the convs before it keep their biases.
    with torch.device("meta"):
        batch, instance = unet_128(norm="batch"), unet_128(norm="instance")
    assert sum(c.bias is not None for c in convs(batch)) == 1  # the outermost transposed conv
    assert all(c.bias is not None for c in convs(instance))
    with torch.device("meta"):
        assert all(c.bias is None for c in convs(DCGANDiscriminator(norm="batch")))
        assert all(c.bias is not None for c in convs(DCGANDiscriminator(norm="none")))


# ----------------------------------------------------------------------------- shapes


def test_unet_256_and_patchgan_shapes_on_256():
    G = unet_256(ngf=8)
    D = NLayerDiscriminator(ndf=8)
    x = torch.randn(2, 3, 256, 256)
    y = G(x)
    assert y.shape == (2, 3, 256, 256)
    assert y.abs().max() <= 1
    assert D(torch.cat([x, y], dim=1)).shape == (2, 1, 30, 30)


def test_unet_128_shape_and_size_check():
    G = unet_128(ngf=8, input_nc=1, output_nc=2).eval()
    assert G(torch.randn(1, 1, 128, 128)).shape == (1, 2, 128, 128)
    with pytest.raises(ValueError, match="divisible by 128"):
        G(torch.randn(1, 1, 96, 96))
    with pytest.raises(ValueError, match="num_downs"):
        UnetGenerator(num_downs=4)


def test_pixel_discriminator_shape():
    assert PixelDiscriminator(ndf=8)(torch.randn(2, 6, 16, 16)).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_dcgan_shapes(size):
    G = DCGANGenerator(ngf=8, image_size=size)
    D = DCGANDiscriminator(ndf=8, image_size=size)
    x = G(torch.randn(3, 100))
    assert x.shape == (3, 3, size, size)
    assert D(x).shape == (3,)
    assert G.eval()(torch.randn(2, 100, 1, 1)).shape == (2, 3, size, size)


def test_dcgan_rejects_bad_sizes():
    with pytest.raises(ValueError, match="image_size"):
        DCGANGenerator(image_size=48)
    with pytest.raises(ValueError, match="z must be"):
        DCGANGenerator(ngf=8)(torch.randn(2, 99))
    with pytest.raises(ValueError, match="64×64"):
        DCGANDiscriminator(ndf=8)(torch.randn(2, 3, 128, 128))
    with pytest.raises(ValueError, match="'batch', 'layer' or 'none'"):
        DCGANDiscriminator(norm="instance")


# ----------------------------------------------------------------------------- dropout


def test_unet_dropout_is_noise_in_train_mode_only():
    G = unet_256(ngf=8)
    assert sum(isinstance(m, nn.Dropout) for m in G.modules()) == 3  # num_downs - 5
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert not torch.equal(G.train()(x), G(x))
        G.eval()
        assert torch.equal(G(x), G(x))
    plain = unet_128(ngf=8, use_dropout=False)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(plain(x), plain(x))


# ----------------------------------------------------------------------------- init


def test_init_is_normal_0_02():
    torch.manual_seed(0)
    D = DCGANDiscriminator()
    w = torch.cat([c.weight.flatten() for c in convs(D)])
    assert abs(w.std().item() - 0.02) < 0.0005
    assert abs(w.mean().item()) < 0.0005
    bn = [m for m in D.modules() if isinstance(m, nn.BatchNorm2d)]
    scale = torch.cat([m.weight for m in bn])
    assert abs(scale.mean().item() - 1) < 0.005
    assert all(torch.count_nonzero(m.bias) == 0 for m in bn)
    G = unet_128(ngf=16, norm="instance")
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs(G))
    assert abs(torch.cat([c.weight.flatten() for c in convs(G)]).std().item() - 0.02) < 0.0005


def test_init_weights_kinds():
    torch.manual_seed(0)
    layer = nn.Linear(256, 64)
    init_weights(layer, "orthogonal", gain=0.5)
    w = layer.weight.detach()
    assert torch.allclose(w @ w.T, 0.25 * torch.eye(64), atol=1e-5)
    init_weights(layer, "kaiming")
    assert abs(layer.weight.std().item() - (2 / 256) ** 0.5) < 0.01
    init_weights(layer, "xavier", gain=1.0)
    assert abs(layer.weight.std().item() - (2 / (256 + 64)) ** 0.5) < 0.01
    with pytest.raises(ValueError, match="normal, xavier, kaiming, orthogonal"):
        init_weights(layer, "uniform")


def test_init_weights_reaches_spectrally_normed_weights():
    conv = spectral_norm(nn.Conv2d(64, 64, 3))
    init_weights(conv, "normal", gain=0.5)
    assert abs(conv.parametrizations.weight.original.std().item() - 0.5) < 0.02


# ----------------------------------------------------------------------------- norms and spectral norm


def test_norm_layer_kinds():
    inorm = norm_layer("instance", 8)
    assert isinstance(inorm, nn.InstanceNorm2d)
    assert not inorm.affine and not inorm.track_running_stats
    assert isinstance(norm_layer("batch", 8), nn.BatchNorm2d)
    assert isinstance(norm_layer("layer", 8), nn.GroupNorm)
    assert isinstance(norm_layer("none", 8), nn.Identity)
    with pytest.raises(ValueError, match="batch, instance, layer, none"):
        norm_layer("spectral", 8)


@pytest.mark.parametrize("norm", ["layer", "none"])
def test_critic_without_batchnorm_is_per_sample(norm):
    # The WGAN-GP penalty is per sample: each critic output must depend on its own image only.
    D = DCGANDiscriminator(ndf=8, norm=norm)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in D.modules()) == (norm == "layer")
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(D(x)[:1], D(x[:1]))


def test_spectral_norm_wraps_every_conv():
    assert not any(parametrize.is_parametrized(c) for c in convs(DCGANDiscriminator(ndf=8)))
    D = DCGANDiscriminator(ndf=16, norm="none", spectral_norm=True)
    assert all(parametrize.is_parametrized(c, "weight") for c in convs(D))
    D.train()
    with torch.no_grad():
        for _ in range(5):
            D(torch.randn(2, 3, 64, 64))
    for c in convs(D):
        sigma = torch.linalg.matrix_norm(c.weight.detach().flatten(1), ord=2)
        assert abs(sigma.item() - 1) < 0.05


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(24, 12, 3), lambda: nn.ConvTranspose2d(12, 6, 4),
                                  lambda: nn.Linear(20, 30), lambda: nn.Embedding(10, 7)],
                         ids=["conv", "transposed", "linear", "embedding"])
def test_spectral_norm_is_torchs_with_a_closed_form_backward(make):
    from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

    from pipeline.models.layers import spectral_norm_weight

    def built(wrap):
        torch.manual_seed(0)
        layer = make()
        torch.manual_seed(1)  # the power-iteration start vectors
        return wrap(layer)

    theirs, ours = built(torch_spectral_norm), built(spectral_norm_weight)
    assert theirs.state_dict().keys() == ours.state_dict().keys()  # checkpoints load either way
    shape = theirs.parametrizations.weight.original.shape  # (reading .weight would iterate)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    for _ in range(3):  # training forwards: one power iteration each, the buffers updated alike
        weights = [layer.weight for layer in (theirs, ours)]
        torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=0)
        for w in weights:
            (w * g).sum().backward()
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0, msg=key)
        original = [layer.parametrizations.weight.original.grad for layer in (theirs, ours)]
        torch.testing.assert_close(original[1], original[0], rtol=1e-5, atol=1e-7)
        assert (original[0] - g / torch.linalg.matrix_norm(theirs.parametrizations.weight.original.flatten(1), 2)
                ).abs().max() > 1e-3  # σ's own gradient is there, not just g / σ
    ours.eval()
    sn = ours.parametrizations.weight[0]
    u, v = sn._u.clone(), sn._v.clone()
    original = ours.parametrizations.weight.original.detach()
    sigma = u @ original.movedim(sn.dim, 0).flatten(1) @ v
    torch.testing.assert_close(ours.weight.detach(), original / sigma)
    assert torch.equal(sn._u, u) and torch.equal(sn._v, v)  # evaluation does not iterate


def test_spectral_norm_keeps_sigma_in_fp32_under_autocast():
    from pipeline.models.layers import spectral_norm_weight

    layer = spectral_norm_weight(nn.Conv2d(64, 64, 3))
    layer.eval()
    exact = layer.weight.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = layer.weight
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.detach(), exact, rtol=0, atol=0)


# ----------------------------------------------------------------------------- gradients


def assert_all_grads(*nets: nn.Module) -> None:
    for net in nets:
        for name, p in net.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_gradients_reach_every_parameter():
    G, D = unet_128(ngf=8), NLayerDiscriminator(ndf=8)
    x = torch.randn(2, 3, 128, 128)
    D(torch.cat([x, G(x)], dim=1)).mean().backward()
    assert_all_grads(G, D)

    G = DCGANGenerator(ngf=8, image_size=32)
    D = DCGANDiscriminator(ndf=8, image_size=32, norm="layer", spectral_norm=True)
    D(G(torch.randn(4, 100))).mean().backward()
    assert_all_grads(G, D)
