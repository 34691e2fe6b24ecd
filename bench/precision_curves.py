"""Do bf16 and fp32 train the same? A demo config trained at each precision from the same seeds
and data order, every snapshot scored by the evaluator (FID/KID against the reference split) and
the training losses read back from TensorBoard. The table puts the precision gap beside the gap
between two seeds at one precision: bf16 agrees with fp32 when its gap is no larger than what a
different seed already makes.

bf16 needs hardware that computes it natively to be worth running (the run refuses otherwise,
as ``train.precision=bf16`` on a CPU without it is orders of magnitude slower). FID needs
InceptionV3 weights (``--inception-weights``, see README); without them the evaluator's seeded,
untrained stand-in is used, whose FIDs compare these runs with each other and nothing else.

    .venv/bin/python bench/precision_curves.py --config stylegan2_demo --kimg 4   # ~30 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def train(config: str, run_dir: Path, precision: str, seed: int, args) -> float:
    """One run in one process; returns its wall time."""
    import time

    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", config, f"data.url={args.shards}",
           f"run.dir={run_dir}", f"train.precision={precision}", f"run.seed={seed}", f"train.total_kimg={args.kimg}",
           f"checkpoint.every_kimg={args.every_kimg}", "checkpoint.keep_last=2", "train.progress=false",
           "train.image_every_kimg=0", "data.workers=0", *args.override]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=7200)
    return time.perf_counter() - t


def evaluate(run_dir: Path, inception: str) -> dict[int, dict]:
    cmd = [sys.executable, str(REPO / "launch" / "evaluate.py"), "--run", str(run_dir), "--once",
           "--inception-weights", inception]
    subprocess.run(cmd, check=True, timeout=7200)
    results = sorted((run_dir / "eval").glob("step-*.json"))
    return {int(f.stem.split("-")[1]): json.loads(f.read_text()) for f in results}


def losses(run_dir: Path, windows: list[int]) -> dict[str, list[float]]:
    """Per loss tag, its mean over each window of images (nimg in ``(windows[i-1], windows[i]]``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.train.stats import tensorboard_url

    acc = EventAccumulator(tensorboard_url(str(run_dir)), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        if not tag.startswith("Loss/"):
            continue
        events = acc.Scalars(tag)
        out[tag[len("Loss/"):]] = [statistics.fmean([e.value for e in events if lo < e.step <= hi] or [float("nan")])
                                   for lo, hi in zip([0, *windows[:-1]], windows, strict=True)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="stylegan2_demo")
    p.add_argument("--shards", default=str(REPO / "shards" / "demo"))
    p.add_argument("--inception-weights", default=None, help="default: a seeded untrained stand-in")
    p.add_argument("--kimg", type=float, default=4.0)
    p.add_argument("--every-kimg", type=float, default=0.5)
    p.add_argument("--seeds", default="0,1", help="run.seed values; every precision runs every seed")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    p.add_argument("override", nargs="*", help="more key=value overrides for every run")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    precisions = args.precisions.split(",")
    work = Path(args.out or tempfile.mkdtemp(prefix="precision-curves-"))
    inception = args.inception_weights
    if inception is None:
        from pipeline.eval.standin import write_standin_inception

        inception = str(write_standin_inception(work / "inception-standin.pth"))
        print(f"FID from the UNTRAINED stand-in Inception {inception}: comparable between these runs only")
    runs = {}
    for seed in seeds:
        for precision in precisions:  # alternating, so that machine load falls on both alike
            run_dir = work / f"{precision}-seed{seed}"
            wall = train(args.config, run_dir, precision, seed, args)
            evals = evaluate(run_dir, inception)
            steps = sorted(evals)
            windows = [int(evals[s]["nimg"]) for s in steps]
            runs[precision, seed] = {"wall": wall, "steps": steps, "kimg": [w / 1000 for w in windows],
                                     "fid": [evals[s]["metrics"]["fid"] for s in steps],
                                     "kid": [evals[s]["metrics"].get("kid", float("nan")) for s in steps],
                                     "loss": losses(run_dir, windows)}
    (work / "curves.json").write_text(json.dumps({f"{p}-seed{s}": r for (p, s), r in runs.items()}, indent=1))

    names = [f"{p} s{s}" for s in seeds for p in precisions]
    keys = [(p, s) for s in seeds for p in precisions]
    first = runs[keys[0]]
    print(f"\n{args.config}, {args.kimg} kimg, snapshots every {args.every_kimg} kimg, 1 process ({work})")
    print("wall s per run: " + ", ".join(f"{n} {runs[k]['wall']:.0f}" for n, k in zip(names, keys, strict=True)))
    for metric in ("fid", "kid"):
        print(f"\n{metric.upper()} per snapshot")
        print(f"{'kimg':>6} " + " ".join(f"{n:>11}" for n in names))
        for i, kimg in enumerate(first["kimg"]):
            print(f"{kimg:>6.2f} " + " ".join(f"{runs[k][metric][i]:>11.4g}" for k in keys))
    tags = sorted(set.intersection(*(set(runs[k]["loss"]) for k in keys)))
    print("\nlosses: mean over each window between snapshots")
    for tag in tags:
        print(f"  {tag}")
        for i, kimg in enumerate(first["kimg"]):
            print(f"{kimg:>8.2f} " + " ".join(f"{runs[k]['loss'][tag][i]:>11.4g}" for k in keys))

    def gap(a, b, metric: str, tag: str | None = None) -> float:
        """Mean absolute difference of two runs' curves over the snapshots after the first."""
        xa = runs[a]["loss"][tag] if tag else runs[a][metric]
        xb = runs[b]["loss"][tag] if tag else runs[b][metric]
        return statistics.fmean(abs(x - y) for x, y in list(zip(xa, xb, strict=True))[1:])

    if len(precisions) == 2 and len(seeds) >= 2:
        p0, p1 = precisions
        print(f"\nagreement: mean |difference| over the snapshots after the first; {p1} vs {p0} at the same seed, "
              f"beside {p0} at two seeds")
        for metric, tag in [("fid", None), ("kid", None), *[("loss", t) for t in tags]]:
            label = tag or metric.upper()
            prec = statistics.fmean(gap((p0, s), (p1, s), metric, tag) for s in seeds)
            seed_gap = gap((p0, seeds[0]), (p0, seeds[1]), metric, tag)
            print(f"  {label:<14} {p1} vs {p0}: {prec:.4g}   seed {seeds[0]} vs {seeds[1]} ({p0}): {seed_gap:.4g}   "
                  f"ratio {prec / seed_gap if seed_gap else float('nan'):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
