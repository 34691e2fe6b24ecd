"""StyleGAN2 + ADA as a family: the optimizer correction for lazy intervals, R1 and path-length
values on tiny hand-made networks, style mixing, the ADA p rule inside the loop's iteration, the
configs, a 2-process run through the real launcher that resumes bit-exactly after SIGKILL (p,
EMA, w_avg, pl_mean, both optimizers), official pickles as ``model.init_from``, and the demo
learning (sliced Wasserstein distance to the reals falls)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_pix2pixhd_train import fresh_G
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
from torch import nn

from pipeline.config import ConfigError, load_config
from pipeline.families import stylegan2 as family
from pipeline.train import checkpoint as ckpt
from pipeline.train.family import DataInfo, StepContext

INFO = DataInfo("image", None, ("image",))
# A StyleGAN2 small enough for 2 CPU processes: 32x32 crops of the demo photos, 16..32 channels.
TINY = ["model.resolution=32", "data.crop_size=32,32", "data.load_size=64,32", "model.cbase=512",
        "model.cmax=32", "model.z_dim=32", "model.w_dim=32", "model.map=2", "train.batch_size=4",
        "model.mbstd=2", "data.workers=0", "train.progress=false", "train.log_every_kimg=0.004",
        "train.image_every_kimg=0", "model.G_reg_interval=2", "model.D_reg_interval=2",
        "model.ada_interval=1", "model.ada_kimg=0.1", "model.ema_kimg=0.01", "model.ema_rampup=0.05"]


def tiny_cfg(*overrides: str):
    return load_config("stylegan2_demo", [*TINY, *overrides])


def ctx_for(nets: dict, cfg, **kw) -> StepContext:
    return StepContext(nets=nets, plain=nets, cfg=cfg, info=INFO, **kw)


# ---------------------------------------------------------------- the hyperparameters


def test_the_shipped_configs_are_the_official_settings():
    f = load_config("stylegan2_ffhq1024", []).model  # config F, --cfg=stylegan2
    assert (f.resolution, f.cbase, f.cmax, f.map, f.mbstd, f.lr_G, f.r1_gamma, f.ema_kimg) == \
        (1024, 32768, 512, 8, 4, 0.002, 10.0, 10.0)
    assert load_config("stylegan2_ffhq1024", []).train.batch_size == 32
    p = load_config("stylegan2_ffhq256", []).model  # --cfg=paper256
    assert (p.resolution, p.cbase, p.mbstd, p.lr_G, p.lr_D, p.r1_gamma, p.ema_kimg) == \
        (256, 16384, 8, 0.0025, 0.0025, 1.0, 20.0)
    assert load_config("stylegan2_ffhq256", []).train.batch_size == 64
    assert (f.style_mixing_prob, f.pl_weight, f.pl_decay, f.pl_batch_shrink) == (0.9, 2.0, 0.01, 2)
    assert (f.aug, f.ada_target, f.ada_interval, f.ada_kimg) == ("ada", 0.6, 4, 500.0)


@pytest.mark.parametrize("override, message", [
    ("model.resolution=48", "power of two"),
    ("model.aug=fixed", "augment_p"),
])
def test_config_mistakes_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(override)


def test_lazy_regularisation_corrects_lr_and_betas_by_the_interval():
    opts = {o.name: o for o in family.optimizers(tiny_cfg("model.G_reg_interval=4", "model.D_reg_interval=16"))}
    cfg = tiny_cfg()
    assert opts["G"].lr == pytest.approx(cfg.model.lr_G * 4 / 5)
    assert opts["G"].betas == pytest.approx((0.0, 0.99 ** (4 / 5)))
    assert opts["D"].lr == pytest.approx(cfg.model.lr_D * 16 / 17)
    assert opts["D"].betas == pytest.approx((0.0, 0.99 ** (16 / 17)))
    plain = {o.name: o for o in family.optimizers(tiny_cfg("model.pl_weight=0", "model.r1_gamma=0"))}
    assert plain["G"].lr == cfg.model.lr_G and plain["D"].betas == (0.0, 0.99)
    names = [p.name for p in family.phases(tiny_cfg("model.G_reg_interval=4", "model.D_reg_interval=16"))]
    assert names == ["Gmain", "Greg", "Dmain", "Dreg"]
    every = {p.name: p.every for p in family.phases(tiny_cfg("model.G_reg_interval=4", "model.D_reg_interval=16"))}
    assert every == {"Gmain": 1, "Greg": 4, "Dmain": 1, "Dreg": 16}


# ---------------------------------------------------------------- regularisers on hand-made networks


class LinearD(nn.Module):
    """D(x) = <w, x> per sample: its input gradient is w, so R1 = ||w||^2 for every sample."""

    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape))
        self.augment_pipe = None

    def forward(self, img, c):
        return (img * self.w).flatten(1).sum(1, keepdim=True)


def test_r1_is_gamma_over_2_times_the_squared_input_gradient_times_the_interval():
    cfg = tiny_cfg("model.r1_gamma=3", "model.D_reg_interval=16")
    D = LinearD((3, 32, 32))
    ctx = ctx_for({"D": D}, cfg)
    out = family.d_reg(ctx, {"image": torch.randn(4, 3, 32, 32)}, {})
    r1 = D.w.detach().square().sum()
    assert out["r1_penalty"].item() == pytest.approx(r1.item(), rel=1e-5)
    assert out["D/reg"].item() == pytest.approx(1.5 * r1.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(16 * 1.5 * r1.item(), rel=1e-5)
    out["loss"].backward()  # d/dw of 16 * 1.5 * ||w||^2
    torch.testing.assert_close(D.w.grad, 16 * 1.5 * 2 * D.w.detach(), rtol=1e-5, atol=1e-6)


class NoiseG(nn.Module):
    """A G that ignores its input: images from the RNG (for penalties whose value does not depend on them)."""

    def forward(self, z, c, style_mixing_prob=0.0, **kw):
        return torch.randn(z.shape[0], 3, 32, 32)


def test_rpgan_pairs_reals_with_fakes_and_adds_r2_on_fakes_to_the_lazy_r1():
    cfg = tiny_cfg("model.loss=rpgan", "model.r1_gamma=3", "model.D_reg_interval=16", "model.aug=noaug")
    D = LinearD((3, 32, 32))
    ctx = ctx_for({"D": D, "G": NoiseG()}, cfg)
    out = family.d_reg(ctx, {"image": torch.randn(4, 3, 32, 32)}, {})
    r = D.w.detach().square().sum()  # a linear D: R1 = R2 = ||w||^2 whatever the input
    assert out["r1_penalty"].item() == pytest.approx(r.item(), rel=1e-5)
    assert out["r2_penalty"].item() == pytest.approx(r.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(16 * 1.5 * 2 * r.item(), rel=1e-5)
    torch.manual_seed(0)
    real = torch.randn(4, 3, 32, 32)
    b = {"image": real, "z": torch.zeros(4, cfg.model.z_dim)}
    torch.manual_seed(1)
    d = family.d_main(ctx, b, {})
    torch.manual_seed(1)
    fake = NoiseG()(family._z(ctx, 4, b["z"]), None)
    with torch.no_grad():
        rel = D(real, None).squeeze(1) - D(fake, None).squeeze(1)
    assert d["D/loss"].item() == pytest.approx(float(torch.nn.functional.softplus(-rel).mean()), rel=1e-5)


class LinearG(nn.Module):
    """img = (sum over layers of ws) @ M, reshaped: d<img, y>/d ws[:, l] = M @ y for every l."""

    num_ws, w_dim = 3, 5

    def __init__(self):
        super().__init__()
        self.M = nn.Parameter(torch.randn(self.w_dim, 3 * 4 * 4))
        self.mapping = nn.Parameter(torch.eye(self.w_dim))  # ws = z, through a parameter as G's

    def forward(self, z, c, style_mixing_prob=0.0, return_ws=False, **kw):
        ws = (z @ self.mapping)[:, None].repeat(1, self.num_ws, 1)
        img = (ws.sum(1) @ self.M).view(-1, 3, 4, 4)
        return (img, ws) if return_ws else img


def test_path_length_penalty_by_hand_with_the_running_mean_per_rank():
    cfg = tiny_cfg("model.pl_weight=2", "model.pl_decay=0.01", "model.pl_batch_shrink=2", "model.G_reg_interval=4",
                   "model.z_dim=5")
    G = LinearG()
    ctx = ctx_for({"G": G}, cfg)
    ctx.state["pl_mean"] = torch.tensor(0.5)
    torch.manual_seed(1)
    out = family.g_reg(ctx, {"z": torch.zeros(8, 5)}, {})
    torch.manual_seed(1)
    z = torch.randn(4, 5)  # the batch shrunk by 2, drawn first
    noise = torch.randn(4, 3, 4, 4) / math.sqrt(16)  # then the projection noise
    g = noise.flatten(1) @ G.M.detach().T  # [4, w_dim], the same for each of the 3 layers
    lengths = g.square().sum(1).sqrt()  # sqrt(mean over layers of the squared norm)
    mean = 0.5 + 0.01 * (lengths.mean() - 0.5)
    assert ctx.state["pl_mean"].item() == pytest.approx(mean.item(), rel=1e-5)
    penalty = (lengths - mean).square().mean()
    assert out["pl_penalty"].item() == pytest.approx(penalty.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(4 * 2 * penalty.item(), rel=1e-5)
    assert z.shape == (4, 5)


# ---------------------------------------------------------------- style mixing and ADA in the step


def tiny_nets(*overrides: str) -> dict:
    torch.manual_seed(0)
    return family.build(tiny_cfg(*overrides), INFO)


def test_style_mixing_takes_a_second_latent_from_a_cutoff_on_and_leaves_w_avg_to_the_first():
    G = tiny_nets()["G"]
    z = torch.randn(2, 32)
    c = z.new_zeros(2, 0)
    G.eval()
    plain = G.mapping(z, c, skip_w_avg_update=True)
    torch.manual_seed(3)
    _, ws = G(z, c, style_mixing_prob=1.0, return_ws=True)
    same = (ws == plain).all(dim=2).all(dim=0)  # per layer
    cutoff = int(same.long().argmin())
    assert 1 <= cutoff < G.num_ws and same[:cutoff].all() and not same[cutoff:].any()
    torch.manual_seed(3)
    _, ws0 = G(z, c, style_mixing_prob=0.0, return_ws=True)
    assert torch.equal(ws0, plain)


def test_the_mapping_runs_under_bf16_autocast_and_keeps_w_avg_in_fp32():
    G = tiny_nets()["G"]
    z = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ws = G.mapping(z, z.new_zeros(4, 0))
        truncated = G.mapping(z, z.new_zeros(4, 0), truncation_psi=0.5, truncation_cutoff=2)
    assert G.mapping.w_avg.dtype == torch.float32 and G.mapping.w_avg.abs().sum() > 0
    assert ws.dtype == truncated.dtype == torch.bfloat16


def test_the_path_length_mean_carries_the_batch_gradient_as_officially():
    cfg = tiny_cfg("model.pl_decay=0.5", "model.z_dim=5")
    G = LinearG()
    ctx = ctx_for({"G": G}, cfg)
    ctx.state["pl_mean"] = torch.tensor(0.5)
    torch.manual_seed(1)
    family.g_reg(ctx, {"z": torch.zeros(8, 5)}, {})["loss"].backward()
    assert not ctx.state["pl_mean"].requires_grad
    torch.manual_seed(1)
    torch.randn(4, 5)
    noise = torch.randn(4, 3, 4, 4) / 4

    def grad(detach: bool) -> torch.Tensor:
        M = G.M.detach().clone().requires_grad_(True)
        lengths = (noise.flatten(1) @ M.T).square().sum(1).sqrt()
        batch = lengths.mean().detach() if detach else lengths.mean()
        mean = 0.5 + 0.5 * (batch - 0.5)
        loss = ((lengths - mean).square() * cfg.model.pl_weight).mean() * cfg.model.G_reg_interval
        return torch.autograd.grad(loss, M)[0]

    torch.testing.assert_close(G.M.grad, grad(detach=False), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(G.M.grad, grad(detach=True), rtol=1e-3, atol=1e-5)


def test_ada_moves_p_every_interval_from_the_mean_sign_over_ranks():
    cfg = tiny_cfg("model.ada_interval=4", "model.ada_kimg=1", "train.batch_size=8", "model.augment_p=0.2")
    nets = tiny_nets("model.ada_interval=4", "model.ada_kimg=1", "train.batch_size=8", "model.augment_p=0.2")
    seen = []

    def mean_over_ranks(t):
        seen.append(t.clone())
        return t  # one rank

    ctx = ctx_for(nets, cfg, mean_over_ranks=mean_over_ranks)
    pipe = nets["D"].augment_pipe
    ctx.state["ada_signs"] = torch.tensor([3.0, 4.0])  # mean sign 0.75 > 0.6: overfitting, p goes up
    for step in (1, 2, 3):
        ctx.step = step
        family._adjust_p(ctx)
    assert not seen and pipe.p.item() == pytest.approx(0.2)  # only every ada_interval iterations
    ctx.step = 4
    family._adjust_p(ctx)
    assert pipe.p.item() == pytest.approx(0.2 + 8 * 4 / 1000)
    assert ctx.state["ada_signs"].tolist() == [0.0, 0.0]
    ctx.state["ada_signs"] = torch.tensor([-4.0, 4.0])  # underfitting: p goes down, not below 0
    ctx.step = 8
    for _ in range(10):
        family._adjust_p(ctx)
        ctx.state["ada_signs"] = torch.tensor([-4.0, 4.0])
    assert pipe.p.item() == 0.0


def test_d_main_counts_the_signs_of_d_on_reals_and_g_main_logs_p():
    cfg = tiny_cfg()
    nets = tiny_nets()
    ctx = ctx_for(nets, cfg)
    b = family.prepare({"data": {"image": torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)}},
                       torch.device("cpu"), cfg, INFO)
    out = family.d_main(ctx, b, {})
    assert ctx.state["ada_signs"][1].item() == 4
    assert abs(ctx.state["ada_signs"][0].item()) <= 4
    assert torch.isfinite(out["loss"]) and {"D/loss", "scores/fake", "scores/real", "signs/real"} <= set(out)
    g = family.g_main(ctx, b, {})
    assert g["Progress/augment"].item() == nets["D"].augment_pipe.p.item()


def test_an_official_state_dict_initialises_g_and_d_and_a_misfit_is_named():
    nets = tiny_nets()
    other = tiny_nets()
    official_D = {k: v for k, v in other["D"].state_dict().items() if not k.startswith("augment_pipe.")}
    family.init_from(nets, {"G": other["G"].state_dict(), "D": official_D}.get)
    assert_identical(nets["G"].state_dict(), other["G"].state_dict())
    bigger = family.build(tiny_cfg("model.cmax=64"), INFO)
    with pytest.raises(ValueError, match="does not fit"):
        family.init_from(bigger, {"G": other["G"].state_dict(), "D": official_D}.get)


OFFICIAL_PKL = str(Path(__file__).parent / "data" / "stylegan2_official_tiny.pkl")
# The networks inside it (tests/tools/make_stylegan2_pickle.py): 16x16, cbase 128, cmax 8, z/w 16.
PKL_NET = ["model.resolution=16", "data.crop_size=16,16", "data.load_size=32,16", "model.cbase=128",
           "model.cmax=8", "model.z_dim=16", "model.w_dim=16", "model.map=2"]


def test_an_official_pickle_initialises_g_and_d_without_running_its_code():
    from pipeline.models.stylegan2_pickle import load_official_pickle

    nets = family.build(tiny_cfg(*PKL_NET), INFO)
    p0 = nets["D"].augment_pipe.p.clone()
    family.init_from(nets, family.init_source(OFFICIAL_PKL, None))
    official = load_official_pickle(OFFICIAL_PKL)
    assert_identical(nets["G"].state_dict(), dict(official["G"]))
    D = {k: v for k, v in nets["D"].state_dict().items() if not k.startswith("augment_pipe.")}
    assert_identical(D, dict(official["D"]))
    assert torch.equal(nets["D"].augment_pipe.p, p0)  # the official transfer learning keeps its own p
    assert family.init_source("runs/a/checkpoints/step-00000010", None) is None  # ours: the loop reads it


def test_model_init_from_an_official_pickle_through_the_launcher(demo_shards, tmp_path):
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={tmp_path / 'run'}", f"model.init_from={OFFICIAL_PKL}",
                           *TINY, *PKL_NET, "train.total_kimg=0.004"], config="stylegan2_demo"))
    assert r.returncode == 0, explain(r)
    assert f"initialised from {OFFICIAL_PKL} (read by the stylegan2 family)" in r.stdout + r.stderr
    bad = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={tmp_path / 'bad'}",
                             f"model.init_from={OFFICIAL_PKL}", *TINY, "train.total_kimg=0.004"],
                         config="stylegan2_demo"))
    assert bad.returncode != 0
    assert "does not fit this config's network" in bad.stderr.strip().splitlines()[-1], explain(bad)


def test_rpgan_through_the_launcher_logs_both_penalties(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", *TINY, "model.loss=rpgan",
                           "train.total_kimg=0.008"], config="stylegan2_demo"))
    assert r.returncode == 0, explain(r)
    scalars = read_scalars(run_dir)
    assert all(v > 0 for tag in ("Loss/r1_penalty", "Loss/r2_penalty") for _, v in scalars[tag]), sorted(scalars)


# ---------------------------------------------------------------- the real launcher


@pytest.mark.multiprocess
def test_two_processes_resume_bit_exact_after_sigkill_p_ema_w_avg_pl_mean_included(demo_shards, tmp_path):
    """``accelerate launch launch/train.py --config stylegan2_demo`` shrunk, once straight through
    and once SIGKILLed after its first checkpoint, then resumed: every network, EMA copy, buffer
    (ADA's p, w_avg), optimizer and rank file (pl_mean, the ADA accumulator) equal."""
    args = [f"data.url={demo_shards}", "train.total_kimg=0.048", "checkpoint.every_kimg=0.016", *TINY]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    r = run(launch_cmd(2, [f"run.dir={a_dir}", *args], config="stylegan2_demo"), timeout=400)
    assert r.returncode == 0, explain(r)
    scalars = read_scalars(a_dir)
    for tag in ("Loss/G/loss", "Loss/G/reg", "Loss/D/loss", "Loss/D/reg", "Loss/pl_penalty", "Loss/r1_penalty",
                "Loss/signs/real", "Progress/augment"):
        assert tag in scalars and all(math.isfinite(v) for _, v in scalars[tag]), tag
    states = final_states(a_dir)
    assert set(states) == {"G", "G_ema", "D", "opt_G", "opt_D"}
    assert states["D"]["augment_pipe.p"].item() > 0  # ADA moved p off 0 (the demo's D overfits at once)
    assert not torch.equal(states["G"]["mapping.w_avg"], torch.zeros_like(states["G"]["mapping.w_avg"]))

    cmd = launch_cmd(2, [f"run.dir={b_dir}", *args], config="stylegan2_demo")
    kill_job_at_commit(cmd, b_dir, 4)
    assert ckpt.latest(str(b_dir)).step < 12
    r = run(cmd, timeout=400)
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, explain(r)
    a, b = committed_files(a_dir), committed_files(b_dir)
    assert_identical(a, b)
    for rank in ("rank-000.pt", "rank-001.pt"):
        assert {"pl_mean", "ada_signs"} <= set(a[rank]["family_state"]), list(a[rank]["family_state"])


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256) -> float:
    """Sliced Wasserstein distance (as in Karras et al. 2018's SWD, on one 16x16 level) between
    two equal-sized image sets [N, 3, H, W]: the mean over fixed random directions of the
    1-D Wasserstein distance between the projected sets."""
    x, y = (F.adaptive_avg_pool2d(t.float(), 16).flatten(1) for t in (a, b))
    dirs = torch.randn(x.shape[1], projections, generator=torch.Generator().manual_seed(0))
    dirs /= dirs.norm(dim=0, keepdim=True)
    return float(((x @ dirs).sort(0).values - (y @ dirs).sort(0).values).abs().mean())


