"""Our paired metrics (``pipeline.eval.paired``: PSNR, SSIM, MS-SSIM) against torchmetrics' on the
same image pairs: the values each gives, and CPU time (1 thread, median of repeats). The images
are validation photos of a shard set and two degraded copies of them (Gaussian noise, a 3x3 box
blur), so the structure terms see real image content.

torchmetrics is not a dependency; install it to run this (``pip install torchmetrics``).

    .venv/bin/python bench/paired_vs_torchmetrics.py --shards shards/demo
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cpu_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 2):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times[2:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default=str(REPO / "shards" / "demo"))
    p.add_argument("--split", default="val")
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    try:
        from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm_ms_ssim
        from torchmetrics.functional.image import peak_signal_noise_ratio as tm_psnr
        from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim
    except ImportError:
        raise SystemExit("this comparison needs torchmetrics: pip install torchmetrics") from None
    import torchmetrics

    from pipeline.data.stream import make_stream
    from pipeline.eval import paired

    torch.set_num_threads(1)
    images = []
    for sample in make_stream(args.shards, args.split, train=False, fields=("image",)):
        images.append(sample["image"])
        if len(images) == args.count:
            break
    x = torch.stack(images).float() / 255
    noisy = (x + 0.08 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    blurred = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    weights = paired.ms_ssim_weights(*x.shape[-2:])
    unit = (0.0, 1.0)
    metrics = {
        "PSNR": (lambda a, b: paired.psnr(a, b, value_range=unit),
                 lambda a, b: tm_psnr(b, a, data_range=1.0, reduction="none", dim=(1, 2, 3))),
        "SSIM": (lambda a, b: paired.ssim(a, b, value_range=unit),
                 lambda a, b: tm_ssim(b, a, data_range=1.0, reduction="none")),
        f"MS-SSIM ({len(weights)} scales)": (
            lambda a, b: paired.ms_ssim(a, b, value_range=unit, weights=weights),
            lambda a, b: tm_ms_ssim(b, a, data_range=1.0, reduction="none", betas=weights, normalize="relu")),
    }
    print(f"{len(images)} {args.split} images of {args.shards}, {x.shape[-2]}x{x.shape[-1]}; torchmetrics "
          f"{torchmetrics.__version__}, torch {torch.__version__}, 1 thread")
    print(f"{'metric':<22} {'pair':<6} {'ours':>11} {'torchmetrics':>13} {'max |diff|':>11} {'max rel':>9}")
    for name, (ours, theirs) in metrics.items():
        for label, y in (("noise", noisy), ("blur", blurred)):
            a, b = ours(x, y), theirs(x, y)
            diff = (a - b).abs()
            print(f"{name:<22} {label:<6} {a.mean():>11.6f} {b.mean():>13.6f} {diff.max():>11.3g} "
                  f"{(diff / b.abs()).max():>9.3g}")
    # torchmetrics averages its SSIM map over the whole image, border windows over reflected pixels
    # included; the reference (Wang et al.'s ssim.m) and ours average the valid windows only.
    pad = (paired.SSIM_WINDOW - 1) // 2
    for label, y in (("noise", noisy), ("blur", blurred)):
        _, full = tm_ssim(y, x, data_range=1.0, reduction="none", return_full_image=True)
        valid = full[..., pad:-pad, pad:-pad].mean(dim=(1, 2, 3))
        diff = (paired.ssim(x, y, value_range=unit) - valid).abs().max()
        print(f"SSIM {label}: torchmetrics' map over the valid windows only vs ours: max |diff| {diff:.3g}")
    print(f"\nCPU s per batch of {len(images)} (median of {args.repeats})")
    for name, (ours, theirs) in metrics.items():
        t_ours = cpu_time(lambda f=ours: f(x, noisy), args.repeats)
        t_tm = cpu_time(lambda f=theirs: f(x, noisy), args.repeats)
        print(f"{name:<22} ours {t_ours:.4f}  torchmetrics {t_tm:.4f}  ({t_tm / t_ours:.2f}x ours)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
