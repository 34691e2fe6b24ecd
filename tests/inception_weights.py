"""Seeded random-init weights files for the metric tests: torch-fidelity's real InceptionV3 and this
pipeline's LPIPS. Nothing is downloaded; the files have exactly the layouts the loaders expect.
"""

from __future__ import annotations

from pathlib import Path

import torch


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """torch-fidelity's InceptionV3 with informative random weights (the product's stand-in)."""
    from pipeline.eval.standin import standin_inception_state

    return standin_inception_state(seed)


def write_random_inception_weights(path: Path, seed: int = 0) -> Path:
    torch.save(random_inception_state_dict(seed), path)
    return path


def write_random_lpips_weights(path: Path, seed: int = 0) -> Path:
    """This pipeline's LPIPS weights file (format in ``pipeline.eval.paired.LPIPS``), random but seeded;
    the linear heads are made non-negative, as the official trained heads are."""
    from pipeline.eval.paired import LPIPS

    torch.manual_seed(seed)
    model = LPIPS()
    for lin in model.lins:
        lin.weight.data.abs_()
    torch.save(model.state_dict(), path)
    return path
