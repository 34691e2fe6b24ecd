"""Progressive growing (Karras et al. 2018): the paper's parameter counts; the fade-in as the α-blend
of the two paths, computed directly, and continuous where a fade starts and ends; blocks not yet
grown get zero gradients; the official schedule and its optimizer resets; two processes through
the real launcher, killed mid-fade and resumed bit for bit, then the evaluator; and the demo that
learns its first level."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train import (
    assert_identical,
    committed_files,
    explain,
    final_states,
    kill_job_at_commit,
    launch_cmd,
    read_scalars,
    run,
    split_batch,
    train_demo,
)

from pipeline.config import ConfigError, load_config
from pipeline.families import get_family
from pipeline.families.progan import lod_at, optimizer_epoch
from pipeline.models.progan import ProGANDiscriminator, ProGANGenerator, downscale2d, fade_reals, upscale2d
from pipeline.train import checkpoint as ckpt
from pipeline.train.family import DataInfo

REPO = Path(__file__).resolve().parent.parent
FAMILY = get_family("progan")
INFO = DataInfo("unconditional", None, ("image",))


def test_parameter_counts_are_the_papers():
    """Table 2 of the paper (CelebA-HQ, 1024x1024): 23.1M trainable parameters in G and in D."""
    with torch.device("meta"):
        G, D = ProGANGenerator(1024), ProGANDiscriminator(1024)
    assert sum(p.numel() for p in G.parameters()) == 23_079_115
    assert sum(p.numel() for p in D.parameters()) == 23_087_249


def _small():
    torch.manual_seed(0)
    G = ProGANGenerator(32, latent_size=16, fmap_base=64, fmap_max=16)
    D = ProGANDiscriminator(32, fmap_base=64, fmap_max=16)
    return G, D


def test_the_fade_in_is_the_alpha_blend_of_the_two_paths():
    G, D = _small()
    z = torch.randn(4, 16)
    with torch.no_grad():
        x4 = G._block(z, 2)
        x8 = G._block(x4, 3)
        x16 = G._block(x8, 4)
        new, old = G.torgb[2](x16), upscale2d(G.torgb[1](x8))
        for fade in (0.0, 0.3, 0.75):
            alpha = 1 - fade  # the new block's share
            torch.testing.assert_close(G(z, lod=1 + fade), alpha * new + (1 - alpha) * old)
        # Where the fade starts (α = 0) G is the old network, upscaled; where it ends, the new one.
        torch.testing.assert_close(G(z, lod=2 - 1e-7), upscale2d(G(z, lod=2)), atol=1e-5, rtol=0)
        torch.testing.assert_close(G(z, lod=2, full=True), upscale2d(G(z, lod=2), 4))
        img = torch.randn(4, 3, 16, 16)
        y_new = D._block(F.leaky_relu(D.fromrgb[2](img), 0.2), 4)
        y_old = F.leaky_relu(D.fromrgb[1](downscale2d(img)), 0.2)
        for fade in (0.0, 0.3):
            x = (1 - fade) * y_new + fade * y_old
            torch.testing.assert_close(D(img, lod=1 + fade), D._block(D._block(x, 3), 2).flatten())
        torch.testing.assert_close(D(img, lod=2 - 1e-7), D(downscale2d(img), lod=2), atol=1e-5, rtol=0)
    # The reals fade as G's output does: the working resolution blended with its own 2x-down-and-up.
    reals = torch.randn(2, 3, 32, 32)
    at16 = downscale2d(reals, 2)
    torch.testing.assert_close(fade_reals(reals, 1.25, 32), 0.75 * at16 + 0.25 * upscale2d(downscale2d(at16)))
    torch.testing.assert_close(fade_reals(reals, 0.0, 32), reals)


def test_blocks_not_yet_grown_get_zero_gradients():
    G, D = _small()
    z = torch.randn(4, 16)
    fake = G(z, lod=2.5)  # 8x8, fading in over 4x4
    assert fake.shape == (4, 3, 8, 8)
    D(fake, lod=2.5).sum().backward()
    grown = {"dense", "dense_bias", "blocks.0", "blocks.1", "torgb.0", "torgb.1"}
    for name, p in G.named_parameters():
        assert p.grad is not None, name
        assert (p.grad.abs().sum() > 0) == any(name.startswith(g) for g in grown), name
    for name, p in D.named_parameters():
        assert p.grad is not None and (p.grad.abs().sum() > 0) == name.startswith(("blocks.0", "blocks.1", "fromrgb.0",
                                                                                    "fromrgb.1")), name


def test_the_official_schedule_and_its_optimizer_resets():
    m = load_config("progan_folder", ["model.resolution=1024"]).model
    # From 4x4: 600 kimg at each level, then 600 kimg of fade-in of the next.
    assert [lod_at(m, int(k * 1000)) for k in (0, 599, 600, 900, 1200, 1800, 2100, 2400, 8400, 20000)] == \
        [8, 8, 8, 7.5, 7, 7, 6.5, 6, 1, 0]
    cfg = load_config("progan_folder", [])
    epochs = [optimizer_epoch(cfg, int(k * 1000)) for k in (0, 600, 601, 1199, 1200, 1800)]
    assert epochs == [(6, 6), (6, 6), (5, 6), (5, 6), (5, 5), (5, 5)]  # reset when a fade starts and ends
    assert optimizer_epoch(load_config("progan_folder", ["model.reset_optimizer=false"]), 601) is None
    with pytest.raises(ConfigError, match="power of 2"):
        load_config("progan_folder", ["model.resolution=96"])
    with pytest.raises(ConfigError, match="distributed.backend=ddp"):
        load_config("progan_folder", ["distributed.backend=deepspeed"])


TINY = ["model.resolution=16", "model.initial_resolution=8", "model.z_dim=16", "model.fmap_base=64",
        "model.fmap_max=16", "model.lod_training_kimg=0.016", "model.lod_transition_kimg=0.064",
        "data.load_size=32,16", "data.crop_size=16,16", "data.workers=0", "train.batch_size=8",
        "train.progress=false", "train.log_every_kimg=0.008", "train.image_every_kimg=0.032"]


def test_two_processes_killed_mid_fade_resume_bit_exact_and_evaluate(demo_shards, tmp_path):
    """8x8 for 2 steps, then the 16x16 block fades in over 8 steps, then 6 steps at 16x16: the job
    is SIGKILLed after a checkpoint taken mid-fade and resumed; every network, EMA copy, lod buffer
    and optimizer state equals the straight run's, whose Adam state was reset where the fade ended."""
    args = [f"data.url={demo_shards}", "train.total_kimg=0.128", "checkpoint.every_kimg=0.016", *TINY]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    r = run(launch_cmd(2, [f"run.dir={a_dir}", *args], config="progan_demo"), timeout=300)
    assert r.returncode == 0, explain(r)
    lods = [v for _, v in sorted(read_scalars(a_dir)["Progress/lod"])]
    assert lods[0] == 1.0 and lods[-1] == 0.0 and [v for v in lods if 0 < v < 1] == sorted(
        {v for v in lods if 0 < v < 1}, reverse=True), lods
    states = final_states(a_dir)
    assert float(states["G"]["lod"]) == float(states["G_ema"]["lod"]) == 0.0
    # Adam restarted when the fade ended at 80 images (step 10): 6 of the 16 steps since.
    assert {int(s["step"]) for s in states["opt_G"]["state"].values()} == {6}

    cmd = launch_cmd(2, [f"run.dir={b_dir}", *args], config="progan_demo")
    kill_job_at_commit(cmd, b_dir, 4)
    found = ckpt.latest(str(b_dir))
    assert 0 < lod_at(load_config("progan_demo", TINY).model, found.record["nimg"]) < 1, found.record["nimg"]
    r = run(cmd, timeout=300)
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, explain(r)
    assert_identical(committed_files(a_dir), committed_files(b_dir))

    from pipeline.eval.standin import write_standin_inception

    inception = write_standin_inception(tmp_path / "inception.pth")
    r = run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--run", str(a_dir), "--once",
             "--inception-weights", str(inception), "--num-samples", "8", "--kid-subset-size", "4",
             "--kid-subsets", "5", "--batch-size", "4"], timeout=300)
    assert r.returncode == 0, explain(r)
    result = json.loads(next((a_dir / "eval").glob("step-*.json")).read_text())
    assert {"fid", "kid"} <= set(result["metrics"]) and result["protocol"]["image_resolution"] == [16, 16]


