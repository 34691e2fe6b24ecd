"""A run's evaluation as a person reads it: one row per evaluated snapshot and the best one, from
``eval/metrics.jsonl`` and ``eval/best.json``; a stand-in Inception's FID/KID are starred and
explained. ``python -m pipeline.eval.summary RUN [--note TEXT]``."""

from __future__ import annotations

import argparse
import json
import math
import sys

from .. import io

# Column order; metrics a run does not have are left out, others it has are appended.
COLUMNS = ("fid", "kid", "kid_std", "psnr", "ssim", "lpips")


def summary(run: str, storage_options: dict | None = None) -> str:
    url = io.join(run, "eval", "metrics.jsonl")
    if not io.exists(url, storage_options):
        return f"no evaluation results yet in {run}/eval"
    rows = [json.loads(line) for line in io.read_bytes(url, storage_options).decode().splitlines() if line.strip()]
    names = {k for r in rows for k in r["metrics"]}
    cols = [c for c in COLUMNS if c in names] + sorted(names - set(COLUMNS))
    standin = any(r.get("standin") for r in rows)
    mark = {c: "*" for c in cols if standin and c.split("_")[0] in ("fid", "kid")}
    head = ["step", "kimg", *(c + mark.get(c, "") for c in cols)]
    table = [head] + [[str(r["step"]), f"{r['kimg']:.3f}", *(_fmt(r["metrics"].get(c)) for c in cols)] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
    best_url = io.join(run, "eval", "best.json")
    if io.exists(best_url, storage_options):
        best = io.read_json(best_url, storage_options)
        lines.append(f"best {best['metric']}{mark.get(best['metric'], '')}: {_fmt(best['value'])} at step "
                     f"{best['step']} (kimg {best['kimg']:.3f}), {best['snapshot']}")
    if mark:
        lines.append("* from an UNTRAINED stand-in Inception: comparable between these snapshots only, "
                     "never with published FIDs (TensorBoard: Metrics_standin/*)")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="the run directory (any fsspec URL)")
    p.add_argument("--note", help="a line printed under the table (e.g. what the FID was computed with)")
    args = p.parse_args(argv)
    print(summary(args.run))
    if args.note:
        print(args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
