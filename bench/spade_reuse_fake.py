"""Does ``model.reuse_fake`` hurt SPADE? The demo config trained twice from the same seed and data
order: D's step scoring G's fake from before G's update (``reuse_fake=true``, the default) and a
fake made again by the updated G (``false``, the official order). Every snapshot of both runs is
scored by the evaluator (FID/KID against the validation split) and by the L1 of G_ema's output
to the target photos; the table prints both curves and their ratio.

FID needs InceptionV3 weights (``--inception-weights``, see README). Without them the evaluator's
seeded, untrained stand-in is used: its FIDs compare the two runs with each other and nothing else.

    .venv/bin/python bench/spade_reuse_fake.py --shards shards/demo          # ~15 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def train(shards: str, run_dir: Path, reuse: bool, args) -> None:
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", "spade_demo", f"data.url={shards}",
           f"run.dir={run_dir}", f"model.reuse_fake={str(reuse).lower()}", f"train.total_kimg={args.kimg}",
           f"checkpoint.every_kimg={args.every_kimg}", "checkpoint.keep_last=2", "train.progress=false",
           f"run.seed={args.seed}",
           "train.image_every_kimg=0", "data.workers=0"]
    subprocess.run(cmd, check=True, timeout=7200)


def evaluate(run_dir: Path, inception: str) -> None:
    cmd = [sys.executable, str(REPO / "launch" / "evaluate.py"), "--run", str(run_dir), "--once",
           "--inception-weights", inception]
    subprocess.run(cmd, check=True, timeout=7200)


def l1_curve(run_dir: Path, shards: str) -> dict[int, float]:
    """Mean |G_ema(label) - photo| on the validation split, per snapshot."""
    import numpy as np
    import torch

    from pipeline.config import load_config
    from pipeline.data.manifest import load_manifest
    from pipeline.data.stream import make_stream
    from pipeline.data.transforms import Augment
    from pipeline.families import spade
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.family import DataInfo

    cfg = load_config("spade_demo", [f"data.url={shards}"])
    m = load_manifest(shards)
    info = DataInfo.of(m)
    fields = spade.streams(cfg, info, "val")[0].fields
    batches = [spade.prepare({"data": torch.utils.data.default_collate([s])}, torch.device("cpu"), cfg, info)
               for s in make_stream(shards, "val", train=False, fields=fields,
                                    augment=Augment(cfg.data.load_size, cfg.data.crop_size, False))]
    out = {}
    for found in ckpt.verified(str(run_dir), ckpt.SNAPSHOTS):
        G = spade.build(cfg, info)["G"]
        G.load_state_dict(ckpt.load_tensors(found.file(ckpt.snapshot_networks(found.record)['G'])))
        G.eval()
        with torch.no_grad():
            out[found.step] = float(np.mean([(spade.generate({"G": G}, b) - b["image"]).abs().mean().item()
                                             for b in batches]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default=str(REPO / "shards" / "demo"))
    p.add_argument("--inception-weights", default=None, help="default: a seeded untrained stand-in")
    p.add_argument("--kimg", type=float, default=0.5)
    p.add_argument("--every-kimg", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="run.seed of both runs")
    p.add_argument("--out", default=None, help="keep the two runs here (default: a temporary directory)")
    args = p.parse_args(argv)
    work = Path(args.out or tempfile.mkdtemp(prefix="spade-reuse-"))
    inception = args.inception_weights
    if inception is None:
        from pipeline.eval.standin import write_standin_inception

        inception = str(write_standin_inception(work / "inception-standin.pth"))
        print(f"FID from the UNTRAINED stand-in Inception {inception}: comparable between these runs only")
    curves = {}
    for reuse in (True, False):
        run_dir = work / f"reuse_fake={str(reuse).lower()}"
        train(args.shards, run_dir, reuse, args)
        evaluate(run_dir, inception)
        metrics = {int(f.stem.split("-")[1]): json.loads(f.read_text())["metrics"]
                   for f in sorted((run_dir / "eval").glob("step-*.json"))}
        curves[reuse] = (metrics, l1_curve(run_dir, args.shards))
    print(f"\nspade_demo, seed {args.seed}, {args.kimg} kimg, snapshots every {args.every_kimg} kimg ({work})")
    heads = [("step", 6), ("FID reuse", 10), ("FID official", 13), ("ratio", 6), ("L1 reuse", 9),
             ("L1 official", 12), ("ratio", 6)]
    print(" ".join(f"{h:>{w}}" for h, w in heads))
    (m_r, l_r), (m_o, l_o) = curves[True], curves[False]
    for step in sorted(set(m_r) & set(m_o)):
        fr, fo = m_r[step]["fid"], m_o[step]["fid"]
        lr, lo = l_r.get(step, float("nan")), l_o.get(step, float("nan"))
        print(f"{step:>6} {fr:>10.3f} {fo:>13.3f} {fr / fo:>6.3f} {lr:>9.4f} {lo:>12.4f} {lr / lo:>6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
