"""Unit tests of pix2pixHD: published parameter counts, output shapes at the paper's resolutions,
the discriminator's scale order and feature pyramid, local-enhancer weight loading, instance-wise
pooling and feature clustering, the feature-matching loss on hand-computed inputs and the VGG loss
against a seeded random VGG19 state_dict written by the test."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses.feature_matching import feature_matching_loss
from pipeline.losses.perceptual import VGG19Features, VGGLoss, load_vgg19_features
from pipeline.models.pix2pixhd import (
    Encoder,
    GlobalGenerator,
    LocalEnhancer,
    MultiscaleDiscriminator,
    cluster_features,
    collect_instance_features,
    instance_average,
)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_params(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


# ----------------------------------------------------------------------------- parameter counts


def test_global_generator_parameter_count_matches_published() -> None:
    # Cityscapes: 35 label channels + the instance edge map; the official --netG global defaults.
    with torch.device("meta"):
        G = GlobalGenerator(36, output_nc=3, ngf=64, n_downsample=4, n_blocks=9)
    by_hand = (
        conv_params(36, 64, 7)
        + sum(conv_params(64 * 2**i, 128 * 2**i, 3) for i in range(4))
        + 9 * 2 * conv_params(1024, 1024, 3)
        + sum(conv_params(1024 // 2**i, 512 // 2**i, 3) for i in range(4))
        + conv_params(64, 3, 7)
    )
    assert num_params(G) == by_hand == 182_546_755
    assert abs(num_params(G) - 182.5e6) < 0.1e6


def test_multiscale_discriminator_parameter_count_matches_published() -> None:
    # 36 label/edge channels + the 3-channel image; the official train options (num_D=2).
    with torch.device("meta"):
        D = MultiscaleDiscriminator(39, ndf=64, n_layers=3, num_D=2)
    per_scale = (
        conv_params(39, 64, 4)
        + conv_params(64, 128, 4)
        + conv_params(128, 256, 4)
        + conv_params(256, 512, 4)
        + conv_params(512, 1, 4)
    )
    assert num_params(D) == 2 * per_scale == 5_603_202
    assert abs(num_params(D) - 5.6e6) < 0.1e6
    with torch.device("meta"):
        assert num_params(MultiscaleDiscriminator(39, num_D=3)) == 3 * per_scale  # the paper's num_D=3
        assert num_params(MultiscaleDiscriminator(39)) == 2 * per_scale  # the official option's default


def test_local_enhancer_and_encoder_parameter_counts() -> None:
    with torch.device("meta"):
        G = LocalEnhancer(36)  # ngf 32: the global part is a 64-wide, 3-downsampling GlobalGenerator
        G1 = GlobalGenerator(36, ngf=64, n_downsample=3, n_blocks=9)
        E = Encoder(input_nc=3, output_nc=3, ngf=16, n_downsampling=4)
    assert num_params(G.global_generator) == num_params(G1) - conv_params(64, 3, 7) == 45_687_424
    local = (
        conv_params(36, 32, 7)
        + conv_params(32, 64, 3)
        + 3 * 2 * conv_params(64, 64, 3)
        + conv_params(64, 32, 3)
        + conv_params(32, 3, 7)
    )
    assert sum(p.numel() for p in G.local_parameters()) == local == 319_715
    assert num_params(G) == 46_007_139
    assert num_params(E) == 788_803


# ----------------------------------------------------------------------------- generator shapes


def test_generators_keep_the_paper_resolutions() -> None:
    # Full-width official configurations on meta tensors: shapes without the compute.
    with torch.device("meta"):
        G = GlobalGenerator(36)
        L = LocalEnhancer(36)
        assert G(torch.empty(1, 36, 512, 1024)).shape == (1, 3, 512, 1024)
        assert L(torch.empty(1, 36, 1024, 2048)).shape == (1, 3, 1024, 2048)


def test_small_generators_run_for_real_and_end_in_tanh() -> None:
    torch.manual_seed(0)
    G = GlobalGenerator(5, ngf=4, n_downsample=2, n_blocks=1)
    L = LocalEnhancer(5, ngf=4, n_downsample_global=2, n_blocks_global=1, n_local_enhancers=2, n_blocks_local=1)
    x = torch.randn(2, 5, 32, 64)
    for net in (G, L):
        y = net(x)
        assert y.shape == (2, 3, 32, 64)
        assert y.abs().max() <= 1
        y.mean().backward()
        assert all(p.grad is not None for p in net.parameters())


def test_generators_reject_sizes_they_cannot_reproduce() -> None:
    with pytest.raises(ValueError, match="divisible by 16"):
        GlobalGenerator(3, ngf=2, n_blocks=0)(torch.zeros(1, 3, 40, 64))
    with pytest.raises(ValueError, match="divisible by 16"):
        LocalEnhancer(3, ngf=2, n_blocks_global=0, n_blocks_local=0)(torch.zeros(1, 3, 64, 72))


def test_local_enhancer_loads_the_global_run_exactly() -> None:
    torch.manual_seed(0)
    G1 = GlobalGenerator(4, ngf=8, n_downsample=2, n_blocks=1)
    L = LocalEnhancer(4, ngf=4, n_downsample_global=2, n_blocks_global=1, n_blocks_local=1)
    L.load_global(G1.state_dict())
    own = L.global_generator.state_dict()
    assert set(G1.state_dict()) - set(own) == {f"model.{len(G1.model) - 2}.weight", f"model.{len(G1.model) - 2}.bias"}
    assert all(torch.equal(v, G1.state_dict()[k]) for k, v in own.items())

    # The global part sees the input averaged down once, and returns G1's last features.
    x = torch.randn(1, 4, 32, 32)
    coarse = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
    with torch.no_grad():
        assert torch.allclose(L.global_generator(coarse), G1.model[:-3](coarse))
        assert torch.allclose(L(x), L.enhancers[0](x, G1.model[:-3](coarse)))


def test_load_global_rejects_incompatible_state_dicts() -> None:
    L = LocalEnhancer(4, ngf=4, n_downsample_global=2, n_blocks_global=1, n_blocks_local=1)
    before = {k: v.clone() for k, v in L.state_dict().items()}
    wrong_width = GlobalGenerator(4, ngf=4, n_downsample=2, n_blocks=1).state_dict()
    with pytest.raises(ValueError, match=r"shape mismatches: \['model.1.weight: \(4, 4, 7, 7\) vs \(8, 4, 7, 7\)"):
        L.load_global(wrong_width)
    more_blocks = GlobalGenerator(4, ngf=8, n_downsample=2, n_blocks=2).state_dict()
    with pytest.raises(ValueError, match="unexpected keys"):
        L.load_global(more_blocks)
    with pytest.raises(ValueError, match="missing keys: \\['model.1.bias"):
        L.load_global({k: v for k, v in L.global_generator.state_dict().items() if k != "model.1.bias"})
    assert all(torch.equal(v, before[k]) for k, v in L.state_dict().items())  # nothing half-loaded


def test_global_and_local_parameters_split_as_fix_global_does() -> None:
    L = LocalEnhancer(3, ngf=2, n_downsample_global=1, n_blocks_global=1, n_local_enhancers=2, n_blocks_local=1)
    global_ids = {id(p) for p in L.global_parameters()}
    local_ids = {id(p) for p in L.local_parameters()}
    assert not global_ids & local_ids
    assert global_ids | local_ids == {id(p) for p in L.parameters()}
    # Official: only `model{n_local_enhancers}_*` (the finest branch) trains while fixed.
    assert local_ids == {id(p) for p in L.enhancers[-1].parameters()}
    assert {id(p) for p in L.enhancers[0].parameters()} <= global_ids


# ----------------------------------------------------------------------------- discriminator


def test_discriminator_feature_pyramid_at_256x128() -> None:
    torch.manual_seed(0)
    D = MultiscaleDiscriminator(6, ndf=8, n_layers=3, num_D=3)
    out = D(torch.randn(2, 6, 128, 256))
    assert len(out) == 3 and all(len(scale) == 3 + 2 for scale in out)

    def sizes(h: int) -> list[int]:
        # k4 s2 p2 gives h // 2 + 1, k4 s1 p2 gives h + 1.
        h1 = h // 2 + 1
        h2 = h1 // 2 + 1
        h3 = h2 // 2 + 1
        return [h1, h2, h3, h3 + 1, h3 + 2]

    for i, scale in enumerate(out):
        h, w = 128 // 2**i, 256 // 2**i  # finest first
        assert [tuple(f.shape) for f in scale] == [
            (2, c, hh, ww) for c, hh, ww in zip((8, 16, 32, 64, 1), sizes(h), sizes(w))
        ]
    assert [tuple(s[-1].shape[-2:]) for s in out] == [(19, 35), (11, 19), (7, 11)]


def test_discriminator_scale_order_is_finest_first() -> None:
    torch.manual_seed(0)
    D = MultiscaleDiscriminator(3, ndf=4, n_layers=2, num_D=3)
    x = torch.randn(1, 3, 64, 64)
    pool = lambda t: F.avg_pool2d(t, 3, stride=2, padding=1, count_include_pad=False)
    with torch.no_grad():
        out = D(x)
        assert torch.equal(out[0][-1], D.scales[0](x)[-1])
        assert torch.equal(out[1][-1], D.scales[1](pool(x))[-1])
        assert torch.equal(out[2][-1], D.scales[2](pool(pool(x)))[-1])
        logits_only = MultiscaleDiscriminator(3, ndf=4, n_layers=2, num_D=3, get_intermediate_features=False)
        logits_only.load_state_dict(D.state_dict())
        assert [len(s) for s in logits_only(x)] == [1, 1, 1]
        assert all(torch.equal(a[0], b[-1]) for a, b in zip(logits_only(x), out))


def test_discriminator_width_caps_at_512() -> None:
    with torch.device("meta"):
        D = MultiscaleDiscriminator(3, ndf=128, n_layers=4, num_D=1)
    widths = [m.out_channels for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [128, 256, 512, 512, 512, 1]


# ----------------------------------------------------------------------------- feature matching


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values).reshape(1, 1, 1, -1)


def test_feature_matching_hand_computed() -> None:
    # num_D=2, n_layers=1: per scale two features and the logits; weights 4/(1+1)=2 and 1/2.
    real = [[t(0, 0), t(1, 2), t(0.0)], [t(0, 0, 0, 0), t(5.0), t(0.0)]]
    fake = [[t(1, 1), t(2, 4), t(100.0)], [t(1, -1, 3, -3), t(5.0), t(-50.0)]]
    # L1 means: 1, 1.5 | 2, 0 — the logits (100, -50) are not part of it.
    expected = 10.0 * 0.5 * 2.0 * (1 + 1.5 + 2 + 0)
    loss = feature_matching_loss(real, fake, num_D=2, n_layers=1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected)  # 45
    assert feature_matching_loss(real, fake, 2, 1, weight=1.0).item() == pytest.approx(4.5)


@pytest.mark.parametrize(("num_D", "n_layers"), [(1, 1), (2, 3), (3, 3), (3, 5)])
def test_feature_matching_weights_normalize_over_scales_and_layers(num_D: int, n_layers: int) -> None:
    # Every feature off by exactly 1: the weights make the total 4 * lambda whatever the D shape.
    real = [[torch.zeros(2, 3, 4, 4)] * (n_layers + 1) + [torch.zeros(2, 1, 3, 3)] for _ in range(num_D)]
    fake = [[torch.ones(2, 3, 4, 4)] * (n_layers + 1) + [torch.full((2, 1, 3, 3), 7.0)] for _ in range(num_D)]
    assert feature_matching_loss(real, fake, num_D, n_layers, weight=10.0).item() == pytest.approx(40.0)


def test_feature_matching_gradients_reach_fake_only_and_fp32() -> None:
    real = [[torch.randn(1, 2, 3, 3, requires_grad=True) for _ in range(3)]]
    fake = [[torch.randn(1, 2, 3, 3, requires_grad=True) for _ in range(3)]]
    loss = feature_matching_loss(
        [[f.bfloat16() for f in real[0]]], [[f.bfloat16() for f in fake[0]]], num_D=1, n_layers=1
    )
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(f.grad is None for f in real[0])
    assert fake[0][0].grad is not None and fake[0][0].grad.abs().sum() > 0
    assert fake[0][-1].grad is None  # logits are not matched


def test_feature_matching_on_discriminator_outputs_and_bad_structure() -> None:
    torch.manual_seed(0)
    D = MultiscaleDiscriminator(3, ndf=4, n_layers=2, num_D=2)
    real, fake = D(torch.randn(1, 3, 32, 32)), D(torch.randn(1, 3, 32, 32))
    assert feature_matching_loss(real, fake, num_D=2, n_layers=2).item() > 0
    with pytest.raises(ValueError, match="expected num_D=3"):
        feature_matching_loss(real, fake, num_D=3, n_layers=2)
    logits_only = [[s[-1]] for s in real]
    with pytest.raises(ValueError, match="get_intermediate_features=True"):
        feature_matching_loss(logits_only, logits_only, num_D=2, n_layers=2)


# ----------------------------------------------------------------------------- VGG loss

# relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 in torchvision's vgg19().features.
RELU_X_1 = (1, 6, 11, 20, 29)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Sequential]:
    """A seeded random-init torchvision vgg19 state_dict on disk, and that model's `features`."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(1234)
    model = torchvision.models.vgg19(weights=None)
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    torch.save(model.state_dict(), path)
    return path, model.features.eval()


