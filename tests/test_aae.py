"""The adversarial autoencoder (Makhzani et al. 2016): D_z is the paper's MLP and sees codes, never
images; the phases run in the paper's order with their own optimizers; the priors; two
processes through the real launcher and the evaluator (prior samples and reconstructions); and
the demo that learns to reconstruct while its codes take the prior's scale."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from test_train import explain, final_states, launch_cmd, read_scalars, run, split_batch, train_demo

from pipeline.config import load_config
from pipeline.families import get_family
from pipeline.families.aae import d_step, g_step, sample_prior
from pipeline.train.family import DataInfo, StepContext

REPO = Path(__file__).resolve().parent.parent
INFO = DataInfo("label2image", 35, ("label", "image"))
FAMILY = get_family("aae")


def test_d_z_is_the_papers_mlp_and_sees_codes_not_images():
    cfg = load_config("aae_folder64", [])
    with torch.device("meta"):
        nets = FAMILY.build(cfg, INFO)
    assert sum(p.numel() for p in nets["D_z"].parameters()) == (8 * 1000 + 1000) + (1000 * 1000 + 1000) + (1000 + 1)
    torch.manual_seed(0)
    cfg = load_config("aae_demo", ["model.ngf=8", "model.ndf=8"])
    nets = FAMILY.build(cfg, INFO)
    seen = []
    nets["D_z"].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    ctx = StepContext(nets=nets, plain=nets, cfg=cfg, info=INFO)
    image = torch.rand(4, 3, 32, 32) * 2 - 1
    b = {"image": image, "z": sample_prior(cfg.model, 4, torch.device("cpu"))}
    out = d_step(ctx, b, {})
    codes = nets["E"](image).detach()
    assert seen[0].shape == (8, 8) and torch.equal(seen[0][:4], b["z"])  # prior samples are "real"
    torch.testing.assert_close(seen[0][4:], codes)  # the encoder's codes "fake"
    out["loss"].backward()
    assert all(p.grad is None for p in nets["E"].parameters())  # E's codes are taken without a graph
    assert all(p.grad is not None for p in nets["D_z"].parameters())
    g = g_step(ctx, b, {})
    torch.testing.assert_close(seen[1], codes)
    assert float(g["E_GAN"].detach()) > 0 and set(out) == {"loss", "D_real", "D_fake"}
    # The paper's order and each network with its own optimizer; E is stepped in two phases.
    assert [(p.name, p.steps, p.fetch) for p in FAMILY.phases(cfg)] == \
        [("recon", ("E", "Dec"), True), ("D_z", ("D_z",), False), ("E_gan", ("E",), False)]
    assert [(o.name, o.nets) for o in FAMILY.optimizers(cfg)] == [("E", ("E",)), ("Dec", ("Dec",)), ("D_z", ("D_z",))]


def test_the_priors():
    torch.manual_seed(0)
    cfg = load_config("aae_demo", ["model.prior_std=2"])
    z = sample_prior(cfg.model, 20000, torch.device("cpu"))
    assert z.mean().abs() < 0.05 and z.std(0).sub(2).abs().max() < 0.05
    mix = load_config("aae_demo", ["model.prior=mixture", "model.prior_components=4"]).model
    z = sample_prior(mix, 4000, torch.device("cpu"))
    angle = torch.atan2(z[:, 1], z[:, 0])
    k = torch.round(angle / (2 * math.pi / 4)) % 4  # the nearest of the 4 means on the circle of radius 2
    means = torch.stack([torch.cos(k * math.pi / 2), torch.sin(k * math.pi / 2)], 1) * 2
    assert (z[:, :2] - means).std() == pytest.approx(0.5, rel=0.05) and z[:, 2:].std() == pytest.approx(0.5, rel=0.05)
    assert torch.bincount(k.long(), minlength=4).min() > 900  # every component drawn


def test_aae_on_two_processes_and_the_evaluator(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(2, [f"data.url={demo_shards}", f"run.dir={run_dir}", "model.ngf=8", "model.ndf=8",
                           "model.d_hidden=32", "train.total_kimg=0.016", "checkpoint.every_kimg=0.016",
                           "data.workers=0", "train.batch_size=8", "train.log_every_kimg=0.008",
                           "train.progress=false", "train.image_every_kimg=0.016"], config="aae_demo"))
    assert r.returncode == 0, explain(r)
    assert "E steps E; Dec steps Dec; D_z steps D_z" in r.stdout + r.stderr
    assert {"Loss/recon", "Loss/D_real", "Loss/D_fake", "Loss/E_GAN", "Grad/recon_norm"} <= set(read_scalars(run_dir))
    from pipeline.eval.standin import write_standin_inception

    inception = write_standin_inception(tmp_path / "inception.pth")
    r = run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--run", str(run_dir), "--once",
             "--inception-weights", str(inception), "--num-samples", "8", "--kid-subset-size", "4",
             "--kid-subsets", "5", "--batch-size", "4"], timeout=300)
    assert r.returncode == 0, explain(r)
    result = json.loads(next((run_dir / "eval").glob("step-*.json")).read_text())
    m = result["metrics"]
    # Decoded prior samples under the plain names (the generative model), reconstructions suffixed.
    assert {"fid", "kid", "diversity_msssim", "fid_recon", "psnr_recon", "ssim_recon"} <= set(m), m
    assert "psnr" not in m and result["protocol"][""]["num_gen"] == 8 and result["protocol"]["recon"]["paired"]


def test_the_demo_config_learns(demo_shards, tmp_path):
    train_demo("aae_demo", demo_shards, tmp_path / "run", 0.64)
    cfg = load_config("aae_demo", [f"data.url={demo_shards}"])
    val, train = (split_batch(demo_shards, cfg, split)["image"].float() / 127.5 - 1 for split in ("val", "train"))
    torch.manual_seed(cfg.run.seed)
    nets = FAMILY.build(cfg, INFO)
    E, Dec = nets["E"].eval(), nets["Dec"].eval()

    def measure():
        with torch.no_grad():
            return float((Dec(E(val)) - val).square().mean()), float(E(train).std(0).log().abs().mean())

    (mse_before, scale_before), states = measure(), final_states(tmp_path / "run")
    E.load_state_dict(states["E"])
    Dec.load_state_dict(states["Dec"])
    mse_after, scale_after = measure()
    # 40 steps: the reconstruction error falls (0.127 -> 0.087 on this machine), and the codes, which
    # start with a spread of ~0.002, take the prior's (|log std| 6.1 -> 0.3).
    assert mse_after < 0.8 * mse_before, (mse_before, mse_after)
    assert scale_before > 4 and scale_after < 1, (scale_before, scale_after)
