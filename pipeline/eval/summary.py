"""A run's evaluation as a person reads it: one row per evaluated snapshot and the best one, from
``eval/metrics.jsonl`` and ``eval/best.json``; a stand-in Inception's FID/KID are starred and
explained; optionally a PNG of each metric over kimg.
``python -m pipeline.eval.summary RUN [--note TEXT] [--plot PNG]``."""

from __future__ import annotations

import argparse
import io as _io
import json
import math
import sys

from .. import io

# Column order; metrics a run does not have are left out, others it has are appended.
COLUMNS = ("fid", "kid", "kid_std", "psnr", "ssim", "lpips")


def _rows(run: str, storage_options: dict | None = None) -> list[dict] | None:
    """The evaluator's records, in the order it wrote them; None before the first."""
    url = io.join(run, "eval", "metrics.jsonl")
    if not io.exists(url, storage_options):
        return None
    return [json.loads(line) for line in io.read_bytes(url, storage_options).decode().splitlines() if line.strip()]


def _columns(rows: list[dict]) -> tuple[list[str], dict[str, str]]:
    """The metric names in display order, and the star of those a stand-in Inception computed."""
    names = {k for r in rows for k in r["metrics"]}
    cols = [c for c in COLUMNS if c in names] + sorted(names - set(COLUMNS))
    standin = any(r.get("standin") for r in rows)
    return cols, {c: "*" for c in cols if standin and c.split("_")[0] in ("fid", "kid")}


def summary(run: str, storage_options: dict | None = None) -> str:
    rows = _rows(run, storage_options)
    if rows is None:
        return f"no evaluation results yet in {run}/eval"
    cols, mark = _columns(rows)
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


def plot(run: str, png: str, storage_options: dict | None = None) -> list[str]:
    """Each metric (KID's spread as a band around KID) over kimg, one panel per metric, as the PNG
    ``png`` (any fsspec URL). The metrics drawn; none (and no file) before the first evaluation."""
    from matplotlib.figure import Figure  # a bare Figure draws to files, whatever backend pyplot would pick

    rows = sorted(_rows(run, storage_options) or [], key=lambda r: r["kimg"])
    cols, mark = _columns(rows)
    cols = [c for c in cols if c != "kid_std"]
    if not cols:
        return []
    fig = Figure(figsize=(3.2 * len(cols), 2.8), layout="constrained")
    for ax, name in zip(fig.subplots(1, len(cols), squeeze=False)[0], cols):
        pts = [(r["kimg"], r["metrics"][name], r["metrics"].get(f"{name}_std")) for r in rows
               if r["metrics"].get(name) is not None and math.isfinite(r["metrics"][name])]
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(x, y, marker="o")
        if pts and all(p[2] is not None for p in pts):
            ax.fill_between(x, [v - p[2] for v, p in zip(y, pts)], [v + p[2] for v, p in zip(y, pts)], alpha=0.25)
        ax.set_title(name + mark.get(name, ""))
        ax.set_xlabel("kimg")
        ax.grid(alpha=0.3)
    if mark:
        fig.suptitle("* untrained stand-in Inception: compare between these snapshots only", fontsize="small")
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    io.atomic_write_bytes(png, buf.getvalue(), storage_options)
    return cols


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
    p.add_argument("--plot", metavar="PNG", help="also draw each metric over kimg into this PNG file")
    args = p.parse_args(argv)
    print(summary(args.run))
    if args.note:
        print(args.note)
    if args.plot and plot(args.run, args.plot):
        print(f"plot of the metrics over kimg: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