def test_vgg_features_match_torchvision_slices(vgg_file: tuple[Path, nn.Sequential]) -> None:
    path, reference = vgg_file
    vgg = load_vgg19_features(path)
    assert not vgg.training and not any(p.requires_grad for p in vgg.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = vgg(x)
        expected, h = [], x
        for i, layer in enumerate(reference[:30]):
            h = layer(h)
            if i in RELU_X_1:
                expected.append(h.clone())
    assert [tuple(f.shape[1:]) for f in ours] == [(64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8), (512, 4, 4)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, expected))


def test_vgg_loss_values_and_layer_weights(vgg_file: tuple[Path, nn.Sequential]) -> None:
    path, _ = vgg_file
    loss = VGGLoss(path)
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert loss(x, x.clone()).item() == 0.0
        value = loss(x, y)
        fx, fy = loss.vgg(x), loss.vgg(y)  # [-1, 1] straight in, as the official code does
        per_layer = [F.l1_loss(a, b).item() for a, b in zip(fx, fy)]
    assert value.dtype == torch.float32 and value.item() > 0
    weights = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
    assert value.item() == pytest.approx(sum(w * v for w, v in zip(weights, per_layer)), rel=1e-5)
    only_relu5 = VGGLoss(path, layer_weights=(0, 0, 0, 0, 1))
    with torch.no_grad():
        assert only_relu5(x, y).item() == pytest.approx(per_layer[4], rel=1e-5)
    with pytest.raises(ValueError, match="5 values"):
        VGGLoss(path, layer_weights=(1.0, 1.0))


