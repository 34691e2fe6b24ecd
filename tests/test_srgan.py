"""SRGAN (Ledig et al. 2017): the networks of Fig. 4, sub-pixel upsampling, the LR inputs made in
the stream, the VGG content loss, the Set5/Set14 Y-channel protocol (against a direct computation
and scikit-image), the SRResNet stage then SRGAN from it on two processes through the real
launcher and the evaluator, and the demo that learns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train import explain, final_states, launch_cmd, read_scalars, run, split_batch, train_demo

from pipeline.config import ConfigError, load_config
from pipeline.eval.paired import luma, psnr_ssim_y
from pipeline.families import get_family
from pipeline.families.srgan import downsample, prepare
from pipeline.models.srgan import SRGANDiscriminator, SRResNet
from pipeline.train import checkpoint as ckpt
from pipeline.train.family import DataInfo

REPO = Path(__file__).resolve().parent.parent
INFO = DataInfo("label2image", 35, ("label", "image"))
TINY = ["model.ngf=8", "model.num_blocks=2", "data.crop_size=32,32", "data.workers=0", "train.progress=false",
        "train.batch_size=4", "train.log_every_kimg=0.004"]


def conv(k: int, n_in: int, n_out: int) -> int:
    return k * k * n_in * n_out + n_out


def test_the_networks_are_figure_4_of_the_paper():
    with torch.device("meta"):
        G, D = SRResNet(), SRGANDiscriminator()
    # G: k9n64 + PReLU(64); 16 x (2 x [k3n64 + BN] + PReLU(64)); k3n64 + BN; 2 x (k3n256 + PReLU(64)); k9n3.
    bn, prelu = 2 * 64, 64
    g = conv(9, 3, 64) + prelu + 16 * (2 * (conv(3, 64, 64) + bn) + prelu) + conv(3, 64, 64) + bn \
        + 2 * (conv(3, 64, 256) + prelu) + conv(9, 64, 3)
    assert sum(p.numel() for p in G.parameters()) == g == 1_550_659
    # D: k3n64s1; (n64 s2, n128 s1, n128 s2, n256 s1, n256 s2, n512 s1, n512 s2) each + BN; dense 1024; dense 1.
    widths = [64, 64, 128, 128, 256, 256, 512, 512]
    d = conv(3, 3, 64) + sum(conv(3, a, b) + 2 * b for a, b in zip(widths, widths[1:])) \
        + (512 * 6 * 6 * 1024 + 1024) + (1024 + 1)  # 96x96 crops: a 6x6 map after four stride-2 convs
    assert sum(p.numel() for p in D.parameters()) == d == 23_565_505
    assert [m.stride[0] for m in D.features if isinstance(m, torch.nn.Conv2d)] == [1, 2, 1, 2, 1, 2, 1, 2]
    G, D = SRResNet(ngf=8, num_blocks=2), SRGANDiscriminator(ndf=8, image_size=32)
    assert G(torch.rand(2, 3, 6, 10)).shape == (2, 3, 24, 40) and D(torch.randn(2, 3, 32, 32)).shape == (2,)
    with pytest.raises(ValueError, match="built for 32x32"):
        D(torch.randn(1, 3, 64, 64))


def test_sub_pixel_upsampling_is_the_periodic_shuffle():
    # Shi et al. 2016: a conv to 4C channels, then out[c, 2i + dy, 2j + dx] = conv[4c + 2dy + dx, i, j].
    torch.manual_seed(0)
    G = SRResNet(ngf=4, num_blocks=1, scale=4)
    stage = G.upsample[:2]
    x = torch.randn(1, 4, 3, 5)
    y = G.upsample[0](x)
    out = stage(x)
    for c in range(4):
        for dy in range(2):
            for dx in range(2):
                assert torch.equal(out[0, c, dy::2, dx::2], y[0, 4 * c + 2 * dy + dx])
    assert len(G.upsample) == 6  # two x2 stages for x4


def test_y_channel_psnr_and_ssim_follow_the_sr_protocol_and_agree_with_scikit_image():
    from skimage.color import rgb2ycbcr
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    torch.manual_seed(0)
    hr = torch.rand(3, 3, 40, 48) * 2 - 1
    sr = (hr + 0.2 * torch.randn_like(hr)).clamp(-1, 1)
    out = psnr_ssim_y(sr, hr, border=4)
    for n in range(3):
        a, b = ((t[n].permute(1, 2, 0).numpy() + 1) / 2 for t in (sr, hr))
        a, b = (np.round(t * 255).astype(np.uint8) for t in (a, b))  # the 8-bit images the protocol measures
        ya, yb = (rgb2ycbcr(t)[..., 0][4:-4, 4:-4] / 255 for t in (a, b))
        assert np.allclose(luma(torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255, value_range=(0, 1))
                           [0, 0].numpy()[4:-4, 4:-4], ya, atol=1e-6)
        direct = 10 * np.log10(1 / np.mean((ya - yb) ** 2))
        assert out["psnr_y"][n].item() == pytest.approx(direct, abs=1e-4)
        assert out["psnr_y"][n].item() == pytest.approx(peak_signal_noise_ratio(yb, ya, data_range=1), abs=1e-4)
        ssim = structural_similarity(ya, yb, data_range=1, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
        assert out["ssim_y"][n].item() == pytest.approx(ssim, abs=1e-5)
    assert psnr_ssim_y(hr, hr, border=4)["ssim_y"].tolist() == pytest.approx([1.0] * 3)


def test_lr_inputs_are_antialiased_bicubic_downsamplings_of_the_hr_crops():
    from PIL import Image

    torch.manual_seed(0)
    hr_u8 = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8)
    cfg = load_config("srresnet_demo", [])
    b = prepare({"data": {"image": hr_u8}}, torch.device("cpu"), cfg, INFO)
    assert b["image"].shape == (2, 3, 32, 48) and b["lr"].shape == (2, 3, 8, 12)
    assert torch.equal(b["lr"], torch.round(b["lr"] * 255) / 255) and 0 <= b["lr"].min() and b["lr"].max() <= 1
    for n in range(2):  # PIL's bicubic reduction is MATLAB imresize's kernel, widened by the factor
        pil = np.asarray(Image.fromarray(hr_u8[n].permute(1, 2, 0).numpy()).resize((12, 8), Image.BICUBIC))
        ours = np.round(b["lr"][n].permute(1, 2, 0).numpy() * 255)
        assert np.abs(ours - pil).max() <= 1
    with pytest.raises(ValueError, match="not divisible by model.scale=4"):
        prepare({"data": {"image": hr_u8[..., :30]}}, torch.device("cpu"), cfg, INFO)
    with pytest.raises(ConfigError, match="not divisible by model.scale=4"):
        get_family("srresnet").build(load_config("srresnet_demo", ["data.crop_size=30,30"]), INFO)


def test_the_vgg_content_loss_is_the_mse_of_rescaled_relu5_4_features(vgg_weights):
    import torchvision

    from pipeline.losses.perceptual import VGGContentLoss

    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    vgg = torchvision.models.vgg19(weights=None).features
    state = torch.load(vgg_weights, weights_only=True)
    vgg[:36].load_state_dict({k.removeprefix("features."): v for k, v in state.items()})
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for layer, last in (("relu5_4", 35), ("relu2_2", 8)):
        with torch.no_grad():
            phi_x, phi_y = (vgg[: last + 1](((t + 1) / 2 - mean) / std) / 12.75 for t in (x, y))
        direct = F.mse_loss(phi_x, phi_y)
        loss = VGGContentLoss(vgg_weights, layer)
        torch.testing.assert_close(loss(x, y), direct, rtol=1e-5, atol=0)
    x.requires_grad_(True)
    VGGContentLoss(vgg_weights, "relu2_2")(x, y).backward()
    assert x.grad.abs().sum() > 0


def test_srresnet_then_srgan_from_it_on_two_processes_and_the_evaluator(demo_shards, vgg_weights, tmp_path):
    pre, gan = tmp_path / "srresnet", tmp_path / "srgan"
    r = run(launch_cmd(2, [f"data.url={demo_shards}", f"run.dir={pre}", *TINY, "train.total_kimg=0.016",
                           "checkpoint.every_kimg=0.016"], config="srresnet_demo"))
    assert r.returncode == 0, explain(r)
    assert "Loss/G_MSE" in read_scalars(pre)
    # The GAN stage from the SRResNet run; lr_G = 0 keeps G's weights, so they show what was loaded.
    r = run(launch_cmd(2, [f"data.url={demo_shards}", f"run.dir={gan}", *TINY, "model.ndf=8", f"model.init_from={pre}",
                           f"model.vgg_weights={vgg_weights}", "model.lr_G=0", "train.total_kimg=0.016",
                           "checkpoint.every_kimg=0.016", "train.image_every_kimg=0.016"], config="srgan_demo"))
    assert r.returncode == 0, explain(r)
    assert f"initialised from {pre}" in r.stdout + r.stderr
    assert {"Loss/G_content", "Loss/G_GAN", "Loss/D_real", "Loss/D_fake", "Grad/D_norm"} <= set(read_scalars(gan))
    loaded = ckpt.load_tensors(ckpt.latest(str(pre), ckpt.SNAPSHOTS).file("G.pt"))
    trained = final_states(gan)["G"]
    params = [k for k in loaded if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(loaded[k], trained[k]) for k in params) and len(params) > 20
    from pipeline.eval.standin import write_standin_inception

    inception = write_standin_inception(tmp_path / "inception.pth")
    r = subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--run", str(gan), "--once",
                        "--inception-weights", str(inception), "--kid-subset-size", "4", "--kid-subsets", "5",
                        "--batch-size", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, explain(r)
    result = json.loads(next((gan / "eval").glob("step-*.json")).read_text())
    m = result["metrics"]
    assert {"psnr_y", "ssim_y", "psnr", "ssim", "fid", "kid"} <= set(m) and 5 < m["psnr_y"] < 60, m
    assert result["protocol"]["num_gen"] == 8  # every val crop, once


def psnr_y_gain(config: str, shards: str, run_dir: Path, *overrides: str) -> tuple[float, float]:
    """Mean val ``psnr_y`` of ``config``'s G at initialisation and of the run's final G_ema."""
    cfg = load_config(config, [f"data.url={shards}", *overrides])
    b = prepare({"data": split_batch(shards, cfg, "val")}, torch.device("cpu"), cfg, INFO)
    assert torch.equal(downsample(b["image"], 4), b["lr"])
    torch.manual_seed(cfg.run.seed)
    G = get_family(cfg.model.family).build(cfg, INFO)["G"].eval()
    with torch.no_grad():
        before = psnr_ssim_y(G(b["lr"]).clamp(-1, 1), b["image"], border=4)["psnr_y"].mean()
        G.load_state_dict(final_states(run_dir)["G_ema"])
        after = psnr_ssim_y(G(b["lr"]).clamp(-1, 1), b["image"], border=4)["psnr_y"].mean()
    return float(before), float(after)


def test_the_demo_config_learns(demo_shards, tmp_path):
    train_demo("srresnet_demo", demo_shards, tmp_path / "run", 1.28)
    before, after = psnr_y_gain("srresnet_demo", demo_shards, tmp_path / "run")
    assert after > before + 3, (before, after)  # 80 steps: 17.4 -> 22.2 dB on this machine's CPU


def test_the_srgan_demo_learns_with_the_papers_mse_content_variant(demo_shards, tmp_path):
    # SRGAN-MSE (the paper's content=mse variant): G and D adversarially, no VGG needed. The VGG54
    # default needs ImageNet weights, which a test here cannot have (a random VGG's features are
    # not a perceptual loss).
    train_demo("srgan_demo", demo_shards, tmp_path / "run", 0.64, "model.content=mse")
    before, after = psnr_y_gain("srgan_demo", demo_shards, tmp_path / "run", "model.content=mse")
    assert after > before + 2, (before, after)  # +2.2 dB at 30 steps, +3.6 at 80, on this machine
