"""Writes ``tests/data/stylegan2_official_tiny.pt``: what the official NVlabs/stylegan2-ada-pytorch
networks (``training/networks.py``) hold and compute, for ``tests/test_stylegan2_models.py``, which
must not import the official code.

    python tests/tools/make_stylegan2_reference.py --official /path/to/stylegan2-ada-pytorch

Holds, as plain tensors, lists and numbers (``torch.load(..., weights_only=True)`` reads it):

- ``configs``: for the paper's configs (F at 1024², paper256) the constructor arguments, the
  parameter count and the ordered ``state_dict()`` keys with shapes (no values);
- ``cases``: tiny networks (seeded init, then perturbed as after some training so that biases,
  noise strengths and ``w_avg`` are not trivial; the ``*_init`` cases unperturbed), with their
  state dicts, inputs, and the official outputs: G in eval mode (fused modconv) with const and
  seeded random noise (and the noise it drew), truncation, in training mode (non-fused, ``w_avg`` update), the
  gradient of Σ img² with respect to ws; D logits and their gradient with respect to the image.

Runs on CPU with the official code's reference (non-CUDA) ops.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "data" / "stylegan2_official_tiny.pt"

# The paper's configs as the official train.py builds them (--cfg=stylegan2 and --cfg=paper256).
PAPER = {
    "G_F1024": ("G", dict(z_dim=512, c_dim=0, w_dim=512, img_resolution=1024, img_channels=3,
                          mapping_kwargs=dict(num_layers=8),
                          synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256))),
    "D_F1024": ("D", dict(c_dim=0, img_resolution=1024, img_channels=3, channel_base=32768, channel_max=512,
                          num_fp16_res=4, conv_clamp=256, epilogue_kwargs=dict(mbstd_group_size=4))),
    "G_paper256": ("G", dict(z_dim=512, c_dim=0, w_dim=512, img_resolution=256, img_channels=3,
                             mapping_kwargs=dict(num_layers=8),
                             synthesis_kwargs=dict(channel_base=16384, channel_max=512, num_fp16_res=4,
                                                   conv_clamp=256))),
    "D_paper256": ("D", dict(c_dim=0, img_resolution=256, img_channels=3, channel_base=16384, channel_max=512,
                             num_fp16_res=4, conv_clamp=256, epilogue_kwargs=dict(mbstd_group_size=8))),
}

# Tiny networks: (kind, kwargs, perturb). conv_clamp 0.5 is small enough to clamp.
CASES = {
    "G": ("G", dict(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, img_channels=3, mapping_kwargs=dict(num_layers=2),
                    synthesis_kwargs=dict(channel_base=128, channel_max=16, conv_clamp=256)), True),
    "G_cond_resnet": ("G", dict(z_dim=16, c_dim=4, w_dim=16, img_resolution=8, img_channels=3,
                                mapping_kwargs=dict(num_layers=2),
                                synthesis_kwargs=dict(channel_base=64, channel_max=8, conv_clamp=0.5,
                                                      architecture="resnet")), True),
    "G_orig_init": ("G", dict(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3,
                              mapping_kwargs=dict(num_layers=2),
                              synthesis_kwargs=dict(channel_base=64, channel_max=8, architecture="orig")), False),
    "D": ("D", dict(c_dim=0, img_resolution=16, img_channels=3, channel_base=128, channel_max=8, conv_clamp=256,
                    epilogue_kwargs=dict(mbstd_group_size=4)), True),
    "D_cond_skip": ("D", dict(c_dim=4, img_resolution=8, img_channels=3, architecture="skip", channel_base=64,
                              channel_max=8, conv_clamp=0.5,
                              epilogue_kwargs=dict(mbstd_group_size=2, mbstd_num_channels=2)), True),
    "D_orig_init": ("D", dict(c_dim=0, img_resolution=8, img_channels=3, architecture="orig", channel_base=64,
                              channel_max=8), False),
}
G_BATCH, D_BATCH = 2, 4  # D: minibatch-stddev groups of 4 (and 2)
NOISE_SEED = 1234  # torch.manual_seed before G(..., noise_mode="random")


def packed(tensors: dict) -> dict:
    """The same tensors as views of one buffer: torch.save then writes one record, not one per tensor."""
    flat = torch.cat([v.detach().reshape(-1).float() for v in tensors.values()])
    out, offset = {}, 0
    for k, v in tensors.items():
        out[k] = flat[offset:offset + v.numel()].view(v.shape)
        offset += v.numel()
    return out


def keys(module: torch.nn.Module) -> list:
    return [[k, list(v.shape)] for k, v in module.state_dict().items()]


def noise_resolutions(G: torch.nn.Module) -> list[int]:
    """The resolution of each layer that draws noise, in the order the official forward draws it."""
    layers = [getattr(getattr(G.synthesis, f"b{res}"), name, None) for res in G.synthesis.block_resolutions
              for name in ("conv0", "conv1")]
    return [m.resolution for m in layers if m is not None and m.use_noise]


def g_case(G: torch.nn.Module, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn([G_BATCH, G.z_dim], generator=gen)
    c = torch.randn([G_BATCH, G.c_dim], generator=gen)
    out = {"z": z, "c": c}
    with torch.no_grad():
        G.eval()
        out["ws"] = G.mapping(z, c)
        out["img_const"] = G(z, c, noise_mode="const")
        out["img_psi"] = G(z, c, truncation_psi=0.7, noise_mode="const")
        out["img_cutoff"] = G(z, c, truncation_psi=0.5, truncation_cutoff=2, noise_mode="const")
        torch.manual_seed(NOISE_SEED)
        out["img_random"] = G(z, c, noise_mode="random")
        torch.manual_seed(NOISE_SEED)  # the draws it made, replayed: one [N, 1, R, R] per noise layer
        for i, res in enumerate(noise_resolutions(G)):
            out[f"noise{i}"] = torch.randn([G_BATCH, 1, res, res])
        G.train()
        out["img_train"] = G(z, c, noise_mode="const")  # non-fused modconv; updates w_avg
        out["w_avg_after_train"] = G.mapping.w_avg.clone()
    ws = out["ws"].clone().requires_grad_(True)
    img = G.synthesis(ws, noise_mode="const")
    out["grad_ws"] = torch.autograd.grad(img.square().sum(), ws)[0]
    return out


def d_case(D: torch.nn.Module, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn([D_BATCH, D.img_channels, D.img_resolution, D.img_resolution], generator=gen)
    c = torch.randn([D_BATCH, D.c_dim], generator=gen)
    x = img.clone().requires_grad_(True)
    logits = D(x, c)
    return {"img": img, "c": c, "logits": logits.detach(), "grad_img": torch.autograd.grad(logits.sum(), x)[0]}


def build(official: Path, seed: int) -> dict:
    sys.path.insert(0, str(official))
    from training import networks  # noqa: PLC0415  (the official code, from --official)

    classes = {"G": networks.Generator, "D": networks.Discriminator}
    configs = {}
    for name, (kind, kwargs) in PAPER.items():
        net = classes[kind](**kwargs)  # on CPU: the official setup_filter cannot run on the meta device
        configs[name] = {"kind": kind, "kwargs": kwargs, "num_params": sum(p.numel() for p in net.parameters()),
                         "keys": keys(net)}
    cases = {}
    for i, (name, (kind, kwargs, perturb)) in enumerate(CASES.items()):
        torch.manual_seed(seed + i)  # the init seed: the test rebuilds *_init cases from it
        net = classes[kind](**kwargs)
        if perturb:
            gen = torch.Generator().manual_seed(seed + 100 + i)
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
                if kind == "G":
                    net.mapping.w_avg.copy_(torch.randn(net.mapping.w_avg.shape, generator=gen))
        state = packed(net.state_dict())  # all float32
        outputs = g_case(net, seed + 200 + i) if kind == "G" else d_case(net, seed + 200 + i)
        cases[name] = {"kind": kind, "kwargs": kwargs, "init_seed": seed + i, "perturbed": perturb,
                       "num_params": sum(p.numel() for p in net.parameters()), "state_dict": state,
                       **packed(outputs)}
    return {"source": "NVlabs/stylegan2-ada-pytorch training/networks.py", "torch": str(torch.__version__),
            "noise_seed": NOISE_SEED, "configs": configs, "cases": cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="a checkout of NVlabs/stylegan2-ada-pytorch")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ref = build(args.official, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    for name, cfg in ref["configs"].items():
        print(f"  {name}: {cfg['num_params']:,} parameters, {len(cfg['keys'])} state dict entries")


if __name__ == "__main__":
    main()
