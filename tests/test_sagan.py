"""SAGAN (Zhang et al. 2019): the self-attention block against a direct computation and as the
identity at γ = 0, the block in the DCGAN family's G and D and in the pix2pix U-Net, the SAGAN
configuration (spectral norm in G and D, hinge, TTUR), two processes through the real launcher,
and the demo that learns."""

from __future__ import annotations

import pytest
import torch
from test_stylegan2 import sliced_wasserstein
from test_train import explain, final_states, launch_cmd, read_scalars, run, split_batch, train_demo

from pipeline.config import ConfigError, load_config
from pipeline.families import get_family
from pipeline.models.layers import SelfAttention
from pipeline.train.family import DataInfo

INFO = DataInfo("label2image", 35, ("label", "image"))
# 32x32 crops of the demo photos and attention on the 16x16 maps: a quarter of the demo's cost.
SMALL = ["model.image_size=32", "model.attention=16", "data.load_size=64,32", "data.crop_size=32,32"]


def direct_attention(block: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Eqs. 1-3 of the paper location by location: β_j,i = softmax_i(q_j · k_i), o_j = W_v Σ_i β_j,i v_i."""
    n, c, h, w = x.shape
    q, k, v = (m(x).flatten(2) for m in (block.query, block.key, block.value))  # [N, C/8, HW]
    o = torch.empty_like(v)
    for j in range(h * w):
        s = (q[:, :, j : j + 1] * k).sum(1)  # [N, HW]: s_j,i over every i
        beta = torch.exp(s - s.amax(1, keepdim=True))
        beta = beta / beta.sum(1, keepdim=True)
        o[:, :, j] = (v * beta[:, None, :]).sum(2)
    return block.gamma * block.out(o.reshape(n, -1, h, w)) + x


def test_self_attention_is_the_papers_computation_and_starts_as_the_identity():
    torch.manual_seed(0)
    block = SelfAttention(32).double()
    x = torch.randn(2, 32, 5, 7, dtype=torch.double)
    assert [tuple(m.weight.shape) for m in (block.query, block.key, block.value, block.out)] == \
        [(4, 32, 1, 1)] * 3 + [(32, 4, 1, 1)]  # C/8 channels for query, key and value
    assert float(block.gamma.detach()) == 0 and torch.equal(block(x), x)  # γ starts at 0: the block is the identity
    # At γ = 0 only γ learns at first: the attention's convs get no gradient until γ moves.
    (block(x) * torch.randn_like(x)).sum().backward()
    assert block.gamma.grad != 0 and all(float(m.weight.grad.abs().max()) == 0 for m in (block.query, block.out))
    with torch.no_grad():
        block.gamma.fill_(0.7)
        for m in (block.query, block.key):  # logits of several units: a softmax far from uniform
            m.weight.mul_(8)
    torch.testing.assert_close(block(x), direct_attention(block, x), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(block(x), x)


def test_sagan_config_puts_attention_and_spectral_norm_in_both_networks():
    cfg = load_config("sagan_folder64", [])
    m = cfg.model
    assert (m.gan, m.lr_G, m.lr_D, m.beta1, m.beta2, m.n_critic, m.attention) == ("hinge", 1e-4, 4e-4, 0.0, 0.9, 1,
                                                                                   (32,))
    with torch.device("meta"):
        nets = get_family("dcgan").build(cfg, INFO)
        plain = get_family("dcgan").build(load_config("dcgan_folder64", []), INFO)
    for name in ("G", "D"):
        blocks = [mod for mod in nets[name].modules() if isinstance(mod, SelfAttention)]
        assert len(blocks) == 1 and blocks[0].query.in_channels == 64  # the 32x32 maps of both: 64 channels
        convs = [mod for mod in nets[name].modules() if isinstance(mod, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
        assert all(torch.nn.utils.parametrize.is_parametrized(c, "weight") for c in convs)  # spectral norm everywhere
        extra = sum(p.numel() for p in nets[name].parameters()) - sum(p.numel() for p in plain[name].parameters())
        # The block (4 maps of 64x8 weights and γ), and D's conv biases without batch norm (no shift of its own).
        assert extra == 4 * 64 * 8 + 1 + (name == "D") * (64 + 128 + 256 + 512 + 1 - 2 * (128 + 256 + 512))
    with pytest.raises(ConfigError, match=r"model.attention: .*\[64\].* choose from \[8, 16, 32\]"):
        load_config("sagan_folder64", ["model.attention=64"])


def test_attention_in_the_unet_starts_as_the_plain_unet():
    from pipeline.families.pix2pix import build

    torch.manual_seed(0)
    plain = build(load_config("pix2pix_demo", ["model.dropout=false"]), INFO)["G"].eval()
    with_attention = build(load_config("pix2pix_demo", ["model.dropout=false", "model.attention=4,16"]), INFO)["G"]
    missing = with_attention.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted({k.split(".")[0] + "." + k.split(".")[1] for k in missing}) == ["up.2", "up.4"]  # 1/16 and 1/4
    x = torch.randn(2, 35, 128, 128)
    with torch.no_grad():
        assert torch.equal(with_attention.eval()(x), plain(x))
    with pytest.raises(ConfigError, match="not decoder scales of unet_128"):
        load_config("pix2pix_demo", ["model.attention=128"])


def test_sagan_on_two_processes(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(2, [f"data.url={demo_shards}", f"run.dir={run_dir}", *SMALL, "model.ngf=8", "model.ndf=8",
                           "train.total_kimg=0.032", "checkpoint.every_kimg=0.032", "data.workers=0",
                           "train.batch_size=8", "train.log_every_kimg=0.008", "train.progress=false"],
                       config="sagan_demo"))
    assert r.returncode == 0, explain(r)
    assert {"Loss/D_real", "Loss/D_fake", "Loss/G_GAN"} <= set(read_scalars(run_dir))
    states = final_states(run_dir)
    # γ moved in both networks: the blocks take part in training, through DDP on both ranks.
    assert all(float(states[n][k]) != 0 for n in ("G", "D") for k in states[n] if k.endswith("gamma"))
    assert sum(k.endswith("gamma") for n in ("G", "D") for k in states[n]) == 2


def test_the_demo_config_learns(demo_shards, tmp_path):
    overrides = [f"data.url={demo_shards}", *SMALL]
    train_demo("sagan_demo", demo_shards, tmp_path / "run", 1.92, *SMALL)
    cfg = load_config("sagan_demo", overrides)
    reals = split_batch(demo_shards, cfg, "train")["image"].float() / 127.5 - 1
    torch.manual_seed(cfg.run.seed)
    G = get_family("dcgan").build(cfg, INFO)["G"].eval()
    z = torch.randn(len(reals), cfg.model.z_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = sliced_wasserstein(G(z), reals)
        G.load_state_dict(final_states(tmp_path / "run")["G_ema"])
        after = sliced_wasserstein(G(z), reals)
    assert after < 0.5 * before, (before, after)  # 120 steps: about 0.37 on this machine's CPU