def test_the_demo_config_learns_its_first_level(demo_shards, tmp_path):
    """1 kimg at 8x8 (63 steps): the Fréchet distance between G's images and the training photos,
    both at 8x8, in pixel space, falls (236 -> 17 on this machine)."""
    train_demo("progan_demo", demo_shards, tmp_path / "run", 1.008, "model.ema_kimg=0")
    cfg = load_config("progan_demo", [f"data.url={demo_shards}"])
    reals = downscale2d(split_batch(demo_shards, cfg, "train")["image"].float() / 127.5 - 1, 8).flatten(1)
    torch.manual_seed(cfg.run.seed)
    G = FAMILY.build(cfg, INFO)["G"].eval()
    z = torch.randn(256, cfg.model.z_dim)

    def distance():
        with torch.no_grad():
            fakes = G(z).flatten(1)
        mean = (fakes.mean(0) - reals.mean(0)).square().sum()
        a, b = torch.cov(fakes.T.double()), torch.cov(reals.T.double())
        root = torch.linalg.eigvals(a @ b).sqrt().real.sum()
        return float(mean + a.trace() + b.trace() - 2 * root)

    before = distance()
    G.load_state_dict(final_states(tmp_path / "run")["G"])
    assert float(G.lod) == 3.0  # still at 8x8
    after = distance()
    assert after < 0.5 * before, (before, after)
