"""BicycleGAN (Zhu et al. 2017): the official networks' parameter counts and names, z at G's
input, E untouched by the latent regression, the diversity metric, two processes through the
real launcher with a kill and a bit-identical resume, the evaluator, and the demo that learns."""

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
from pipeline.families.bicyclegan import diversity, eg_step
from pipeline.train import checkpoint as ckpt
from pipeline.train.family import DataInfo, StepContext

REPO = Path(__file__).resolve().parent.parent
FAMILY = get_family("bicyclegan")
PAIRED = DataInfo("paired", None, ("input", "image"))
TINY = ["model.ngf=4", "model.nef=4", "model.ndf=4", "data.workers=0", "train.progress=false",
        "train.log_every_kimg=0.008", "train.image_every_kimg=0", "train.batch_size=4"]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_networks_have_the_official_parameter_counts_and_names():
    # Counted on the official networks.py (define_G/E/D with the train options, input_nc 3) and
    # checked there output for output against these networks given the same weights.
    with torch.device("meta"):
        nets = FAMILY.build(load_config(None, ["model.family=bicyclegan"]), PAIRED)
        assert (count(nets["G"]), count(nets["E"]), count(nets["D"]), count(nets["D2"])) == \
            (54_417_795, 2_590_032, 3_458_978, 3_458_978)
        small = FAMILY.build(load_config(None, ["model.family=bicyclegan", "model.generator=unet_128",
                                                "model.encoder=resnet_128"]), PAIRED)
        assert (count(small["G"]), count(small["E"])) == (41_833_859, 1_344_080)
        shared = FAMILY.build(load_config(None, ["model.family=bicyclegan", "model.use_same_D=true"]), PAIRED)
        assert set(shared) == {"G", "E", "D"}
    keys = list(nets["E"].state_dict())  # the official E_ResNet's: its state dicts load as they are
    assert keys[:4] == ["fc.0.weight", "fc.0.bias", "fcVar.0.weight", "fcVar.0.bias"]
    assert {"conv.1.conv.5.0.weight", "conv.1.shortcut.1.weight", "conv.4.conv.2.bias"} <= set(keys)
    with pytest.raises(ConfigError, match="unet_64 takes 64px images but model.encoder=resnet_256 takes 256px"):
        load_config(None, ["model.family=bicyclegan", "model.generator=unet_64"])


def test_z_is_tiled_over_the_input_channels():
    torch.manual_seed(0)
    G = FAMILY.build(load_config("bicyclegan_demo", []), PAIRED)["G"].eval()
    x, z = torch.rand(2, 3, 64, 64) * 2 - 1, torch.randn(2, 8)
    with torch.no_grad():
        tiled = torch.cat([x, z[:, :, None, None].expand(2, 8, 64, 64)], 1)
        assert torch.equal(G(x, z), G.unet(tiled))
        assert not torch.allclose(G(x, z), G(x, torch.randn(2, 8)))  # the output depends on z


def test_e_gets_no_gradient_from_the_latent_regression_and_g_does():
    def grads(lambdas: dict) -> tuple[float, float]:
        cfg = load_config("bicyclegan_demo", [*TINY, *(f"model.{k}={v}" for k, v in lambdas.items())])
        torch.manual_seed(0)
        nets = FAMILY.build(cfg, PAIRED)
        ctx = StepContext(nets=nets, plain=nets, cfg=cfg, info=PAIRED)
        b = {"input": torch.rand(4, 3, 64, 64) * 2 - 1, "image": torch.rand(4, 3, 64, 64) * 2 - 1}
        scratch: dict = {}
        eg_step(ctx, b, scratch)["loss"].backward()
        assert scratch["fake_random"].shape == (2, 3, 64, 64)  # the batch's halves
        norm = lambda m: float(sum(p.grad.abs().sum() for p in m.parameters() if p.grad is not None))  # noqa: E731
        return norm(nets["E"]), norm(nets["G"])

    off = {"lambda_L1": 0, "lambda_GAN": 0, "lambda_GAN2": 0, "lambda_kl": 0, "lambda_z": 0}
    e, g = grads({**off, "lambda_z": 0.5})
    assert e == 0 and g > 0  # |E(G(A, z)) - z| trains G only (the official set_requires_grad([netE], False))
    e, _ = grads({**off, "lambda_kl": 0.01})
    assert e > 0
    e, g = grads({**off, "lambda_L1": 10})
    assert e > 0 and g > 0