def test_vgg_loss_gradients_precision_and_mode(vgg_file: tuple[Path, nn.Sequential]) -> None:
    path, _ = vgg_file
    loss = VGGLoss(path).train()
    assert loss.training and not loss.vgg.training
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    y = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    value = loss(x, y)
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert y.grad is None
    assert all(p.grad is None and not p.requires_grad for p in loss.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(x.bfloat16(), y.bfloat16())
    assert mixed.dtype == torch.float32
    # The bf16 inputs are rounded, the VGG itself runs in fp32.
    with torch.no_grad():
        assert mixed.item() == pytest.approx(loss(x.bfloat16().float(), y.bfloat16().float()).item(), rel=1e-6)


def test_vgg_missing_file_says_how_to_get_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "vgg19.pth"
    with pytest.raises(FileNotFoundError) as excinfo:
        VGGLoss(missing)
    message = str(excinfo.value)
    assert str(missing) in message
    assert "model.vgg_weight=0" in message and "model.vgg_weights=PATH" in message
    assert "torchvision.models.vgg19(weights='IMAGENET1K_V1').state_dict()" in message


def test_vgg_rejects_a_file_that_is_not_vgg19(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a torchvision vgg19 state_dict"):
        load_vgg19_features(path)
    assert isinstance(VGG19Features(), nn.Module)


# ----------------------------------------------------------------------------- encoder and clustering


def instance_map() -> torch.Tensor:
    inst = torch.zeros(2, 1, 16, 16, dtype=torch.int64)
    inst[0, :, :8] = 26001  # a car (Cityscapes: class * 1000 + instance)
    inst[0, :, 8:, :4] = 7  # road
    inst[1, :, :, 8:] = 26001  # same id in another image: a different instance
    inst[1, :, 4:6, 2:5] = 33
    return inst


def test_instance_average_is_the_per_image_instance_mean() -> None:
    torch.manual_seed(0)
    features, inst = torch.randn(2, 3, 16, 16), instance_map()
    pooled = instance_average(features, inst.float())  # the official code keeps inst as float
    for b in range(2):
        for i in inst[b].unique():
            mask = inst[b, 0] == i
            expected = features[b][:, mask].mean(dim=1)
            assert torch.allclose(pooled[b][:, mask], expected[:, None].expand(-1, int(mask.sum())), atol=1e-6)


def test_encoder_features_are_constant_per_instance_and_differ_between_them() -> None:
    torch.manual_seed(0)
    E = Encoder(input_nc=3, output_nc=3, ngf=4, n_downsampling=2)
    image, inst = torch.randn(2, 3, 16, 16), instance_map()
    feat = E(image, inst)
    assert feat.shape == (2, 3, 16, 16)
    for b in range(2):
        for i in inst[b].unique():
            region = feat[b][:, inst[b, 0] == i]
            assert torch.equal(region, region[:, :1].expand_as(region))
    car_0 = feat[0, :, 0, 0]
    road_0 = feat[0, :, 15, 0]
    car_1 = feat[1, :, 0, 15]
    assert not torch.allclose(car_0, road_0) and not torch.allclose(car_0, car_1)
    feat.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in E.parameters())


def test_collect_instance_features_groups_by_class_and_drops_small_instances() -> None:
    inst = instance_map()
    features = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16).expand(2, 2, 16, 16)
    pooled = instance_average(features, inst)
    per_class = collect_instance_features(pooled, inst)
    # Threshold: more than 0.5 * (256 // 32) = 4 pixels. Instance 33 has 6 and stays; the
    # background id 0 has 96 and 122 pixels.
    assert sorted(per_class) == [0, 7, 26, 33]
    assert per_class[26].shape == (2, 2)  # one car per image
    assert per_class[26][0, 0].item() == pytest.approx(features[0, 0, :8].mean().item())
    assert sorted(collect_instance_features(pooled, inst, min_area=1.0)) == [0, 7, 26]


def test_cluster_features_finds_blob_centres_deterministically() -> None:
    gen = torch.Generator().manual_seed(0)
    true = torch.tensor([[-5.0, 0.0, 0.0], [5.0, 5.0, 0.0], [0.0, -5.0, 5.0]])
    blobs = torch.cat([c + 0.1 * torch.randn(40, 3, generator=gen) for c in true])
    two_points = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    per_class = {5: blobs, 7: two_points, 9: torch.zeros(0, 3)}
    centres = cluster_features(per_class, n_clusters=3, seed=0)
    assert sorted(centres) == [5, 7]  # no rows, no entry
    found = centres[5][centres[5][:, 0].argsort()]
    assert torch.allclose(found, true[true[:, 0].argsort()], atol=0.1)
    assert torch.allclose(centres[7][centres[7][:, 0].argsort()], two_points)  # min(M, n_clusters) centres
    again = cluster_features(per_class, n_clusters=3, seed=0)
    assert all(torch.equal(centres[k], again[k]) for k in centres)
    assert cluster_features({1: torch.ones(4, 3)}, n_clusters=3)[1].shape == (3, 3)  # duplicates only
    assert math.isfinite(float(cluster_features({2: blobs}, n_clusters=10)[2].sum()))
