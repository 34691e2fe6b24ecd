"""SPADE: parameter counts of the official networks, shapes, SPADE normalisation and the losses on
hand inputs, D's gradient against the official loss formulation, the user's Cityscapes and ADE20K
commands on tiny trees with the real naming (2 processes), kill and resume, and the demo learning."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_pix2pixhd_train import fresh_G, l1_to_targets
from test_sources import ade_tree
from test_train import (
    assert_identical,
    committed_files,
    explain,
    final_states,
    kill_job_at_commit,
    launch_cmd,
    read_scalars,
    run,
)

from pipeline.config import ConfigError, load_config
from pipeline.families import spade as family
from pipeline.losses.adversarial import d_loss, g_loss
from pipeline.losses.feature_matching import feature_matching_loss
from pipeline.losses.regularizers import kl_divergence
from pipeline.models.spade import (
    SPADE,
    ConvEncoder,
    SPADEGenerator,
    parse_plain_norm,
    parse_spade_norm,
    spade_discriminator,
)
from pipeline.train import checkpoint as ckpt
from pipeline.train.family import DataInfo, StepContext
from pipeline.train.loop import native_bf16
from pipeline.train.stats import tensorboard_url

REPO = Path(__file__).resolve().parent.parent
SHARD = [sys.executable, str(REPO / "launch" / "shard.py")]


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- networks


def test_the_networks_have_the_official_parameter_counts():
    # Counted with NVlabs/SPADE's own classes at the same options (its print_network); the
    # issue's reference for the Cityscapes generator is 93.0M. Built on the meta device: no memory.
    city = dict(ngf=64, num_upsampling_layers="more", **parse_spade_norm("spectralspadesyncbatch3x3"))
    city.pop("sync")
    with torch.device("meta"):
        assert num_params(SPADEGenerator(36, **city)) == 93_048_003
        assert num_params(SPADEGenerator(36, use_vae=True, crop_size=512, aspect_ratio=2.0, **city)) == 101_136_579
        assert num_params(SPADEGenerator(151)) == 96_492_483  # ADE20K: 150 classes + unlabeled, normal
        assert num_params(spade_discriminator(39, **parse_plain_norm("spectralinstance"))) == 5_601_410
        assert num_params(ConvEncoder(ndf=64)) == 10_463_424


def test_official_norm_strings_map_to_keywords_and_bad_ones_say_the_form():
    assert parse_spade_norm("spectralspadesyncbatch3x3") == {
        "spectral": True, "param_free_norm": "batch", "sync": True, "kernel_size": 3}
    assert parse_spade_norm("spadeinstance5x5") == {
        "spectral": False, "param_free_norm": "instance", "sync": False, "kernel_size": 5}
    assert parse_plain_norm("spectralinstance") == {"spectral": True, "norm": "instance"}
    assert parse_plain_norm("spectralsyncbatch") == {"spectral": True, "norm": "batch"}
    assert parse_plain_norm("spectral") == {"spectral": True, "norm": "none"}
    with pytest.raises(ConfigError, match=r"model.norm_G: .*spectralspadesyncbatch3x3"):
        load_config("spade_demo", ["model.norm_G=spectralinstance"])
    with pytest.raises(ConfigError, match="model.norm_D"):
        load_config("spade_demo", ["model.norm_D=group"])


@pytest.mark.parametrize("upsampling,size,vae", [("more", (64, 128), False), ("normal", (64, 64), False),
                                                 ("most", (128, 256), False), ("normal", (64, 64), True)])
def test_generator_shapes_at_the_configured_resolutions(upsampling, size, vae):
    h, w = size
    G = SPADEGenerator(5, ngf=2, hidden=4, num_upsampling_layers=upsampling, use_vae=vae, z_dim=8,
                       crop_size=w, aspect_ratio=w / h)
    seg = F.one_hot(torch.randint(0, 5, (2, h, w)), 5).permute(0, 3, 1, 2).float()
    out = G(seg)
    assert out.shape == (2, 3, h, w) and out.abs().max() <= 1
    with pytest.raises(ValueError, match="divisible by"):
        G(seg[..., : h - 8, :])


def test_the_encoder_and_discriminator_shapes():
    mu, logvar = ConvEncoder(ndf=2, z_dim=8)(torch.randn(3, 3, 96, 128))  # any size: resized to 256x256
    assert mu.shape == logvar.shape == (3, 8)
    D = spade_discriminator(7, ndf=4, n_layers_D=4, num_D=2)
    out = D(torch.randn(1, 7, 64, 128))
    assert len(out) == 2 and [len(s) for s in out] == [5, 5]  # n_layers_D + 1 features, logits last
    # Three stride-2 convs then stride 1 (padding 2 grows each 4x4 conv's output by one).
    assert [tuple(t.shape[1:]) for t in out[0]] == [(4, 33, 65), (8, 17, 33), (16, 9, 17), (32, 10, 18), (1, 11, 19)]
    assert out[1][-1].shape[-2:] == (7, 11)  # the second scale sees the input at half size
    first, middle = D.scales[0].layers[0][0], D.scales[0].layers[1][0]
    assert first.bias is not None and not hasattr(first, "parametrizations")  # the first conv is plain
    assert middle.bias is None and hasattr(middle, "parametrizations")  # spectral, no bias before the norm


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_spade_normalises_without_parameters_then_modulates_per_class(norm):
    """γ and β chosen by hand per class (centre-only kernels, so each pixel sees its own class):
    the output is the parameter-free normalisation of x, times 1 + γ[class], plus β[class]."""
    torch.manual_seed(0)
    classes, C = 3, 2
    layer = SPADE(C, classes, param_free_norm=norm, hidden=classes)
    gamma = torch.tensor([[0.5, -0.25], [2.0, 0.0], [0.0, 1.0]])  # [class, channel]
    beta = torch.tensor([[1.0, 0.0], [-1.0, 3.0], [0.5, 0.5]])
    with torch.no_grad():
        for conv in (layer.mlp_shared[0], layer.mlp_gamma, layer.mlp_beta):
            conv.weight.zero_()
            conv.bias.zero_()
        for k in range(classes):
            layer.mlp_shared[0].weight[k, k, 1, 1] = 1.0
            layer.mlp_gamma.weight[:, k, 1, 1] = gamma[k]
            layer.mlp_beta.weight[:, k, 1, 1] = beta[k]
    x = torch.randn(2, C, 6, 8) * 3 + 1
    label = torch.randint(0, classes, (2, 3, 4))
    seg = F.one_hot(label, classes).permute(0, 3, 1, 2).float()  # half size: resized (nearest) inside
    dims = (0, 2, 3) if norm == "batch" else (2, 3)
    x_hat = (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + 1e-5)
    full = label.repeat_interleave(2, 1).repeat_interleave(2, 2)  # [N, H, W]
    expected = x_hat * (1 + gamma[full].permute(0, 3, 1, 2)) + beta[full].permute(0, 3, 1, 2)
    torch.testing.assert_close(layer(x, seg), expected, atol=1e-5, rtol=1e-5)


def test_the_map_resized_once_per_resolution_gives_the_official_per_layer_result():
    """The generator resizes the map once per resolution; the official code resizes it in every
    SPADE layer. Blocks given the full-size map (resized inside, as officially) agree."""
    torch.manual_seed(1)
    G = SPADEGenerator(5, ngf=2, hidden=4, num_upsampling_layers="more").eval()  # no power iteration per call
    seg = F.one_hot(torch.randint(0, 5, (2, 64, 128)), 5).permute(0, 3, 1, 2).float()
    up = G.upsample
    x = G.fc(F.interpolate(seg, size=(1, 2)))
    x = G.G_middle_0(up(G.head_0(x, seg)), seg)
    x = G.G_middle_1(up(x), seg)
    for block in (G.up_0, G.up_1, G.up_2, G.up_3):
        x = block(up(x), seg)
    torch.testing.assert_close(G(seg), torch.tanh(G.conv_img(F.leaky_relu(x, 0.2))), atol=0, rtol=0)


# --------------------------------------------------------------------------- losses


def test_hinge_kl_and_feature_matching_on_hand_values():
    real = [[torch.tensor([0.5, 2.0])], [torch.tensor([-1.0, 1.0])]]  # two scales, logits only
    fake = [[torch.tensor([-2.0, 0.0])], [torch.tensor([3.0, -0.5])]]
    d_real, d_fake = d_loss("hinge", real, fake, scale_reduction="mean")
    # Per scale mean(relu(1 - real)), then the mean over scales (the official GANLoss).
    assert d_real.item() == pytest.approx(((0.5 + 0) / 2 + (2 + 0) / 2) / 2)
    assert d_fake.item() == pytest.approx(((0 + 1) / 2 + (4 + 0.5) / 2) / 2)
    assert g_loss("hinge", fake, scale_reduction="mean").item() == pytest.approx(-((-2 + 0) / 2 + (3 - 0.5) / 2) / 2)
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    assert kl_divergence(mu, logvar).item() == pytest.approx(1 - math.log(2.0) / 2)
    # Feature matching as SPADE: lambda / num_D per layer, no per-layer weights.
    f_real = [[torch.zeros(1, 2), torch.zeros(1, 1), torch.zeros(1, 1)]]  # two features, logits
    f_fake = [[torch.tensor([[1.0, 3.0]]), torch.tensor([[-2.0]]), torch.ones(1, 1)]]
    assert feature_matching_loss(f_real, f_fake, 1, 1, weight=10, layer_weight=1.0).item() == 40.0
    assert feature_matching_loss(f_real, f_fake, 1, 1, weight=10).item() == 80.0  # pix2pixHD's 4/(n_layers+1)


def _tiny_cfg(**model):
    over = ["model.ngf=2", "model.ndf=4", "model.spade_hidden=4", "model.vgg_weight=0", "model.norm_G=spadeinstance3x3",
            *[f"model.{k}={v}" for k, v in model.items()]]
    return load_config("spade_demo", over)


def test_d_gradient_equals_the_official_formulation_and_g_leaves_d_untouched():
    """One iteration's D gradient from our phases (D(real) kept from G's phase, D(fake) in D's)
    equals the official ``compute_discriminator_loss`` gradient (fake and real concatenated in one
    batch, D_Fake + D_real); G's phase gives D no gradient. D in eval mode: spectral norm's power
    iteration (one per call) is left out of the comparison."""
    torch.manual_seed(0)
    cfg = _tiny_cfg(reuse_fake="true")
    info = DataInfo("label2image", 5, ("label", "instance", "image"))
    nets = family.build(cfg, info)
    D = nets["D"].eval()
    b = {"input": torch.randn(2, 6, 64, 64).softmax(1), "image": torch.rand(2, 3, 64, 64) * 2 - 1}
    ctx = StepContext(nets=nets, plain=nets, cfg=cfg, info=info)
    scratch: dict = {}
    D.requires_grad_(False)
    g = family.g_step(ctx, b, scratch)
    g["loss"].backward()
    assert all(p.grad is None for p in D.parameters())
    assert set(g) == {"GAN", "GAN_Feat", "loss"}
    D.requires_grad_(True)
    fake = scratch["fake"]
    d = family.d_step(ctx, b, scratch)
    d["loss"].backward()
    ours = [p.grad.clone() for p in D.parameters()]
    D.zero_grad()
    both = D(torch.cat([torch.cat([b["input"], fake], 1), torch.cat([b["input"], b["image"]], 1)], 0))
    pred_fake = [[t[:2] for t in s] for s in both]
    pred_real = [[t[2:] for t in s] for s in both]
    official = (sum(F.relu(1 + s[-1]).mean() for s in pred_fake) / 2
                + sum(F.relu(1 - s[-1]).mean() for s in pred_real) / 2)
    official.backward()
    assert d["loss"].item() == pytest.approx(official.item(), rel=1e-6)
    # Tolerance on D's gradient scale, not each tensor's: a gradient that is exactly 0 one way can be
    # 1e-8 the other way (another thread count sums in another order).
    scale = max(p.grad.abs().max().item() for p in D.parameters())
    for mine, theirs in zip(ours, (p.grad for p in D.parameters())):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5 * scale)


def test_without_reuse_d_scores_a_fake_of_the_updated_g():
    torch.manual_seed(0)
    cfg = _tiny_cfg(reuse_fake="false")
    info = DataInfo("label2image", 5, ("label", "image"))
    nets = family.build(cfg, info)
    b = {"input": torch.randn(1, 6, 64, 64).softmax(1), "image": torch.zeros(1, 3, 64, 64)}
    ctx = StepContext(nets=nets, plain=nets, cfg=cfg, info=info)
    scratch: dict = {}
    family.g_step(ctx, b, scratch)
    with torch.no_grad():  # G changes between the phases, as after its optimizer step
        nets["G"].net.conv_img.bias.add_(0.5)
    seen = []
    hook = nets["D"].register_forward_pre_hook(lambda m, args: seen.append(args[0][:, -3:].clone()))
    family.d_step(ctx, b, scratch)
    hook.remove()
    with torch.no_grad():
        assert torch.equal(seen[0], nets["G"](b["input"])[0])


# --------------------------------------------------------------------------- end to end


TINY = ["model.ngf=2", "model.ndf=4", "model.spade_hidden=4", "train.batch_size=2", "train.progress=false",
        "train.log_every_kimg=0.002", "train.image_every_kimg=0.004", "train.num_images=2", "data.workers=1"]


@pytest.mark.multiprocess
def test_the_cityscapes_command_on_two_processes_resumes_bit_identical(cityscapes_shards, tmp_path):
    """``accelerate launch launch/train.py --config spade_cityscapes`` shrunk by overrides (the
    tiny tree is 128x64, so ``more`` upsampling starts from 2x1), once straight through and once
    SIGKILLed after its first checkpoint and resumed: the same networks, optimizers and ranks."""
    args = [f"data.url={cityscapes_shards}", "data.load_size=128,64", "train.total_kimg=0.012",
            "checkpoint.every_kimg=0.004", *TINY]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    r = run(launch_cmd(2, [f"run.dir={a_dir}", "model.vgg_weight=0", *args], config="spade_cityscapes"))
    assert r.returncode == 0, explain(r)
    # spade_cityscapes leaves train.precision at auto: bf16 where this CPU computes it natively
    chosen = ("bf16: auto: this CPU computes bf16 natively" if native_bf16("cpu")
              else "fp32: auto: this CPU has no native bf16")
    assert f"DDP: G steps G; D steps D ({chosen})" in r.stdout + r.stderr, explain(r)
    scalars = read_scalars(a_dir)
    for tag in ("Loss/GAN", "Loss/GAN_Feat", "Loss/D_real", "Loss/D_Fake"):
        assert tag in scalars and all(math.isfinite(v) for _, v in scalars[tag]), tag
    states = final_states(a_dir)
    assert states["G"]["net.fc.weight"].shape[1] == 36  # 35 Cityscapes label ids + the instance edge map
    assert set(states) == {"G", "D", "opt_G", "opt_D"}  # no EMA in the paper's run

    cmd = launch_cmd(2, [f"run.dir={b_dir}", "model.vgg_weight=0", *args], config="spade_cityscapes")
    kill_job_at_commit(cmd, b_dir, 2)
    assert ckpt.latest(str(b_dir)).step < 6
    r = run(cmd)
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, explain(r)
    a, b = committed_files(a_dir), committed_files(b_dir)
    assert_identical(a, b)
    assert a["rank-000.pt"]["fingerprints"] == a["rank-001.pt"]["fingerprints"]


@pytest.fixture(scope="module")
def ade20k_shards(tmp_path_factory) -> str:
    """The ADE20K release layout (images/ and annotations/, ADE_train_*.jpg with *.png), 64x64."""
    root = tmp_path_factory.mktemp("ade")
    release = ade_tree(root)
    rng = np.random.default_rng(0)
    from PIL import Image

    for split, tag, n in (("training", "train", 4), ("validation", "val", 2)):
        for i in range(1, n + 1):
            label = rng.integers(0, 151, (4, 4), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
            photo = (label[..., None] * np.array([1, 2, 3]) % 256).astype(np.uint8)
            Image.fromarray(photo).save(release / "images" / split / f"ADE_{tag}_{i:08d}.jpg", quality=95)
            Image.fromarray(label).save(release / "annotations" / split / f"ADE_{tag}_{i:08d}.png")
    out = tmp_path_factory.mktemp("ade-shards")
    r = subprocess.run([*SHARD, "write", "ade20k", "--root", str(root), "--out", str(out),
                        "--samples-per-shard", "2", "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(out)


@pytest.mark.multiprocess
def test_the_ade20k_command_runs_on_two_processes(ade20k_shards, vgg_weights, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(2, [f"data.url={ade20k_shards}", f"run.dir={run_dir}", f"model.vgg_weights={vgg_weights}",
                           "data.load_size=72,72", "data.crop_size=64,64", "train.total_kimg=0.004",
                           "checkpoint.every_kimg=0.004", *TINY], config="spade_ade20k"))
    assert r.returncode == 0, explain(r)
    states = final_states(run_dir)
    assert states["G"]["net.fc.weight"].shape[1] == 151  # 150 classes + unlabeled, no instance edges
    scalars = read_scalars(run_dir)
    assert all(tag in scalars for tag in ("Loss/GAN", "Loss/GAN_Feat", "Loss/VGG", "Loss/D_real", "Loss/D_Fake"))


# --------------------------------------------------------------------------- the demo learns


def mean_colour_l1(demo_shards: str) -> float:
    """The best constant image per sample, its own mean colour: what G must beat to use the map."""
    from pipeline.data.stream import make_stream
    from pipeline.data.transforms import Augment

    cfg = load_config("spade_demo", [f"data.url={demo_shards}"])
    out = []
    for s in make_stream(demo_shards, "val", train=False, fields=("image",), augment=Augment(cfg.data.load_size)):
        image = s["image"].float() / 127.5 - 1
        out.append((image - image.mean((1, 2), keepdim=True)).abs().mean().item())
    return float(np.mean(out))


def test_the_demo_config_learns(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    over = ["train.total_kimg=0.16", "checkpoint.every_kimg=0.16", "data.workers=0", "train.progress=false",
            "train.image_every_kimg=0"]
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", *over], config="spade_demo"), timeout=400)
    assert r.returncode == 0, explain(r)
    before = l1_to_targets("spade_demo", demo_shards, fresh_G("spade_demo", [f"data.url={demo_shards}"], demo_shards))
    after = l1_to_targets("spade_demo", demo_shards, final_states(run_dir)["G_ema"])
    baseline = mean_colour_l1(demo_shards)
    assert after < 0.8 * before and after < 0.95 * baseline, (before, after, baseline)


def test_with_the_vae_it_trains_the_encoder_and_evaluates_with_random_styles(demo_shards, tmp_path):
    """``model.use_vae``: KLD is logged, E trains with G's optimizer, the grid shows three styles
    per map, and the evaluator scores the snapshot from z ~ N(0, I) (no image reaches E)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_eval import FAST_EVAL, evaluate, result

    from pipeline.eval.standin import write_standin_inception

    run_dir = tmp_path / "run"
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "model.use_vae=true", "model.z_dim=16",
                           "data.load_size=64,32", "train.total_kimg=0.008", "checkpoint.every_kimg=0.008",
                           "data.workers=0", "model.ngf=2", "model.ndf=4", "model.spade_hidden=4",
                           "train.batch_size=2", "train.progress=false", "train.log_every_kimg=0.002",
                           "train.image_every_kimg=0.004", "train.num_images=2"], config="spade_demo"))
    assert r.returncode == 0, explain(r)
    scalars = read_scalars(run_dir)
    assert "Loss/KLD" in scalars and all(math.isfinite(v) and v >= 0 for _, v in scalars["Loss/KLD"])
    states = final_states(run_dir)
    fresh = fresh_G("spade_demo", [f"data.url={demo_shards}", "model.use_vae=true", "model.z_dim=16",
                                   "data.load_size=64,32", "model.ngf=2", "model.spade_hidden=4"], demo_shards)
    assert not torch.equal(states["G"]["encoder.fc_mu.weight"], fresh["encoder.fc_mu.weight"])
    acc = EventAccumulator(tensorboard_url(str(run_dir)), size_guidance={"images": 0})
    acc.Reload()
    grid = acc.Images("Images/val_input_output_target")[-1]
    assert grid.width == 5 * (64 + 2) + 2  # label | three styles | target
    inception = str(write_standin_inception(tmp_path / "inception.pth"))
    r = evaluate(run_dir, "--once", "--inception-weights", inception, *FAST_EVAL)
    assert r.returncode == 0, explain(r)
    metrics = result(run_dir, 4)["metrics"]
    assert math.isfinite(metrics["fid"]) and math.isfinite(metrics["psnr"])