def test_diversity_is_lpips_between_two_outputs_and_zero_when_z_is_ignored(tmp_path):
    from inception_weights import write_random_lpips_weights

    from pipeline.eval.paired import load_lpips

    net = load_lpips(str(write_random_lpips_weights(tmp_path / "lpips.pth")))
    torch.manual_seed(0)
    G = FAMILY.build(load_config("bicyclegan_demo", ["model.ngf=4", "model.nef=4", "model.ndf=4"]), PAIRED)["G"]
    b = {"input": torch.rand(3, 3, 64, 64) * 2 - 1}

    class IgnoresZ(torch.nn.Module):
        nz = 8

        def forward(self, x, z):
            return x.flip(1)

    assert diversity({"G": G}, b, G(b["input"], torch.randn(3, 8)).detach(), None) == {}  # no weights: left out
    zero = diversity({"G": IgnoresZ()}, b, b["input"].flip(1), net)["diversity_lpips"]
    assert zero.shape == (3,) and torch.equal(zero, torch.zeros(3))
    with torch.no_grad():
        some = diversity({"G": G}, b, G(b["input"], torch.randn(3, 8)), net)["diversity_lpips"]
    assert (some > 0).all()


@pytest.mark.multiprocess
def test_two_processes_resume_bit_identical_and_the_evaluator_scores_both_modes(demo_shards, tmp_path):
    args = [f"data.url={demo_shards}", *TINY, "train.total_kimg=0.024", "checkpoint.every_kimg=0.008"]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    r = run(launch_cmd(2, [f"run.dir={a_dir}", *args], config="bicyclegan_demo"))
    assert r.returncode == 0, explain(r)
    assert "DDP: G steps G; E steps E; D steps D; D2 steps D2" in r.stdout + r.stderr
    cmd = launch_cmd(2, [f"run.dir={b_dir}", *args], config="bicyclegan_demo")
    kill_job_at_commit(cmd, b_dir, 2)
    assert ckpt.latest(str(b_dir)).step < 6
    r = run(cmd)
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, explain(r)
    a, b = committed_files(a_dir), committed_files(b_dir)
    assert {"G.pt", "E.pt", "D.pt", "D2.pt", "opt_G.pt", "opt_E.pt", "opt_D.pt", "opt_D2.pt"} <= set(a)
    assert_identical(a, b)
    assert {"Loss/G_GAN", "Loss/G_GAN2", "Loss/G_L1", "Loss/z_L1", "Loss/kl", "Loss/D", "Loss/D2"} <= \
        set(read_scalars(a_dir))
    from inception_weights import write_random_lpips_weights

    from pipeline.eval.standin import write_standin_inception

    r = run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--run", str(a_dir), "--once", "--step", "6",
             "--inception-weights", str(write_standin_inception(tmp_path / "inception.pth")),
             "--lpips-weights", str(write_random_lpips_weights(tmp_path / "lpips.pth")),
             "--kid-subset-size", "4", "--kid-subsets", "5", "--batch-size", "4"], timeout=300)
    assert r.returncode == 0, explain(r)
    m = json.loads((a_dir / "eval" / "step-00000006.json").read_text())["metrics"]
    # Random z: FID and the diversity under the plain names; G(A, E(B)): paired against B.
    assert m["diversity_lpips"] > 0 and {"fid", "kid", "fid_encoded", "psnr_encoded", "lpips_encoded"} <= set(m), m


def test_the_demo_config_learns(demo_shards, tmp_path):
    from pipeline.data.manifest import load_manifest

    train_demo("bicyclegan_demo", demo_shards, tmp_path / "run", 0.96)
    manifest = load_manifest(demo_shards)
    info = DataInfo(manifest.task, manifest.num_classes, tuple(manifest.fields))
    cfg = load_config("bicyclegan_demo", [f"data.url={demo_shards}"])
    b = FAMILY.prepare({"data": split_batch(demo_shards, cfg, "val", ("label", "image"))}, torch.device("cpu"), cfg,
                       info)
    torch.manual_seed(cfg.run.seed)
    nets = FAMILY.build(cfg, info)
    G, E = nets["G"].eval(), nets["E"].eval()

    def error() -> float:  # the cVAE-GAN path: B from its own code
        with torch.no_grad():
            return float(F.l1_loss(G(b["input"], E(b["image"])[0]), b["image"]))

    before = error()
    states = final_states(tmp_path / "run")
    G.load_state_dict(states["G_ema"])
    E.load_state_dict(states["E"])
    after = error()
    assert after < 0.8 * before, (before, after)  # 120 steps: 0.32 -> about 0.22 on this machine's CPU


def test_one_shared_d_judges_both_cycles(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", *TINY, "model.use_same_D=true",
                           "train.total_kimg=0.008", "checkpoint.every_kimg=0.008"], config="bicyclegan_demo"))
    assert r.returncode == 0, explain(r)
    assert "one process: G steps G; E steps E; D steps D (fp32" in r.stdout + r.stderr
    assert "D2.pt" not in committed_files(run_dir) and "Loss/D2" in read_scalars(run_dir)