def swd_to_reals(demo_shards: str, state: dict) -> float:
    """SWD between G's images from 48 fixed latents and the 48 training photos, centre-cropped
    as the evaluator feeds them."""
    from pipeline.data.stream import make_stream
    from pipeline.data.transforms import Augment

    cfg = load_config("stylegan2_demo", [f"data.url={demo_shards}"])
    G = family.build(cfg, INFO)["G"]
    G.load_state_dict(state)
    G.eval()
    reals = torch.stack([torch.as_tensor(s["image"]) for s in make_stream(
        demo_shards, "train", train=False, fields=("image",), augment=Augment(cfg.data.load_size, cfg.data.crop_size,
                                                                              False))])
    reals = reals.float() / 127.5 - 1
    z = torch.randn(len(reals), cfg.model.z_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fakes = G(z, z.new_zeros(len(z), 0))
    return sliced_wasserstein(fakes, reals)


def test_the_demo_config_learns(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.24",
                           "checkpoint.every_kimg=0.24", "data.workers=0", "train.progress=false",
                           "train.image_every_kimg=0"], config="stylegan2_demo"), timeout=400)
    assert r.returncode == 0, explain(r)
    before = swd_to_reals(demo_shards, fresh_G("stylegan2_demo", [f"data.url={demo_shards}"], demo_shards))
    after = swd_to_reals(demo_shards, final_states(run_dir)["G_ema"])
    assert after < 0.5 * before, (before, after)  # 30 steps: about 0.3 on this machine's CPU
