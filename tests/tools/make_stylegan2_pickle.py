"""Writes a tiny network pickle with the official stylegan2-ada-pytorch code, as its training loop
snapshots one, plus a JSON digest of what the official objects hold, for
``tests/test_stylegan2_pickle.py`` (which must not import the official code).

    python tests/tools/make_stylegan2_pickle.py --official /path/to/stylegan2-ada-pytorch \
        --out tests/data/stylegan2_official_tiny.pkl

Needs the official code's own dependencies (torch, numpy, scipy for AugmentPipe). The digest
(``<out>`` with ``.json`` for ``.pkl``) lists each network's ``state_dict()`` keys in order with
shape, dtype and the SHA-256 of the values, and the ``init_kwargs`` and ``training_set_kwargs``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import torch


def tensor_digest(t: torch.Tensor) -> dict:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "sha256": hashlib.sha256(data).hexdigest()}


def plain(obj):
    """JSON-able copy: EasyDicts as dicts, tuples as lists, numpy scalars as numbers."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def build(official: Path, seed: int) -> dict:
    """The snapshot dict, built and copied as the official training_loop.py does."""
    sys.path.insert(0, str(official))
    import dnnlib  # the official code, from --official
    from training import augment, networks

    torch.manual_seed(seed)
    # train.py's structure (EasyDict kwargs, fp16 on the 4 highest resolutions, clamp 256), tiny.
    G_kwargs = dnnlib.EasyDict(z_dim=16, w_dim=16, mapping_kwargs=dnnlib.EasyDict(num_layers=2),
                               synthesis_kwargs=dnnlib.EasyDict(channel_base=128, channel_max=8, num_fp16_res=4,
                                                                conv_clamp=256))
    D_kwargs = dnnlib.EasyDict(block_kwargs=dnnlib.EasyDict(), mapping_kwargs=dnnlib.EasyDict(),
                               epilogue_kwargs=dnnlib.EasyDict(mbstd_group_size=4), channel_base=128, channel_max=8,
                               num_fp16_res=4, conv_clamp=256)
    common_kwargs = dict(c_dim=0, img_resolution=16, img_channels=3)
    G = networks.Generator(**G_kwargs, **common_kwargs).train().requires_grad_(False)
    D = networks.Discriminator(**D_kwargs, **common_kwargs).train().requires_grad_(False)
    G_ema = copy.deepcopy(G).eval()
    augment_pipe = augment.AugmentPipe(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1,
                                       brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)  # 'bgc'
    # As after some training: G_ema and the tracked buffers differ from G's initial values.
    with torch.no_grad():
        for p in G_ema.parameters():
            p.mul_(0.5)
        G.mapping.w_avg.normal_()
        G_ema.mapping.w_avg.normal_()
        augment_pipe.p.fill_(0.25)
    training_set_kwargs = dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", path="tiny.zip",
                                          use_labels=False, max_size=8, xflip=False, resolution=16)

    # training_loop.py, "Save network snapshot".
    snapshot_data = dict(training_set_kwargs=dict(training_set_kwargs))
    for name, module in [("G", G), ("D", D), ("G_ema", G_ema), ("augment_pipe", augment_pipe)]:
        if module is not None:
            module = copy.deepcopy(module).eval().requires_grad_(False).cpu()
        snapshot_data[name] = module
        del module
    return snapshot_data


def digest(snapshot_data: dict) -> dict:
    out = {"training_set_kwargs": plain(snapshot_data["training_set_kwargs"]), "networks": {}}
    for name in ("G", "D", "G_ema", "augment_pipe"):
        module = snapshot_data[name]
        out["networks"][name] = {
            "class_name": type(module).__name__,
            "init_kwargs": plain(module.init_kwargs),
            "state_dict": [[k, tensor_digest(v)] for k, v in module.state_dict().items()],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="a checkout of NVlabs/stylegan2-ada-pytorch")
    ap.add_argument("--out", type=Path, required=True, help="the .pkl to write (and <out>.json beside it)")
    ap.add_argument("--seed", type=int, default=0)
    # Python 3.7's default protocol: the official code's supported Python wrote its pickles so.
    ap.add_argument("--protocol", type=int, default=3)
    args = ap.parse_args()
    snapshot_data = build(args.official, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "wb") as f:
        pickle.dump(snapshot_data, f, protocol=args.protocol)
    args.out.with_suffix(".json").write_text(json.dumps(digest(snapshot_data), indent=1) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
